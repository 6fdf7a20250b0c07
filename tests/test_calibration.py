"""Streaming MinMax calibration: exact ranges, model left as it was, no activation kept."""

import numpy as np
import onnx_ir as ir

import synthetic
from onnxq.calibrators import collect
from onnxq.calibrators.collector import augment_with_reductions
from onnxq.passes import preprocess
from onnxq.runtime.ort import create_session


def _typed(proto):
    # calibration runs on preprocessed models, where shape inference typed every value
    return preprocess(ir.from_proto(proto))


def test_ranges_equal_numpy_over_all_samples(tmp_path):
    proto = synthetic.tiny_attention()
    model = _typed(proto)
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.normal(0, 1 + i, (1, 16, 32)).astype(np.float32)} for i in range(6)]
    tensors = ["x", "q", "probs", "ctx"]
    table = collect(model, tensors, feeds, progress=False)
    assert table.num_samples == 6
    # reference: the same tensors as plain graph outputs, reduced in numpy
    wanted = ir.from_proto(proto)
    values = {v.name: v for n in wanted.graph for v in n.outputs}
    wanted.graph.outputs[:] = [values[t] for t in tensors[1:]]
    sess = create_session(wanted)
    outs = [[f["x"], *sess.run(None, f)] for f in feeds]
    for i, name in enumerate(tensors):
        lo = min(float(o[i].min()) for o in outs)
        hi = max(float(o[i].max()) for o in outs)
        assert table.tensors[name].min == np.float32(lo)
        assert table.tensors[name].max == np.float32(hi)
    assert table.tensors["probs"].min >= 0 and table.tensors["probs"].max <= 1


def test_augmenting_leaves_the_model_as_it_was():
    model = _typed(synthetic.tiny_attention())
    before = ir.to_proto(model).SerializeToString()
    proto, observed = augment_with_reductions(model, ["q", "k", "x"])
    assert observed == ["q", "k", "x"]
    assert len(proto.graph.output) == 6 and all(o.name.endswith(("onnxq_min", "onnxq_max")) for o in proto.graph.output)
    assert ir.to_proto(model).SerializeToString() == before


def test_non_float_tensors_are_skipped():
    model = _typed(synthetic.tied_embedding_lm(vocab=16, hidden=8, seq=4))
    rng = np.random.default_rng(0)
    feeds = [{"ids": rng.integers(0, 16, (1, 4)).astype(np.int64)} for _ in range(3)]
    table = collect(model, ["ids", "h0"], feeds, progress=False)
    assert list(table.tensors) == ["h0"]
