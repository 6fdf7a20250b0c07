"""Batched calibration (--calib-batch): the table of a batched pass is the one-sample-at-a-time
table (float-rounding close), whatever the batch size; models whose batch axis is fixed, that
refuse a batch or that mix samples across it run one sample per call."""

import logging

import numpy as np
import onnx
import pytest
import synthetic
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibration import channel_axes
from onnxq.calibrators import collect, histogram
from onnxq.calibrators.batching import auto_batch, group
from onnxq.calibrators.reservoir import RowReservoir
from onnxq.data import open_source
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.placement import place
from onnxq.recipe import Recipe, RecipeError
from onnxq.runtime.ort import model_input_spec


def _dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return model


def _decoder(batch_axis_dynamic: bool = True) -> onnx.ModelProto:
    model = synthetic.tiny_decoder_block()
    if batch_axis_dynamic:
        shape = next(i for i in model.graph.initializer if i.name == "flat_shape")
        shape.CopyFrom(numpy_helper.from_array(np.array([-1, 32], dtype=np.int64), "flat_shape"))
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
        for out in model.graph.output:
            out.type.tensor_type.shape.dim[0].dim_param = "rows"
    return model


def _sample_mixing() -> onnx.ModelProto:
    """x[N,8] - mean over the batch axis → MatMul: a sample's values depend on its batch mates."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 1, (8, 4)).astype(np.float32), "w")
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1, name="batch_mean"),
        helper.make_node("Sub", ["x", "mean"], ["centred"], name="centre"),
        helper.make_node("MatMul", ["centred", "w"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes, "mixing", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=synthetic.IR_VERSION)


def _table(path, npz, batch, tensors=None):
    model = load_and_preprocess(path)
    plan = place(model, "tensorrt")
    names = tensors or list(dict.fromkeys(v.name for n in model.graph if n.op_type in ("MatMul", "Gemm", "Conv") for v in n.inputs[:1]))
    axes = channel_axes(model, [plan])
    reservoirs = {t: RowReservoir(axes[t], capacity=16) for t in names if t in axes}
    data = open_source(npz, model_input_spec(model))
    table = collect(
        model, names, data, progress=False, histograms=True, channel_axes=axes, channel_ranges=set(axes), reservoirs=reservoirs, batch=batch,
    )
    return table, reservoirs


def _assert_tables_close(a, b, reservoirs_a, reservoirs_b):
    assert a.num_samples == b.num_samples
    assert a.tensors.keys() == b.tensors.keys()
    for name, sa in a.tensors.items():
        sb = b.tensors[name]
        np.testing.assert_allclose([sa.min, sa.max], [sb.min, sb.max], rtol=1e-5, atol=1e-6, err_msg=name)
        assert sa.histogram.range == sb.histogram.range, name
        # ORT's kernels at another batch size may round an element across a bin edge, no more
        moved = np.abs(sa.histogram.counts - sb.histogram.counts).sum()
        assert moved <= 1e-3 * sa.histogram.total, name
        assert sa.histogram.total == sb.histogram.total, name
        if sa.channel_amax is not None:
            np.testing.assert_allclose(sa.channel_amax, sb.channel_amax, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(sa.channel_min, sb.channel_min, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(sa.channel_max, sb.channel_max, rtol=1e-5, atol=1e-6)
    for name, ra in reservoirs_a.items():
        np.testing.assert_allclose(ra.sample(), reservoirs_b[name].sample(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [2, 4, 16])
def test_batched_table_equals_per_sample_table_cnn(tmp_path, caplog, batch):
    path = synthetic.save(_dynamic_batch(synthetic.residual_cnn()), tmp_path / "cnn.onnx")
    npz = synthetic.random_npz(tmp_path / "calib.npz", "x", (1, 16, 8, 8), 11)
    single, res_single = _table(path, npz, 1)
    with caplog.at_level(logging.INFO, logger="onnxq"):
        batched, res_batched = _table(path, npz, batch)
    assert f"calibration runs {batch} samples per ORT call" in caplog.text
    _assert_tables_close(single, batched, res_single, res_batched)


def test_batched_table_equals_per_sample_table_decoder(tmp_path, caplog):
    path = synthetic.save(_decoder(), tmp_path / "dec.onnx")
    npz = synthetic.random_npz(tmp_path / "calib.npz", "x", (1, 16, 32), 9)
    single, res_single = _table(path, npz, 1)
    with caplog.at_level(logging.INFO, logger="onnxq"):
        batched, res_batched = _table(path, npz, None)  # automatic: all 9 samples fit in one batch
    assert "calibration runs 9 samples per ORT call" in caplog.text
    assert any(len(r.sample()) == 16 for r in res_single.values())  # the reservoirs overflowed
    _assert_tables_close(single, batched, res_single, res_batched)


def test_fixed_batch_axis_runs_one_sample_per_call(tmp_path, caplog):
    path = synthetic.save(synthetic.residual_cnn(), tmp_path / "cnn.onnx")
    npz = synthetic.random_npz(tmp_path / "calib.npz", "x", (1, 16, 8, 8), 5)
    with caplog.at_level(logging.INFO, logger="onnxq"):
        table, _ = _table(path, npz, 8)
    assert "calibration runs 1 sample per ORT call" in caplog.text
    assert table.num_samples == 5


def test_model_refusing_a_batch_runs_one_sample_per_call(tmp_path, caplog):
    """A Reshape to a fixed [seq, hidden] under a dynamic input: ORT fails on a batch of two."""
    model = _decoder(batch_axis_dynamic=False)
    _dynamic_batch(model).graph.output[0].type.tensor_type.shape.dim[0].dim_param = "rows"
    path = synthetic.save(model, tmp_path / "dec.onnx")
    npz = synthetic.random_npz(tmp_path / "calib.npz", "x", (1, 16, 32), 4)
    with caplog.at_level(logging.INFO, logger="onnxq"):
        batched, res_batched = _table(path, npz, 4)
    assert "refuses a batch of two" in caplog.text
    single, res_single = _table(path, npz, 1)
    _assert_tables_close(single, batched, res_single, res_batched)


def test_model_mixing_samples_runs_one_sample_per_call(tmp_path, caplog):
    path = synthetic.save(_sample_mixing(), tmp_path / "mix.onnx")
    npz = synthetic.random_npz(tmp_path / "calib.npz", "x", (1, 8), 6)
    with caplog.at_level(logging.INFO, logger="onnxq"):
        batched, _ = _table(path, npz, 3, tensors=["centred"])
    assert "change when samples share a batch" in caplog.text
    single, _ = _table(path, npz, 1, tensors=["centred"])
    # one sample alone is centred to exactly zero: the per-sample table
    assert batched.tensors["centred"].min == single.tensors["centred"].min == 0.0


def test_reservoir_keeps_the_same_rows_however_rows_are_split():
    rows = np.random.default_rng(3).normal(0, 1, (300, 5)).astype(np.float32)
    whole, split = RowReservoir(axis=-1, capacity=32), RowReservoir(axis=-1, capacity=32)
    whole.update(rows)
    for part in np.array_split(rows, 17):
        split.update(part)
    np.testing.assert_array_equal(whole.sample(), split.sample())


def test_group_starts_a_new_batch_when_shapes_change():
    feeds = [{"x": np.zeros((1, n))} for n in (4, 4, 4, 6, 6, 4)]
    sizes = [[f["x"].shape[1] for f in g] for g in group(feeds, 2)]
    assert sizes == [[4, 4], [4], [6, 6], [4]]


def test_auto_batch_respects_memory_and_sample_count():
    assert auto_batch(1 << 10, 5) == 5
    assert auto_batch(1 << 40, 100) == 1
    assert 1 <= auto_batch(64 << 20, None) <= 16


def test_recipe_checks_calib_batch():
    assert Recipe.from_options({"calib-batch": 8}).calib_batch == 8
    with pytest.raises(RecipeError, match="calib-batch"):
        Recipe.from_options({"calib_batch": 0})


@pytest.mark.parametrize("batch", [2, 4])
def test_subsampled_histograms_do_not_depend_on_the_batch_split(tmp_path, monkeypatch, batch):
    """With at most 100 elements of each sample counted (most of the CNN's tensors have more), the
    batched table is still the one-sample-at-a-time table, and min/max stay exact."""
    path = synthetic.save(_dynamic_batch(synthetic.residual_cnn()), tmp_path / "cnn.onnx")
    npz = synthetic.random_npz(tmp_path / "calib.npz", "x", (1, 16, 8, 8), 11)
    full, _ = _table(path, npz, 1)
    monkeypatch.setattr(histogram, "SAMPLE_ELEMENTS", 100)
    single, res_single = _table(path, npz, 1)
    batched, res_batched = _table(path, npz, batch)
    _assert_tables_close(single, batched, res_single, res_batched)
    subsampled = [n for n, s in single.tensors.items() if not np.array_equal(s.histogram.counts, full.tensors[n].histogram.counts)]
    assert subsampled  # most tensors have more than 100 elements per sample
    for name, stats in single.tensors.items():
        # the stride's elements count stride times, the tail once each: totals are estimates
        assert abs(stats.histogram.total - full.tensors[name].histogram.total) <= 0.1 * full.tensors[name].histogram.total, name
        assert (stats.min, stats.max, stats.histogram.range) == (full.tensors[name].min, full.tensors[name].max, full.tensors[name].histogram.range)


def test_sample_elements_takes_the_same_positions_of_every_sample():
    x = np.random.default_rng(1).normal(size=(6, 3, 50)).astype(np.float32)
    whole = histogram.sample_elements(x, 6, cap=40)
    parts = np.concatenate([histogram.sample_elements(x[i : i + k], k, cap=40) for i, k in ((0, 1), (1, 3), (4, 2))])
    np.testing.assert_array_equal(whole, parts)
    assert whole.shape[0] == 6 and 0 < whole.shape[1] <= 40 and len(np.unique(whole[0])) == whole.shape[1]
    assert histogram.sample_elements(x, 6, cap=150) is x  # small enough: every element


def test_subsampled_histogram_counts_rare_large_values_exactly():
    """A value far above the rest in a few positions of each sample (an attention-sink token's
    outlier channel) is counted every time it occurs, however the stride falls; the rest is
    counted on the stride, each element as many times as the stride, so totals stay close."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (4, 300, 384)).astype(np.float32)
    x[:, 0, 7] = 28.0  # one element per sample, at a position the stride skips
    amax = float(np.abs(x).max())
    full, sampled = histogram.Histogram(), histogram.Histogram()
    full.update(x, amax)
    sampled.update_sampled(x, 4, amax)
    assert full.range == sampled.range
    top = np.flatnonzero(full.counts)[-1]
    assert sampled.counts[top] == full.counts[top] == 4
    assert abs(sampled.total - full.total) < 0.01 * full.total
    # half-open bins: the bulk's shape is kept (each coarse eighth of the range within 2 %)
    coarse_full, coarse_sampled = full.counts.reshape(8, -1).sum(1), sampled.counts.reshape(8, -1).sum(1)
    big = coarse_full > 0.05 * full.total
    np.testing.assert_allclose(coarse_sampled[big], coarse_full[big], rtol=0.02)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_tail_is_every_element_at_least_a_quarter_of_its_samples_largest_magnitude(dtype):
    """Per sample: a largest |x| that is negative, one that is positive, a sample of zeros (all
    of it is the tail) and a NaN (no tail); the same elements as the definition on |x|."""
    rows = np.random.default_rng(2).normal(0, 1, (4, 500)).astype(dtype)
    rows[0, 11], rows[1, 12], rows[2], rows[3, 5] = -30, 30, 0, np.nan
    magnitude = np.abs(rows)
    expected = magnitude >= (histogram.TAIL_FRACTION * magnitude.max(axis=1))[:, None]
    np.testing.assert_array_equal(histogram._tail(rows), expected)
    assert expected[2].all() and not expected[3].any() and 0 < expected[0].sum() < 500
