"""GPTQ on the W8A8 weight grids (--precision int8 | fp8 --weight-method gptq): per-channel INT8
and FP8 rounding against RTN on a synthetic layer, the FP8 grid positions the offsets count, the
end-to-end model (ORT) with byte-exact replay, and the recipe's checks."""

import numpy as np
import pytest

from onnxq.cli import main

from onnxq.gptq import apply_offsets, fp8_from_ordinals, fp8_ordinals, gptq_quantize_static, grid_offsets, layer_error
from onnxq.grids import FP8_MAX, GRIDS, fake_quant_weight, quantize_weight, to_fp8
from onnxq.plan import QuantPlan
from onnxq.recipe import Recipe, RecipeError
from tests.test_gptq import _correlated_layer, _fit_and_held_out, _logits_errors


@pytest.mark.parametrize("dtype", ["int8", "float8e4m3fn"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_static_gptq_beats_rtn_on_held_out_rows(dtype, per_channel):
    w, h, h_held = _fit_and_held_out()
    axis = 1 if per_channel else None
    rtn, scale = quantize_weight(w, axis, dtype)
    q = gptq_quantize_static(w, h, dtype, per_channel)
    assert q.dtype == rtn.dtype and q.shape == w.shape
    assert np.abs(q.astype(np.float32)).max() <= GRIDS[dtype].qmax
    moved = apply_offsets(rtn, grid_offsets(q, rtn, dtype), dtype)
    assert np.array_equal(moved.astype(np.float32), q.astype(np.float32))  # the offsets rebuild GPTQ's values
    errors = [layer_error(w, v.astype(np.float32) * scale, h_held) for v in (rtn, q)]
    assert errors[1] < 0.8 * errors[0], errors
    assert np.array_equal(q, gptq_quantize_static(w, h, dtype, per_channel))  # deterministic


def test_static_gptq_on_identity_hessian_is_rtn():
    _, w = _correlated_layer(k=64)
    rtn, _ = quantize_weight(w, 1, "int8")
    assert np.array_equal(gptq_quantize_static(w, np.eye(64), "int8", act_order=False), rtn)
    assert np.array_equal(fake_quant_weight(w, 1, "int8"), rtn.astype(np.float32) * quantize_weight(w, 1, "int8")[1])


def test_fp8_ordinals_are_the_grid_in_order():
    codes = np.arange(256, dtype=np.uint8).view(to_fp8(np.zeros(1)).dtype)
    finite = codes[np.isfinite(codes.astype(np.float32))]
    ordinals = fp8_ordinals(finite)
    values = finite.astype(np.float32)
    order = np.argsort(ordinals, kind="stable")
    assert np.all(np.diff(values[order]) >= 0)  # monotonic (±0 share position 0)
    assert ordinals.max() == 126 and fp8_from_ordinals(np.int16(126)).astype(np.float32) == FP8_MAX
    back = fp8_from_ordinals(ordinals).astype(np.float32)
    assert np.array_equal(back, values)
    assert apply_offsets(finite[ordinals == 126], np.ones(1, dtype=np.int8), "float8e4m3fn") is None  # past 448


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_static_gptq_model_is_closer_to_fp32_and_replays(decoder_case, tmp_path, precision):
    model, calib, evald = decoder_case
    common = ["quantize", str(model), "--no-eval", "-q", "--precision", precision, "--target", "tensorrt", "--calib", str(calib)]
    assert main([*common, "-o", str(tmp_path / "g.onnx"), "--weight-method", "gptq", "--save-plan", str(tmp_path / "p.json")]) == 0
    plan = QuantPlan.load(tmp_path / "p.json")
    with_offsets = [w for w in plan.weights.values() if w.offsets is not None]
    assert with_offsets and all(w.block_size is None and w.clip is None for w in with_offsets)
    assert any(np.any(w.offset_values()) for w in with_offsets)
    assert main(["quantize", str(model), "--no-eval", "-q", "-o", str(tmp_path / "replay.onnx"), "--plan", str(tmp_path / "p.json")]) == 0
    assert (tmp_path / "replay.onnx").read_bytes() == (tmp_path / "g.onnx").read_bytes()
    if precision == "int8":  # FP8 weights' error is a small part of this block's (activations dominate)
        assert main([*common, "-o", str(tmp_path / "rtn.onnx")]) == 0
        err = _logits_errors(model, evald, {name: tmp_path / f"{name}.onnx" for name in ("g", "rtn")})
        assert err["g"] < err["rtn"], err


def test_recipe_takes_gptq_for_static_precisions_only_where_it_means_something(decoder_case, tmp_path, capsys):
    assert Recipe.from_options({"precision": "int8", "weight_method": "gptq"}).weight_method == "gptq"
    assert Recipe.from_options({"precision": "fp8", "weight_method": "gptq"}).weight_method == "gptq"
    with pytest.raises(RecipeError, match="weight-only"):
        Recipe.from_options({"precision": "int8", "weight_method": "awq"})
    with pytest.raises(RecipeError, match="drop --dynamic"):
        Recipe.from_options({"precision": "int8", "target": "ort", "dynamic": True, "weight_method": "gptq"})
    model, _, _ = decoder_case
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--precision", "int8", "--weight-method", "gptq", "-q"]) == 2
    assert "needs calibration data" in capsys.readouterr().err


def test_solver_candidates_get_gptq_from_the_sweeps_recipe(decoder_case, tmp_path):
    """`onnxq sweep --weight-method gptq` records it; `onnxq solve` gives every candidate GPTQ's
    rounding of its 8-bit weights (each node its own precision's), the plan replays to the model
    the solver measured, and that model is closer to FP32 than the RTN solver's."""
    model, calib, evald = decoder_case
    for name, extra in (("rtn", []), ("g", ["--weight-method", "gptq"])):
        assert main(["sweep", str(model), "--calib", str(calib), "--eval", str(evald), "--precisions", "int8", "-o", str(tmp_path / f"{name}.sweep.json"), "-q", *extra]) == 0
        assert main(["solve", str(tmp_path / f"{name}.sweep.json"), str(model), "--calib", str(calib), "--eval", str(evald), "--max-high-precision-layers", "0", "-o", str(tmp_path / f"{name}.plan.json"), "--save-model", str(tmp_path / f"{name}.onnx"), "-q"]) == 0
    plan = QuantPlan.load(tmp_path / "g.plan.json")
    assert plan.recipe["weight-method"] == "gptq"
    assert any(w.offsets is not None and np.any(w.offset_values()) for w in plan.weights.values())
    assert all(w.offsets is None for w in QuantPlan.load(tmp_path / "rtn.plan.json").weights.values())
    assert main(["quantize", str(model), "--no-eval", "-q", "-o", str(tmp_path / "replay.onnx"), "--plan", str(tmp_path / "g.plan.json")]) == 0
    assert (tmp_path / "replay.onnx").read_bytes() == (tmp_path / "g.onnx").read_bytes()
    err = _logits_errors(model, evald, {name: tmp_path / f"{name}.onnx" for name in ("g", "rtn")})
    assert err["g"] < err["rtn"], err


def test_bias_correction_measures_the_gptq_rounded_weight(tmp_path):
    """--bias-correction with --weight-method gptq corrects the error of the weights as emitted
    (GPTQ's rounding): with the head the only quantized node, its mean output error on the
    calibration data falls (measured: 0.0032 -> 0.0023); measured on the RTN weight instead, the
    correction made it 0.022, seven times worse than none."""
    import onnxruntime as ort

    from tests.synthetic import random_npz, save
    from tests.test_ort_qgemm import classifier

    path = save(classifier(), tmp_path / "cls.onnx")
    calib = random_npz(tmp_path / "calib.npz", "x", (1, 16, 8, 8), 16)
    x = np.load(calib)["x"]

    def mean_error(extra):
        out = tmp_path / f"q{len(extra)}.onnx"
        common = ["--target", "ort", "--exclude", "c1", "--weight-method", "gptq", "--calib-method", "minmax", "--no-eval", "-q"]
        assert main(["quantize", str(path), "-o", str(out), "--calib", str(calib), *common, "--save-plan", str(tmp_path / f"p{len(extra)}.json"), *extra]) == 0
        runs = []
        for p in (out, path):
            session = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            runs.append(np.concatenate([session.run(["y"], {"x": x[i : i + 1]})[0] for i in range(len(x))]))
        return float(np.abs((runs[0] - runs[1]).mean(axis=0)).max())

    plain, corrected = mean_error([]), mean_error(["--bias-correction"])
    plan = QuantPlan.load(tmp_path / "p1.json")
    assert plan.weight("head", 1).offsets is not None and "head" in plan.bias_correction
    assert corrected < plain, (plain, corrected)


def test_one_hessian_pass_rounds_every_precision_as_its_own_pass_would(decoder_case):
    """The solver's GPTQ collects the Hessians once for int8 and fp8 together: each precision's
    offsets are the ones a pass for that precision alone decides."""
    from onnxq.mixed_precision.candidates import gptq_offsets
    from onnxq.mixed_precision.ranges import calibrate_ranges
    from onnxq.passes.preprocess import load_and_preprocess
    from onnxq.placement import place

    model_path, calib, _ = decoder_case
    model = load_and_preprocess(model_path)
    base = place(model, "tensorrt")
    data = [{"x": x[None]} for x in np.load(calib)["x"]]
    ranges = calibrate_ranges(model, base, data, ["int8", "fp8"])
    together = gptq_offsets(model, base, data, ranges, ["int8", "fp8"], True)
    alone = {p: gptq_offsets(model, base, data, ranges, [p], True)[p] for p in ("int8", "fp8")}
    assert together == alone and together["int8"] and together["fp8"]
    assert together["int8"] != together["fp8"]
