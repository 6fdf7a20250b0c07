"""Weight-only on the ort target as ONNX Runtime's MatMulNBits (onnxq/passes/matmulnbits.py): the
same outputs as the blocked DequantizeLinear form in ORT (K not a multiple of the block, a Gemm
with a bias, symmetric and asymmetric, 4 and 8 bits), replayed byte for byte, read by layers/diff."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.cli import main
from onnxq.layers import NBITS_OP, graph_layers
from onnxq.recipe import Recipe, RecipeError


def _model(path) -> None:
    """x[3, 72] → MatMul [72, 48] → Gemm (transB, bias) [40, 48] → MatMul [40, 24] (the head):
    no K (72, 48, 40) is a multiple of the block (32)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 1, (72, 48)).astype(np.float32)
    w1[:, 0] = 0.0  # an all-zero column
    w1[:, 1] = np.abs(w1[:, 1])  # one-sided blocks: zero points at the grid's edge
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.normal(0, 0.2, (40, 48)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 1, 40).astype(np.float32), "b2"), numpy_helper.from_array(rng.normal(0, 0.3, (40, 24)).astype(np.float32), "w3")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm"), helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="gemm", transB=1), helper.make_node("MatMul", ["h2", "w3"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 72])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 24])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def _quantize(*argv) -> None:
    assert main(["quantize", *map(str, argv), "--no-eval", "-q"]) == 0


def _run(path, x) -> np.ndarray:
    """Outputs at ORT_ENABLE_BASIC: the DQ form stays unfused (dequantized float weights)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _replay(model, plan: dict, tmp_path, name: str):
    (tmp_path / f"{name}.json").write_text(json.dumps(plan))
    _quantize(model, "-o", tmp_path / f"{name}.onnx", "--plan", tmp_path / f"{name}.json")
    return tmp_path / f"{name}.onnx"


@pytest.mark.parametrize("dtype", ["uint4", "int4", "uint8", "int8"])
def test_matmulnbits_equals_the_dq_form_and_replays(tmp_path, dtype):
    _model(tmp_path / "m.onnx")
    _quantize(tmp_path / "m.onnx", "-o", tmp_path / "first.onnx", "--precision", "w4a16", "--target", "ort", "--block-size", "32",
              "--quantize-head", "--ort-accuracy-level", "0", "--save-plan", tmp_path / "p.json")
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["matmulnbits"] == {"accuracy_level": 0, "accuracy_level_8bit": 4, "nodes": ["mm", "gemm", "head"]}
    plan["matmulnbits"]["accuracy_level_8bit"] = 0  # float compute for both widths: outputs exact
    for entry in plan["weights"].values():  # the plan is the contract: any blocked dtype executes
        entry["dtype"] = dtype
    nbits = _replay(tmp_path / "m.onnx", plan, tmp_path, "nbits")
    dq = _replay(tmp_path / "m.onnx", {k: v for k, v in plan.items() if k != "matmulnbits"}, tmp_path, "dq")
    model = onnx.load(str(nbits))
    fused = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(fused) == 3 and not [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    symmetric = dtype.startswith("int")
    assert all((len(n.input) < 4 or n.input[3] == "") == symmetric for n in fused)  # no zero points: implicit 2^(bits-1)
    assert {a.i for n in fused for a in n.attribute if a.name == "bits"} == {int(dtype[-1])}
    assert {a.i for n in fused for a in n.attribute if a.name == "accuracy_level"} == {0}
    x = np.random.default_rng(1).normal(0, 1, (3, 72)).astype(np.float32)
    want, got = _run(dq, x), _run(nbits, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert _replay(tmp_path / "m.onnx", plan, tmp_path, "again").read_bytes() == nbits.read_bytes()
    # layers read the packed weights back as the DQ form's: same values, precision and MACs
    a, b = graph_layers(str(dq)), graph_layers(str(nbits))
    for name in ("mm", "gemm", "head"):
        la, lb = a.layers[name], b.layers[name]
        assert lb.op_type == NBITS_OP and lb.precision == la.precision == ("INT4" if dtype.endswith("4") else "INT8")
        weight = la.inputs[1].constant if name != "gemm" else la.inputs[1].constant.T  # Gemm transB: [N, K]
        np.testing.assert_array_equal(lb.inputs[1].constant, weight)
        assert lb.macs == la.macs > 0
    assert a.layers_by_precision() == b.layers_by_precision() and a.macs_by_precision() == b.macs_by_precision()


def test_accuracy_level_and_form_options(tmp_path):
    _model(tmp_path / "m.onnx")
    _quantize(tmp_path / "m.onnx", "-o", tmp_path / "d.onnx", "--precision", "w4a16", "--target", "ort", "--save-plan", tmp_path / "p.json")
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["matmulnbits"]["accuracy_level"] == Recipe().ort_accuracy_level and plan["matmulnbits"]["nodes"] == ["mm", "gemm", "head"]
    model = onnx.load(str(tmp_path / "d.onnx"))  # the ort default quantizes the head (8-bit: level 4)
    levels = {n.name: {a.name: a.i for a in n.attribute} for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert [(levels[n]["bits"], levels[n]["accuracy_level"]) for n in ("mm", "gemm", "head")] == [(4, Recipe().ort_accuracy_level)] * 2 + [(8, 4)]
    _quantize(tmp_path / "m.onnx", "-o", tmp_path / "f.onnx", "--precision", "w8a16", "--target", "ort", "--no-quantize-head")
    assert sorted(n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node) == ["MatMul", "MatMulNBits", "MatMulNBits", "Relu"]
    _quantize(tmp_path / "m.onnx", "-o", tmp_path / "t.onnx", "--precision", "w4a16", "--target", "ort", "--ort-weight-form", "dq", "--save-plan", tmp_path / "t.json")
    assert "matmulnbits" not in json.loads((tmp_path / "t.json").read_text())
    with pytest.raises(RecipeError, match="--ort-accuracy-level is for --precision w4a16 / w8a16 on the ort target"):
        Recipe.from_options({"precision": "w4a16", "target": "tensorrt", "ort_accuracy_level": 0})
    assert Recipe.from_options({"precision": "w4a16", "target": "ort"}).quantize_embedding and not Recipe.from_options({"precision": "w4a16"}).quantize_head
    with pytest.raises(RecipeError, match="--ort-accuracy-level takes one of"):
        Recipe.from_options({"precision": "w4a16", "target": "ort", "ort_accuracy_level": 3})
