"""ORT target: a classifier-head Gemm (batch 1, GEMV-like) is quantized with its bias as int32 at
activation scale × weight scale, so ONNX Runtime's CPU provider runs it as QGemm on INT8 weights
(ORT's quantize_static does the same); with a float bias ORT leaves a float Gemm."""

from __future__ import annotations

import collections
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq import modelio
from onnxq.errors import PlanError
from onnxq.mixed_precision.candidates import assemble_plan, qdq_proto
from onnxq.mixed_precision.ranges import calibrate_ranges
from onnxq.mixed_precision.sweep import sweep
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.pipeline import quantize
from onnxq.placement import place
from onnxq.plan import QUANTIZED_PRECISIONS, QuantPlan
from tests.synthetic import IR_VERSION, random_npz, save


def classifier(beta: float = 1.0) -> onnx.ModelProto:
    """x[1,16,8,8] → Conv 3×3 → Relu → GlobalAveragePool → Flatten → Gemm(transB, bias) → y[1,40]."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (32, 16, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (32,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (40, 32)).astype(np.float32), "head_w"),
        numpy_helper.from_array(rng.normal(0, 0.5, (40,)).astype(np.float32), "head_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["y"], name="head", transB=1, beta=beta),
    ]
    graph = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 40])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def _ort_ops(model_path, tmp_path) -> collections.Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_head_gemm_gets_an_int32_bias_and_runs_as_qgemm(tmp_path):
    path = save(classifier(), tmp_path / "cls.onnx")
    calib = random_npz(tmp_path / "calib.npz", "x", (1, 16, 8, 8), 8)
    out = tmp_path / "q.onnx"
    result = quantize(path, out, calib, target="ort", report=False, evaluate=False, quiet=True)
    assert result.plan.nodes["head"].inputs == {0: "activation", 1: "weight", 2: "bias"}

    model = onnx.load(out)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    head = next(n for n in model.graph.node if n.name == "head")
    bias_dq = next(n for n in model.graph.node if n.output[0] == head.input[2])
    assert bias_dq.op_type == "DequantizeLinear" and inits[bias_dq.input[0]].dtype == np.int32
    # the bias's grid is the accumulator's: activation scale × weight scale, channel by channel
    act_dq, w_dq = (next(n for n in model.graph.node if n.output[0] == head.input[i]) for i in (0, 1))
    expected = inits[act_dq.input[1]].astype(np.float64) * inits[w_dq.input[1]].astype(np.float64)
    np.testing.assert_allclose(inits[bias_dq.input[1]], expected, rtol=1e-6)
    dequantized = inits[bias_dq.input[0]] * inits[bias_dq.input[1]].astype(np.float64)
    b = numpy_helper.to_array(classifier().graph.initializer[3])
    assert np.all(np.abs(dequantized - b) <= expected / 2 + 1e-9)

    ops = _ort_ops(out, tmp_path)
    assert ops["QGemm"] == 1 and ops["Gemm"] == 0, ops
    x = np.random.default_rng(1).normal(0, 1, (1, 16, 8, 8)).astype(np.float32)
    ref, got = _run(path, x), _run(out, x)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05

    # the same plan with a float bias: ORT keeps a float Gemm (why the bias is int32)
    plan = QuantPlan.from_json(result.plan.to_json())
    del plan.nodes["head"].inputs[2]
    float_bias = tmp_path / "float_bias.onnx"
    quantize(path, float_bias, plan=plan, report=False, evaluate=False, quiet=True)
    assert _ort_ops(float_bias, tmp_path)["QGemm"] == 0


def test_gemm_with_beta_other_than_one_keeps_its_float_bias(tmp_path):
    path = save(classifier(beta=0.5), tmp_path / "cls.onnx")
    calib = random_npz(tmp_path / "calib.npz", "x", (1, 16, 8, 8), 4)
    result = quantize(path, tmp_path / "q.onnx", calib, target="ort", report=False, evaluate=False, quiet=True)
    assert 2 not in result.plan.nodes["head"].inputs


def test_tensorrt_target_keeps_the_head_float(tmp_path):
    path = save(classifier(), tmp_path / "cls.onnx")
    calib = random_npz(tmp_path / "calib.npz", "x", (1, 16, 8, 8), 4)
    result = quantize(path, tmp_path / "q.onnx", calib, target="tensorrt", report=False, evaluate=False, quiet=True)
    assert not result.plan.nodes["head"].quantized


def _bias_producer(proto: onnx.ModelProto) -> str:
    """What the head Gemm reads as its bias: "float" (the initializer) or the op producing it."""
    head = next(n for n in proto.graph.node if n.name == "head")
    producer = next((n for n in proto.graph.node if head.input[2] in n.output), None)
    return "float" if producer is None else producer.op_type


def test_an_int32_bias_is_decided_for_int8_nodes_only(tmp_path):
    """The solver's candidates, plan.set_precision and the sweep's twins decide a node's inputs
    at its precision: an FP8 node's decision has no ``bias`` input (its bias stays float); the
    Q/DQ pass executes the plan and refuses a ``bias`` input on a node that is not int8."""
    path = save(classifier(), tmp_path / "cls.onnx")
    calib = random_npz(tmp_path / "calib.npz", "x", (1, 16, 8, 8), 8)
    model = load_and_preprocess(path)
    base = place(model, "ort")
    assert base.nodes["head"].inputs[2] == "bias"
    feeds = [{"x": x[None]} for x in np.load(calib)["x"]]
    ranges = calibrate_ranges(model, base, feeds, QUANTIZED_PRECISIONS)
    float_proto = modelio.to_proto(model)
    for precision, bias in (("int8", "DequantizeLinear"), ("fp8", "float")):
        plan = assemble_plan(model, base, {"c1": "int8", "head": precision}, ranges)
        assert ("bias" in plan.nodes["head"].inputs.values()) == (precision == "int8")
        assert _bias_producer(qdq_proto(float_proto, plan)) == bias
    assert assemble_plan(model, base, {"c1": "int8"}, ranges).nodes["head"].inputs[2] == "bias"  # float keeps it
    promoted = QuantPlan.from_json(base.to_json())
    promoted.set_precision("head", "fp8")
    assert "bias" not in promoted.nodes["head"].inputs.values()
    bad = assemble_plan(model, base, {"c1": "int8", "head": "fp8"}, ranges)
    bad.nodes["head"].inputs[2] = "bias"
    with pytest.raises(PlanError, match="only an int8 node"):
        qdq_proto(float_proto, bad)
    # a plan file that still gives the FP8 node its bias (written before this rule) reads as it now is
    old_file = QuantPlan.from_json(bad.to_json())
    assert "bias" not in old_file.nodes["head"].inputs.values()
    assert _bias_producer(qdq_proto(float_proto, old_file)) == "float"
    # the local sweep's FP8 twin of the head is built from the same rule (the pass would refuse it)
    result = sweep(path, calib, eval=calib, mode="local", target="ort", plot=False, quiet=True)
    head_layer = next(layer.name for layer in result.layers if "head" in layer.nodes)
    assert all(math.isfinite(result.local[head_layer][p]["snr_db"]) for p in QUANTIZED_PRECISIONS)
