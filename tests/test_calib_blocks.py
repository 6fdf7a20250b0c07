"""Block-by-block calibration (--calib-blocks): the cutter finds a decoder's residual boundaries
and the exact set of tensors crossing each cut, and the block runner's table is the whole-model
table (float-rounding close), with boundary tensors in memory or spilled to disk."""

import logging

import numpy as np
import onnx
import pytest
import synthetic
from test_calib_batching import _assert_tables_close
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibration import channel_axes
from onnxq.calibrators import blocks as blocks_mod
from onnxq.calibrators import collect, histogram
from onnxq.calibrators.blocks import plan_blocks, use_calib_blocks
from onnxq.calibrators.reservoir import RowReservoir
from onnxq.data import open_source
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.placement import place
from onnxq.recipe import Recipe, RecipeError
from onnxq.runtime.ort import model_input_spec

SEQ, HIDDEN, FFN, LAYERS = 8, 16, 24, 3


def _rms(prefix: str, x: str, nodes: list, inits: list, rng) -> str:
    inits.append(synthetic._init(f"{prefix}_w", rng.uniform(0.5, 1.5, (HIDDEN,))))
    nodes += [
        helper.make_node("Pow", [x, "two"], [f"{prefix}_sq"], name=f"{prefix}_pow"),
        helper.make_node("ReduceMean", [f"{prefix}_sq"], [f"{prefix}_ms"], name=f"{prefix}_mean", axes=[-1], keepdims=1),
        helper.make_node("Add", [f"{prefix}_ms", "eps"], [f"{prefix}_mse"], name=f"{prefix}_add"),
        helper.make_node("Sqrt", [f"{prefix}_mse"], [f"{prefix}_rms"], name=f"{prefix}_sqrt"),
        helper.make_node("Div", [x, f"{prefix}_rms"], [f"{prefix}_xn"], name=f"{prefix}_div"),
        helper.make_node("Mul", [f"{prefix}_xn", f"{prefix}_w"], [f"{prefix}_out"], name=f"{prefix}_scale"),
    ]
    return f"{prefix}_out"


def _layer(i: int, x: str, nodes: list, inits: list, rng) -> str:
    """Attention with an additive mask (a graph input every layer reads) and, from layer 1 on, a
    rotary-like factor computed in layer 1 from the graph input ``pos`` (read by later blocks only)."""
    p = f"l{i}"
    for w, shape in (("wq", (HIDDEN, HIDDEN)), ("wk", (HIDDEN, HIDDEN)), ("wv", (HIDDEN, HIDDEN)), ("wo", (HIDDEN, HIDDEN)), ("wg", (HIDDEN, FFN)), ("wu", (HIDDEN, FFN)), ("wd", (FFN, HIDDEN))):
        inits.append(synthetic._init(f"{p}_{w}", rng.normal(0, 0.3, shape)))
    hn = _rms(f"{p}_n1", x, nodes, inits, rng)
    nodes += [helper.make_node("MatMul", [hn, f"{p}_wq"], [f"{p}_q0"], name=f"{p}_q_proj")]
    if i == 1:
        nodes.append(helper.make_node("Cos", ["pos"], ["rot"], name="rotary"))
    if i >= 1:
        nodes.append(helper.make_node("Mul", [f"{p}_q0", "rot"], [f"{p}_q"], name=f"{p}_rotate"))
    else:
        nodes.append(helper.make_node("Identity", [f"{p}_q0"], [f"{p}_q"], name=f"{p}_q_id"))
    nodes += [
        helper.make_node("MatMul", [hn, f"{p}_wk"], [f"{p}_k"], name=f"{p}_k_proj"),
        helper.make_node("MatMul", [hn, f"{p}_wv"], [f"{p}_v"], name=f"{p}_v_proj"),
        helper.make_node("Transpose", [f"{p}_k"], [f"{p}_kt"], name=f"{p}_kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", [f"{p}_q", f"{p}_kt"], [f"{p}_s0"], name=f"{p}_qk"),
        helper.make_node("Add", [f"{p}_s0", "mask"], [f"{p}_s"], name=f"{p}_mask"),
        helper.make_node("Softmax", [f"{p}_s"], [f"{p}_pr"], name=f"{p}_softmax", axis=-1),
        helper.make_node("MatMul", [f"{p}_pr", f"{p}_v"], [f"{p}_ctx"], name=f"{p}_pv"),
        helper.make_node("MatMul", [f"{p}_ctx", f"{p}_wo"], [f"{p}_o"], name=f"{p}_o_proj"),
        helper.make_node("Add", [x, f"{p}_o"], [f"{p}_h"], name=f"{p}_res1"),
    ]
    hn2 = _rms(f"{p}_n2", f"{p}_h", nodes, inits, rng)
    nodes += [
        helper.make_node("MatMul", [hn2, f"{p}_wg"], [f"{p}_g"], name=f"{p}_gate_proj"),
        helper.make_node("MatMul", [hn2, f"{p}_wu"], [f"{p}_u"], name=f"{p}_up_proj"),
        helper.make_node("Sigmoid", [f"{p}_g"], [f"{p}_gs"], name=f"{p}_sig"),
        helper.make_node("Mul", [f"{p}_g", f"{p}_gs"], [f"{p}_ga"], name=f"{p}_silu"),
        helper.make_node("Mul", [f"{p}_ga", f"{p}_u"], [f"{p}_m"], name=f"{p}_swiglu"),
        helper.make_node("MatMul", [f"{p}_m", f"{p}_wd"], [f"{p}_d"], name=f"{p}_down_proj"),
        helper.make_node("Add", [f"{p}_h", f"{p}_d"], [f"{p}_out"], name=f"{p}_res2"),
    ]
    return f"{p}_out"


def decoder(layers: int = LAYERS) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [synthetic._init("two", np.array(2.0)), synthetic._init("eps", np.array(1e-6)), synthetic._init("head", rng.normal(0, 0.3, (HIDDEN, 32)))]
    nodes: list = []
    x = "x"
    for i in range(layers):
        x = _layer(i, x, nodes, inits, rng)
    final = _rms("final", x, nodes, inits, rng)
    nodes.append(helper.make_node("MatMul", [final, "head"], ["logits"], name="lm_head"))
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQ, HIDDEN]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", SEQ, SEQ]),
        helper.make_tensor_value_info("pos", TensorProto.FLOAT, ["batch", SEQ, HIDDEN]),
    ]
    graph = helper.make_graph(nodes, "decoder", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", SEQ, 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=synthetic.IR_VERSION)


def _data(path, n: int = 7):
    rng = np.random.default_rng(1)
    mask = np.triu(np.full((SEQ, SEQ), -1e4, np.float32), 1)
    np.savez(
        path, x=rng.normal(0, 1, (n, 1, SEQ, HIDDEN)).astype(np.float32),
        mask=np.broadcast_to(mask, (n, 1, SEQ, SEQ)).copy(), pos=rng.uniform(0, 6, (n, 1, SEQ, HIDDEN)).astype(np.float32),
    )
    return path


def _brute_crossing(model, start: int) -> set[str]:
    """Tensors produced before node ``start`` (or graph inputs) that a node at or after it reads."""
    nodes = list(model.graph)
    before = {v.name for v in model.graph.inputs if v.const_value is None} | {o.name for n in nodes[:start] for o in n.outputs}
    return {v.name for n in nodes[start:] for v in n.inputs if v is not None and v.name in before}


def test_cutter_finds_residual_boundaries_and_exact_crossings(tmp_path):
    model = load_and_preprocess(synthetic.save(decoder(), tmp_path / "dec.onnx"))
    found = plan_blocks(model, 0)
    # two norms per layer and the final one, the first on a graph input (no cut there)
    assert len(found) == 2 * LAYERS + 1
    nodes = list(model.graph)
    for block in found:
        crossing = _brute_crossing(model, block.start)
        read = {v.name for n in nodes[block.start : block.stop] for v in n.inputs if v is not None}
        assert set(block.inputs) == crossing & read
        later = _brute_crossing(model, block.stop) if block.stop < len(nodes) else set()
        produced = {o.name for n in nodes[block.start : block.stop] for o in n.outputs}
        assert set(block.outputs) == later & produced
    # past layer 1, only the residual stream, the mask and the rotary factor cross a cut
    assert max(len(_brute_crossing(model, b.start)) for b in found[3:]) == 3
    assert "rot" in found[-3].inputs and "pos" in found[2].inputs and "pos" not in found[0].inputs
    # a budget merges consecutive pieces
    assert 1 < len(plan_blocks(model, 0)) and len(plan_blocks(model, 1)) == 1


def _table(path, npz, batch, blocks):
    model = load_and_preprocess(path)
    plan = place(model, "tensorrt")
    names = [v.name for n in model.graph if n.op_type in ("MatMul", "Softmax", "Add") for v in n.inputs[:1]]
    names = list(dict.fromkeys(names))
    axes = channel_axes(model, [plan])
    reservoirs = {t: RowReservoir(axes[t], capacity=16) for t in names if t in axes}
    data = open_source(npz, model_input_spec(model))
    with use_calib_blocks(blocks):
        table = collect(model, names, data, progress=False, histograms=True, channel_axes=axes, channel_ranges=set(axes), reservoirs=reservoirs, batch=batch)
    return table, reservoirs


def _assert_same(a, b, res_a, res_b):
    assert res_a.keys() == res_b.keys() and res_a
    _assert_tables_close(a, b, res_a, res_b)


@pytest.mark.parametrize("batch,cap", [(1, None), (3, None), (3, 50)])
def test_block_table_equals_whole_model_table(tmp_path, caplog, monkeypatch, batch, cap):
    """Also with histograms on a subsample (cap: elements per sample), which later blocks must
    take per sample of the batches block 0 ran, as the whole model does."""
    if cap is not None:
        monkeypatch.setattr(histogram, "SAMPLE_ELEMENTS", cap)
    path = synthetic.save(decoder(), tmp_path / "dec.onnx")
    npz = _data(tmp_path / "calib.npz")
    whole, res_whole = _table(path, npz, batch, None)
    with caplog.at_level(logging.INFO, logger="onnxq"):
        by_blocks, res_blocks = _table(path, npz, batch, "auto")
    assert f"calibrating in {2 * LAYERS + 1} blocks" in caplog.text
    assert caplog.text.count("per ORT call") == 1  # block 0's batch size, logged once
    assert whole.num_samples == 7
    if cap is not None:  # the [batch, SEQ, HIDDEN] tensors were subsampled: other counts than in full
        monkeypatch.setattr(histogram, "SAMPLE_ELEMENTS", 1 << 30)
        full, _ = _table(path, npz, batch, None)
        assert cap < SEQ * HIDDEN and any(
            not np.array_equal(t.histogram.counts, full.tensors[n].histogram.counts) for n, t in whole.tensors.items() if t.histogram is not None
        )
    _assert_same(whole, by_blocks, res_whole, res_blocks)


def test_boundary_tensors_spilled_to_disk_give_the_same_table(tmp_path, caplog, monkeypatch):
    path = synthetic.save(decoder(), tmp_path / "dec.onnx")
    npz = _data(tmp_path / "calib.npz")
    whole, res_whole = _table(path, npz, 2, None)
    monkeypatch.setattr(blocks_mod, "available_memory", lambda: 0)
    with caplog.at_level(logging.INFO, logger="onnxq"):
        spilled, res_spilled = _table(path, npz, 2, "auto")
    assert "spilled" in caplog.text
    _assert_same(whole, spilled, res_whole, res_spilled)


def test_model_without_boundaries_is_calibrated_whole(tmp_path, caplog):
    path = synthetic.save(synthetic.residual_cnn(), tmp_path / "cnn.onnx")
    npz = synthetic.random_npz(tmp_path / "calib.npz", "x", (1, 16, 8, 8), 3)
    model = load_and_preprocess(path)
    names = [v.name for n in model.graph if n.op_type == "Conv" for v in n.inputs[:1]]
    with caplog.at_level(logging.INFO, logger="onnxq"), use_calib_blocks("auto"):
        table = collect(model, names, open_source(npz, model_input_spec(model)), progress=False)
    assert "calibrating the whole model at once: no residual boundary" in caplog.text
    assert table.num_samples == 3


def test_quantize_with_blocks_gives_the_whole_model_ranges(tmp_path):
    import onnxq

    path = synthetic.save(decoder(), tmp_path / "dec.onnx")
    npz = _data(tmp_path / "calib.npz")
    whole = onnxq.quantize(path, tmp_path / "a.onnx", npz, calib_method="minmax", evaluate=False, report=False, quiet=True)
    blocked = onnxq.quantize(path, tmp_path / "b.onnx", npz, calib_method="minmax", calib_blocks="auto", evaluate=False, report=False, quiet=True)
    a, b = whole.plan.activations, blocked.plan.activations
    assert a.keys() == b.keys() and a
    for name in a:
        assert b[name].scale == pytest.approx(a[name].scale, rel=1e-5), name


def test_recipe_checks_calib_blocks():
    assert Recipe(calib_blocks="AUTO").validated().calib_blocks == "auto"
    assert Recipe(calib_blocks=512).validated().calib_blocks == "512"
    for bad in ("0", "-3", "big"):
        with pytest.raises(RecipeError, match="calib-blocks"):
            Recipe(calib_blocks=bad).validated()
