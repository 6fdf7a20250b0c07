"""SmoothQuant: groups, exact folding into producers, α search, derived ranges, report, CLI."""

import json
import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxq
import synthetic
from onnxq import modelio
from onnxq.calibrators.reservoir import RowReservoir
from onnxq.cli import main
from onnxq.errors import OnnxqError
from onnxq.runtime import ort as ort_rt
from onnxq.pipeline import smooth_model
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.placement import place
from onnxq.recipe import Recipe
from onnxq.smoothquant import weight_matrix, scales


def _run(model, feeds):
    session = ort_rt.create_session(model if isinstance(model, (str, bytes)) or hasattr(model, "SerializeToString") else modelio.to_proto(model))
    return [session.run(None, f) for f in feeds]


def _feeds(npz, n=None):
    x = np.load(npz)["x"]
    return [{"x": x[i : i + 1]} for i in range(len(x) if n is None else n)]


def assert_same_function(reference, smoothed, feeds, rtol=1e-5):
    """Every output within ``rtol`` of the reference, relative to the output's largest magnitude
    (float32 reassociation of a scaled product differs by a few ulp of the largest term)."""
    for ref, got in zip(_run(reference, feeds), _run(smoothed, feeds), strict=True):
        for r, g in zip(ref, got, strict=True):
            assert np.max(np.abs(r - g)) <= rtol * np.max(np.abs(r)), np.max(np.abs(r - g)) / np.max(np.abs(r))


def _mul_count(model: ir.Model) -> int:
    return sum(n.op_type == "Mul" for n in model.graph)


@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_folding_preserves_the_function_and_goes_into_producers(decoder_case, alpha):
    model, calib, evald = decoder_case
    original_muls = sum(n.op_type == "Mul" for n in onnx.load(str(model)).graph.node)
    smoothed, plan = smooth_model(model, str(calib), alpha)
    where = {g.activation: g.absorber for g in plan.groups}
    assert where["h_norm"]["kind"] == "norm" and where["h_norm"]["node"] == "rms_weight"  # decomposed RMSNorm
    assert where["h_ln"] == {"kind": "norm", "node": "ln", "op": "LayerNormalization"}
    assert where["mlp"]["kind"] == "linear" and where["mlp"]["node"] == "up_proj"  # SwiGLU: the up branch
    assert where["ctx"]["kind"] == "inserted_mul"  # attention output: nothing linear absorbs it
    assert where["y2"]["kind"] == "inserted_mul"  # also read by a Relu: the producer cannot change
    assert sorted(plan.groups[i].activation for i in range(len(plan.groups))) == ["ctx", "h_ln", "h_norm", "mlp", "y2"]
    assert _mul_count(smoothed) == original_muls + sum(g.inserts_mul for g in plan.active())
    assert {g.activation for g in plan.active()} >= {"h_norm", "h_ln", "mlp"}
    for g in plan.active():
        assert g.amax_after < g.amax_before  # the outlier channels moved into the weights
    assert_same_function(str(model), smoothed, _feeds(evald))


def test_shared_and_transposed_weights_are_copied_not_changed(tmp_path):
    model = synthetic.save(synthetic.tied_embedding_lm(), tmp_path / "lm.onnx")
    ids = np.random.default_rng(0).integers(0, 64, (8, 1, 8))
    np.savez(tmp_path / "ids.npz", ids=ids)
    smoothed, plan = smooth_model(model, str(tmp_path / "ids.npz"), 0.5)
    (group,) = [g for g in plan.active() if g.activation == "h1"]
    assert group.absorber["kind"] == "linear" and group.absorber["node"] == "mlp"
    head = next(n for n in smoothed.graph if n.name == "lm_head")
    gather = next(n for n in smoothed.graph if n.name == "embed_lookup")
    original = onnx.numpy_helper.to_array(next(i for i in onnx.load(str(model)).graph.initializer if i.name == "embed"))
    np.testing.assert_array_equal(gather.inputs[0].const_value.numpy(), original)  # the lookup keeps E
    assert not np.allclose(head.inputs[1].const_value.numpy(), original.T)  # the head reads scaled weights
    assert_same_function(str(model), smoothed, [{"ids": ids[i]} for i in range(4)])


def test_minmax_ranges_of_smoothed_tensors_need_no_second_pass(decoder_case, tmp_path, capsys):
    model, calib, _ = decoder_case
    result = onnxq.quantize(model, tmp_path / "q.onnx", str(calib), smoothquant=0.5, method="minmax", evaluate=False)
    assert "second calibration pass" not in capsys.readouterr().err
    smoothed, _ = smooth_model(model, str(calib), 0.5)
    # the derived range of x / s equals what a calibration pass over the smoothed model observes
    names = [g.output for g in result.smoothquant.active()]
    proto = modelio.to_proto(smoothed)
    del proto.graph.output[:]
    proto.graph.output.extend([onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names])
    outs = _run(proto, _feeds(calib))
    for i, name in enumerate(names):
        lo = min(float(o[i].min()) for o in outs)
        hi = max(float(o[i].max()) for o in outs)
        params = result.plan.activations[name]
        np.testing.assert_allclose([params.min, params.max], [lo, hi], rtol=1e-5)


def test_histogram_method_recomputes_and_says_so(decoder_case, tmp_path, caplog):
    model, calib, _ = decoder_case
    with caplog.at_level(logging.INFO, logger="onnxq"):
        onnxq.quantize(model, tmp_path / "q.onnx", str(calib), smoothquant=0.5, method="mse", evaluate=False)
    assert "second calibration pass for the histograms of" in caplog.text


@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_smoothquant_improves_w8a8_on_outlier_channels(decoder_case, tmp_path, target):
    model, calib, evald = decoder_case
    runs = {}
    for sq in (None, 0.5, "auto"):
        r = onnxq.quantize(model, tmp_path / f"q_{sq}.onnx", str(calib), eval=str(evald), target=target, smoothquant=sq, method="minmax", quiet=True)
        runs[sq] = {a.name: a.snr_db for a in r.accuracy}
    assert runs[0.5]["logits"] > runs[None]["logits"] + 3, runs
    # auto minimises each group's own error; end to end it must still beat no smoothing
    assert runs["auto"]["logits"] > runs[None]["logits"], runs


def test_report_lists_every_group(decoder_case, tmp_path, caplog):
    model, calib, _ = decoder_case
    with caplog.at_level(logging.INFO, logger="onnxq"):
        result = onnxq.quantize(model, tmp_path / "q.onnx", str(calib), smoothquant="auto", method="minmax")
    printed = caplog.text  # the SmoothQuant summary is a status line of the onnxq logger
    report = json.loads(result.report_path.read_text())["smoothquant"]
    assert report["alpha"] == "auto"
    assert {g["activation"] for g in report["groups"]} == {"h_norm", "ctx", "h_ln", "mlp", "y2"}
    for g in report["groups"]:
        assert set(g["sim_error"]) >= {"none", "0.50"}
        if g["alpha"] is not None:
            assert g["sim_error"][f"{g['alpha']:.2f}"] == min(v for k, v in g["sim_error"].items() if k != "none")
            assert g["absorber"]["kind"] and g["amax_after"] > 0
            assert g["activation"] in printed
    # the Q/DQ model quantizes what the consumers read after smoothing
    q = onnx.load(str(result.output))
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert {g.output for g in result.smoothquant.active()} <= quantized


def test_scales_guard_zero_channels():
    s = scales(np.array([4.0, 0.0, 1.0]), np.array([1.0, 2.0, 0.0]), 0.5)
    np.testing.assert_allclose(s, [2.0, 1.0, 1.0])


def test_reservoir_is_bounded_and_keeps_real_rows():
    res = RowReservoir(axis=-1, capacity=32, seed=0)
    rows = np.arange(1000 * 4, dtype=np.float32).reshape(1000, 4)
    for i in range(0, 1000, 100):
        res.update(rows[None, i : i + 100])
    sample = res.sample()
    assert sample.shape == (32, 4) and res.seen == 1000
    assert set(sample[:, 0] // 4) <= set(range(1000))
    assert (sample[:, 0] >= 400).sum() > 10  # later rows are kept too, not just the first 32


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "strong", True])
def test_bad_alpha_is_an_error(bad):
    with pytest.raises(OnnxqError, match="migration strength"):
        Recipe.from_options({"smoothquant": bad})


@pytest.mark.parametrize("bad", [-1, "x", 2.5, True])
def test_bad_split_is_an_error(bad):
    with pytest.raises(OnnxqError, match="--split-outliers takes a whole number"):
        Recipe.from_options({"smoothquant": "auto", "split_outliers": bad})


def test_cli_smoothquant(decoder_case, tmp_path, capsys):
    model, calib, _ = decoder_case
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib), "--smoothquant", "0.5", "-q"]) == 0
    assert "smoothquant" in json.loads((tmp_path / "q.report.json").read_text())
    assert main(["quantize", str(model), "-o", str(tmp_path / "r.onnx"), "--calib", str(calib), "--smoothquant", "2"]) == 2
    assert "onnxq: error:" in capsys.readouterr().err and not (tmp_path / "r.onnx").exists()


def test_quantized_tied_head_reads_its_scaled_copy_per_channel(tmp_path):
    model = synthetic.save(synthetic.tied_embedding_lm(), tmp_path / "lm.onnx")
    ids = np.random.default_rng(0).integers(0, 64, (8, 1, 8))
    np.savez(tmp_path / "ids.npz", ids=ids)
    result = onnxq.quantize(model, tmp_path / "q.onnx", str(tmp_path / "ids.npz"), smoothquant=0.5, quiet=True)
    assert result.accuracy[0].cosine_mean > 0.99
    q = onnx.load(str(result.output))
    by_output = {o: n for n in q.graph.node for o in n.output}
    head = next(n for n in q.graph.node if n.name == "lm_head")
    dq = by_output[head.input[1]]
    assert dq.op_type == "DequantizeLinear"
    axis = next(a.i for a in dq.attribute if a.name == "axis")
    assert axis == 1  # the head's output channels, on the weight as the MatMul reads it
    # weight entries are keyed by the node and input that read them: one per quantized weight
    assert set(result.plan.weights) == {"lm_head:1", "mlp:1"}
    assert len([i for i in q.graph.initializer if i.name.endswith("_quantized")]) == len(result.plan.weights)


def test_alpha_search_simulates_the_plans_grid():
    """An FP8 plan's α is chosen on the E4M3FN grid, not INT8's: on Gaussian rows, FP8's 3 mantissa
    bits give a relative error near 2^-8 per product, about ten times INT8's at the same range."""
    from onnxq.smoothquant import simulated_error

    rng = np.random.default_rng(0)
    rows = rng.normal(0, 1, (256, 32)).astype(np.float32)
    weight = rng.normal(0, 0.2, (32, 16)).astype(np.float32)
    lo, hi = rows.min(axis=0), rows.max(axis=0)
    fp8 = simulated_error(rows, weight, None, lo, hi, "float8e4m3fn")
    int8 = simulated_error(rows, weight, None, lo, hi, "int8")
    assert 1e-4 < fp8 < 1e-2 and fp8 > 3 * int8


def test_split_outliers_keeps_the_function_and_moves_the_widest_channels_to_float(decoder_case):
    model, calib, evald = decoder_case
    _, plain_plan = smooth_model(model, str(calib), "auto")
    split, plan = smooth_model(model, str(calib), "auto", split_outliers=4)
    groups = [g for g in plan.active() if g.split]
    assert groups, plan.format()
    before = {g.activation: g for g in plain_plan.groups}
    names = {n.name: n for n in split.graph}
    for g in groups:
        assert 1 <= len(g.split) <= 4 and g.inserts_mul  # the side product reads the unscaled tensor
        # what is left to quantize has a narrower range than the best smoothing alone gave
        assert g.amax_after < before[g.activation].amax_after, (g.activation, g.amax_after, before[g.activation].amax_after)
        for c in g.consumers:
            out = names[c].outputs[0]
            add = names[f"{out.name.removesuffix('_split_main')}_SplitAdd"]
            side = add.inputs[1].producer()
            assert side.op_type == "MatMul" and side.inputs[0].producer().op_type == "Gather"
            np.testing.assert_array_equal(side.inputs[0].producer().inputs[1].const_value.numpy(), g.split)
            w = weight_matrix(names[c])  # [C_in, N] as the node reads it
            assert not np.any(w[g.split]) and np.any(w)  # split rows are zero in the quantized product
    assert_same_function(str(model), split, _feeds(evald))
    assert "channels in float" in plan.format()


def test_split_outliers_keeps_graph_output_names(tmp_path):
    model = synthetic.save(synthetic.tied_embedding_lm(), tmp_path / "lm.onnx")
    ids = np.random.default_rng(0).integers(0, 64, (8, 1, 8))
    ids_path = tmp_path / "ids.npz"
    np.savez(ids_path, ids=ids)
    # a fixed α with a split: the channel count comes from the simulation alone
    smoothed, _ = smooth_model(model, str(ids_path), 0.5, split_outliers=2)
    assert [o.name for o in smoothed.graph.outputs] == ["logits"]
    assert smoothed.graph.outputs[0].producer().op_type in ("Add", "MatMul")
    assert_same_function(str(model), smoothed, [{"ids": ids[i]} for i in range(4)])
    result = onnxq.quantize(model, tmp_path / "q.onnx", str(ids_path), smoothquant=0.5, split_outliers=2, quiet=True)
    q = onnx.load(str(result.output))
    assert [o.name for o in q.graph.output] == ["logits"]
    side = [n for n in q.graph.node if n.name.endswith("_SplitMatMul")]
    assert len(side) == sum(len(g.consumers) for g in result.smoothquant.active() if g.split)
    producers = {o: n for n in q.graph.node for o in n.output}
    for n in side:  # the side products stay in float: no DequantizeLinear feeds them
        assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in n.input)


def test_split_outliers_improves_w8a8_on_outlier_channels(tmp_path):
    # 64 samples each: the fixture's 8 evaluation samples are too few to show a 16-token tail
    model = synthetic.save(synthetic.tiny_decoder_block(), tmp_path / "block.onnx")
    calib = synthetic.random_npz(tmp_path / "calib.npz", "x", (1, 16, 32), 64, seed=1)
    evald = synthetic.random_npz(tmp_path / "eval.npz", "x", (1, 16, 32), 64, seed=2)
    snr = {}
    for split in (0, 4):
        r = onnxq.quantize(model, tmp_path / f"q{split}.onnx", str(calib), eval=str(evald), smoothquant="auto", split_outliers=split, method="minmax", quiet=True)
        snr[split] = {a.name: a.snr_db for a in r.accuracy}["logits"]
    assert snr[4] > snr[0] + 2, snr  # measured: 22.8 vs 18.8 dB


@pytest.mark.parametrize("args", [["--split-outliers", "4"], ["--smoothquant", "auto", "--split-outliers", "-1"]])
def test_split_outliers_needs_smoothquant_and_a_count(decoder_case, tmp_path, capsys, args):
    model, calib, _ = decoder_case
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib), *args]) == 2
    err = capsys.readouterr().err
    assert "onnxq: error:" in err and "--split-outliers" in err and not (tmp_path / "q.onnx").exists()


def test_tied_head_read_through_a_transpose_keeps_its_channel_axis(tmp_path):
    """A head that reads the embedding through a Transpose (left unfolded: the embedding is large
    and still read by the Gather) loses the Transpose when SmoothQuant scales its copy; the plan's
    weight axis is the one the MatMul sees, so the scale still runs along the vocabulary."""
    vocab = 256
    model = synthetic.save(synthetic.tied_embedding_lm(vocab=vocab), tmp_path / "lm.onnx")
    ids = np.random.default_rng(0).integers(0, vocab, (8, 1, 8))
    np.savez(tmp_path / "ids.npz", ids=ids)
    plan = place(load_and_preprocess(model), "tensorrt")
    assert plan.weight("lm_head", 1).axis == 1
    result = onnxq.quantize(model, tmp_path / "q.onnx", str(tmp_path / "ids.npz"), smoothquant=0.5, quiet=True)
    assert result.accuracy[0].cosine_mean > 0.99
    q = onnx.load(str(result.output))
    inits = {i.name: i for i in q.graph.initializer}
    by_output = {o: n for n in q.graph.node for o in n.output}
    dq = by_output[next(n for n in q.graph.node if n.name == "lm_head").input[1]]
    assert list(inits[dq.input[1]].dims) == [vocab]
