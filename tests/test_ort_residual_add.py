"""ORT target: a residual Add between quantized tensors is quantized too, so ONNX Runtime's CPU
provider fuses it into QLinearAdd (ORT's quantize_static does the same)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxq.pipeline import quantize
from tests.synthetic import IR_VERSION, random_npz, save


def residual_block() -> onnx.ModelProto:
    """x[1,16,8,8] → Conv 1×1 → Relu → Conv 3×3 → (+ x) → Conv 1×1 → y."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n)
        for n, s in (("w1", (32, 16, 1, 1)), ("w2", (16, 32, 3, 3)), ("w3", (16, 16, 1, 1)), ("b1", (32,)), ("b2", (16,)), ("b3", (16,)))
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "x"], ["res"], name="residual"),
        helper.make_node("Conv", ["res", "w3", "b3"], ["y"], name="c3"),
    ]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def test_residual_add_is_quantized_and_fuses_into_qlinearadd(tmp_path):
    path = save(residual_block(), tmp_path / "res.onnx")
    calib = random_npz(tmp_path / "calib.npz", "x", (1, 16, 8, 8), 8)
    out = tmp_path / "q.onnx"
    result = quantize(path, out, calib, target="ort", report=False, evaluate=False, quiet=True)
    assert result.plan.nodes["residual"].quantized and "res" in result.plan.outputs
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)
    assert ops["QLinearAdd"] == 1 and ops["Add"] == 0, ops
