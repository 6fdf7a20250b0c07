"""GPTQ (--weight-method gptq | awq+gptq): the Hessian accumulator, the rounding against RTN on a
synthetic layer, the plan's offsets, and the end-to-end model (ORT) with byte-exact replay."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from onnxq.cli import main
from onnxq.gptq import HessianAccumulator, gptq_quantize, layer_error
from onnxq.grids import GRIDS, dequantize_blocked, quantize_blocked
from onnxq.plan import QuantPlan


def _correlated_layer(seed: int = 0, k: int = 256, n: int = 64, rows: int = 2048):
    """Rows with correlated channels of unequal size (as LLM activations have) and a weight."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(0, 1, (k, k)) / np.sqrt(k) + np.eye(k)
    x = (rng.normal(0, 1, (rows, k)) @ mix * rng.uniform(0.2, 3.0, k)).astype(np.float32)
    x[:, [5, k // 3]] *= 10.0
    return x, rng.normal(0, 0.05, (k, n)).astype(np.float32)


def _fit_and_held_out():
    """A correlated layer's weight, the Hessian of its first 1024 rows (what GPTQ fits on) and
    the Hessian of the other rows (what the test scores on)."""
    x, w = _correlated_layer()
    train, held_out = x[:1024].astype(np.float64), x[1024:].astype(np.float64)
    return w, train.T @ train, held_out.T @ held_out


def test_hessian_accumulator_sums_rows_over_batches():
    x, _ = _correlated_layer(rows=96, k=16)
    acc = HessianAccumulator(-1)
    acc.update(x[:40].reshape(1, 40, 16))
    acc.update(x[40:].reshape(2, 28, 16))
    acc.update(np.zeros((1, 3, 8)))  # another width: not this tensor's
    np.testing.assert_allclose(acc.h, x.astype(np.float64).T @ x, rtol=1e-10)
    assert acc.rows == 96


@pytest.mark.parametrize("grid", ["int4", "uint4"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_held_out_rows(grid, act_order):
    w, h, h_held = _fit_and_held_out()
    rtn, scale, zero = quantize_blocked(w, 0, 64, GRIDS[grid])
    q = gptq_quantize(w, h, grid, 64, act_order=act_order)
    assert q.dtype == rtn.dtype and q.shape == w.shape
    lowest = -GRIDS[grid].qmax if GRIDS[grid].symmetric else GRIDS[grid].qmin
    assert q.astype(int).min() >= lowest and q.astype(int).max() <= GRIDS[grid].qmax
    errors = [layer_error(w, dequantize_blocked(v, scale, zero, 0, 64), h_held) for v in (rtn, q)]
    assert errors[1] < 0.7 * errors[0], errors
    assert np.array_equal(q, gptq_quantize(w, h, grid, 64, act_order=act_order))  # deterministic


def test_gptq_on_identity_hessian_is_rtn():
    """With uncorrelated, equal channels no error can be compensated: GPTQ rounds to nearest."""
    _, w = _correlated_layer(k=64)
    rtn, _, _ = quantize_blocked(w, 0, 32, GRIDS["int4"])
    assert np.array_equal(gptq_quantize(w, np.eye(64), "int4", 32, act_order=False), rtn)


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_gptq_model_is_closer_to_fp32_and_replays(decoder_case, tmp_path, method):
    model, calib, evald = decoder_case
    # --quantize-head: the head is a Gemm with transB=1, its blocks along the weight's axis 1
    common = ["quantize", str(model), "--no-eval", "-q", "--precision", "w4a16", "--block-size", "32", "--target", "ort", "--quantize-head"]
    assert main([*common, "-o", str(tmp_path / "g.onnx"), "--weight-method", method, "--calib", str(calib), "--save-plan", str(tmp_path / "p.json")]) == 0
    plan = QuantPlan.load(tmp_path / "p.json")
    assert sum(w.offsets is not None and w.clip is not None for w in plan.weights.values()) == 8
    assert bool(plan.smoothquant is not None and plan.smoothquant.active()) == (method == "awq+gptq")
    assert json.loads((tmp_path / "p.json").read_text())["recipe"]["weight-method"] == method
    assert main(["quantize", str(model), "--no-eval", "-q", "-o", str(tmp_path / "replay.onnx"), "--plan", str(tmp_path / "p.json")]) == 0
    assert (tmp_path / "replay.onnx").read_bytes() == (tmp_path / "g.onnx").read_bytes()
    assert main([*common, "-o", str(tmp_path / "rtn.onnx")]) == 0
    err = _logits_errors(model, evald, {name: tmp_path / f"{name}.onnx" for name in ("g", "rtn")})
    assert err["g"] < err["rtn"], err


def test_gptq_needs_calibration_data(decoder_case, tmp_path, capsys):
    model, _, _ = decoder_case
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--precision", "w4a16", "--weight-method", "gptq", "-q"]) == 2
    assert "--weight-method gptq needs calibration data" in capsys.readouterr().err


def test_plan_offsets_outside_the_grid_are_refused(decoder_case, tmp_path, capsys):
    model, calib, _ = decoder_case
    common = ["quantize", str(model), "--no-eval", "-q", "--precision", "w4a16", "--block-size", "32", "--target", "tensorrt"]
    assert main([*common, "-o", str(tmp_path / "g.onnx"), "--weight-method", "gptq", "--calib", str(calib), "--save-plan", str(tmp_path / "p.json")]) == 0
    plan = QuantPlan.load(tmp_path / "p.json")
    entry = next(w for w in plan.weights.values() if w.offsets)
    from onnxq.gptq import encode_offsets

    entry.offsets = encode_offsets(np.full(entry.offset_values().size, 15, dtype=np.int8))
    plan.save(tmp_path / "bad.json")
    assert main(["quantize", str(model), "-q", "-o", str(tmp_path / "bad.onnx"), "--plan", str(tmp_path / "bad.json")]) == 2
    assert "GPTQ offsets" in capsys.readouterr().err


def test_int8_share_keeps_the_worst_weights_at_8_bits_and_replays(decoder_case, tmp_path):
    model, calib, evald = decoder_case
    common = ["quantize", str(model), "--no-eval", "-q", "--precision", "w4a16", "--block-size", "32", "--target", "ort", "--no-quantize-head", "--weight-method", "gptq", "--calib", str(calib)]
    assert main([*common, "-o", str(tmp_path / "g.onnx")]) == 0
    assert main([*common, "-o", str(tmp_path / "s.onnx"), "--int8-share", "0.5", "--save-plan", str(tmp_path / "p.json")]) == 0
    plan = QuantPlan.load(tmp_path / "p.json")
    sizes = {dtype: sum(w.offset_values().size for w in plan.weights.values() if w.dtype == dtype) for dtype in ("uint4", "uint8")}
    assert 0 < sizes["uint8"] <= sizes["uint4"]  # at most half the elements at 8 bits
    assert main(["quantize", str(model), "--no-eval", "-q", "-o", str(tmp_path / "replay.onnx"), "--plan", str(tmp_path / "p.json")]) == 0
    assert (tmp_path / "replay.onnx").read_bytes() == (tmp_path / "s.onnx").read_bytes()
    err = _logits_errors(model, evald, {name: tmp_path / f"{name}.onnx" for name in ("g", "s")})
    assert err["s"] < err["g"], err


def _logits_errors(model, evald, candidates: dict) -> dict[str, float]:
    """{name: summed squared logit error against ``model``} of each candidate on the eval data."""
    x = np.load(evald)["x"]

    def run(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(["logits"], {"x": x[i : i + 1]})[0] for i in range(len(x))])

    ref = run(model)
    return {name: float(np.sum((run(path) - ref) ** 2)) for name, path in candidates.items()}
