"""Block-by-block calibration (--calib-blocks): the cutter finds a decoder's residual boundaries
and the exact set of tensors crossing each cut, and the block runner's table is the whole-model
table (float-rounding close), with boundary tensors in memory or spilled to disk."""

import logging

import numpy as np
import onnx
import pytest
import synthetic
from llama_synthetic import llama_decoder
from test_calib_batching import _assert_tables_close

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

SEQ, HIDDEN, LAYERS = 8, 16, 3


def decoder(layers: int = LAYERS) -> onnx.ModelProto:
    """The synthetic Llama with its embeddings, an additive mask (read by every layer) and a
    rotary-like factor's input ``pos`` as graph inputs; the factor ``rot`` is computed in layer 1
    and read by every later layer (a tensor crossing cuts it was not produced next to)."""
    return llama_decoder(
        hidden=HIDDEN, layers=layers, heads=2, kv_heads=1, vocab=32, seq=SEQ,
        embeddings_input=True, mask_input=True, rotary_input=True, batch="batch",
    )


def _data(path, n: int = 7):
    rng = np.random.default_rng(1)
    mask = np.triu(np.full((SEQ, SEQ), -1e4, np.float32), 1)
    np.savez(
        path, x=rng.normal(0, 1, (n, 1, SEQ, HIDDEN)).astype(np.float32),
        mask=np.broadcast_to(mask, (n, 1, 1, SEQ, SEQ)).copy(), pos=rng.uniform(0, 6, (n, 1, SEQ, HIDDEN)).astype(np.float32),
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
