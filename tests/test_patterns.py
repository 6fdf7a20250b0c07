"""The declared norm-statistic pattern: the spellings exporters use match, look-alikes do not."""

import numpy as np
import onnx_ir as ir
import pytest
import synthetic
from onnx import TensorProto, helper, numpy_helper

from onnxq.passes.preprocess import load_and_preprocess
from onnxq.patterns import norm_statistics, normalized_by


def _graph(tmp_path, nodes, exponent=2.0):
    inits = [numpy_helper.from_array(np.array(exponent, np.float32), "p"), numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return load_and_preprocess(synthetic.save(m, tmp_path / "m.onnx"))


STAT = [
    helper.make_node("Pow", ["x", "p"], ["sq"], name="pow"),
    helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="mean", keepdims=1),
    helper.make_node("Add", ["ms", "eps"], ["mse"], name="add"),
    helper.make_node("Sqrt", ["mse"], ["rms"], name="sqrt"),
]


@pytest.mark.parametrize("tail, reciprocal", [
    ([helper.make_node("Div", ["x", "rms"], ["y"], name="div")], False),
    ([helper.make_node("Reciprocal", ["rms"], ["inv"], name="rcp"), helper.make_node("Mul", ["inv", "x"], ["y"], name="mul")], True),
])
def test_rms_spellings_match(tmp_path, tail, reciprocal):
    model = _graph(tmp_path, STAT + tail)
    (stat,) = norm_statistics(model)
    assert [n.name for n in stat.nodes] == ["pow", "mean", "add", "sqrt"]
    assert (stat.reciprocal is not None) == reciprocal
    y = next(n for n in model.graph if n.name == tail[-1].name).outputs[0]
    assert normalized_by(y, [stat]) and not normalized_by(stat.nodes[0].outputs[0], [stat])


def test_a_cube_is_not_a_norm(tmp_path):
    model = _graph(tmp_path, STAT + [helper.make_node("Div", ["x", "rms"], ["y"], name="div")], exponent=3.0)
    assert norm_statistics(model) == []


def test_real_decoder_norms_are_found(tmp_path):
    """The synthetic decoder's RMSNorm (Div form) and the attention model's (Reciprocal form)."""
    for build in (synthetic.tiny_decoder_block, synthetic.rmsnorm_attention):
        model = load_and_preprocess(synthetic.save(build(), tmp_path / f"{build.__name__}.onnx"))
        stats = norm_statistics(model)
        assert stats and all(isinstance(n, ir.Node) for s in stats for n in s.nodes)
