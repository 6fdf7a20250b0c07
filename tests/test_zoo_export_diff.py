"""A zoo model from its PyTorch definition through tools/export_and_build.py, then onnxq diff on it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.zoo
pytest.importorskip("torch", reason="the model zoo exports PyTorch models; install onnxq[zoo] (torch==2.13.0 CPU)")

from onnxq.cli import main  # noqa: E402
from onnxq.diff import diff  # noqa: E402
from onnxq.pipeline import quantize  # noqa: E402
from onnxq.plan import QuantPlan  # noqa: E402

TOOL = Path(__file__).resolve().parents[1] / "tools" / "export_and_build.py"
NAME = "efficientnet-lite0"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("export_and_build", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path_factory.mktemp("eab") / NAME
    code = tool.main(["--zoo", NAME, "-o", str(out), "--calib-samples", "8", "--eval-samples", "8"])
    return code, out


def test_zoo_model_goes_through_export_and_build(built):
    code, out = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert code == 0 and manifest["passed"] is True
    assert manifest["steps"]["export"]["factory"] == "onnxq.zoo.efficientnet:torch_module"
    assert manifest["steps"]["export"]["ort_vs_torch_worst_cosine"] > 0.9999
    for name in ("model.onnx", "model.int8.onnx", "plan.json", "model.int8.report.json", "check.json",
                 "diff.html", "calib.npz", "eval.npz"):
        assert name in manifest["artifacts"]
    check = json.loads((out / "check.json").read_text())
    outputs = check["candidates"][0]["outputs"]
    assert check["passed"] and outputs[0]["samples"] == 8 and outputs[0]["cosine_mean"] >= 0.95


def test_zoo_fp32_vs_int8_lists_every_quantized_layer_with_scales(built):
    _, out = built
    plan = QuantPlan.load(out / "plan.json")
    result = diff(out / "model.onnx", out / "model.int8.onnx")
    assert not result.equivalent
    by_b = {c.name_b: c for c in result.layers if c.b is not None}
    quantized = plan.quantized_nodes()
    assert len(quantized) > 50
    for name, decision in quantized.items():
        change = by_b[name]
        assert change.status != "same" and change.b.precision == "INT8"
        quant = {i.index: i.quant for i in change.b.inputs if i.quant is not None}
        assert set(quant) == set(decision.inputs)
        for index, kind in decision.inputs.items():
            q = quant[index]
            assert q.kind == kind and q.dtype == "INT8" and np.all(np.asarray(q.scale) > 0)
            if kind == "activation":
                assert float(q.scale) == pytest.approx(plan.activations[q.source].scale, rel=1e-6)
            else:  # per output channel
                assert q.axis == 0 and np.asarray(q.scale).size == change.b.inputs[index].constant.shape[0]
    macs = result.summary["macs_by_precision"]
    assert sum(macs["a"].values()) == sum(macs["b"].values()) and macs["b"]["INT8"] > 0


def test_zoo_quantized_twice_with_the_same_data_is_no_difference(built, tmp_path, capsys):
    _, out = built
    again = tmp_path / "again.int8.onnx"
    quantize(out / "model.onnx", again, out / "calib.npz", calib_samples=8, quiet=True, report=False, evaluate=False)
    assert main(["diff", str(out / "model.int8.onnx"), str(again)]) == 0
    assert "equivalent" in capsys.readouterr().out


def _int8_to_fp8(src: Path, dst: Path) -> None:
    """The same Q/DQ placement in FP8 E4M3: zero points float8 zeros, scales x 127/448, weights re-encoded.

    FP8 quantization is not onnxq's yet; this gives diff a real model's FP8 Q/DQ graph to read.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(src)
    inits = {i.name: i for i in model.graph.initializer}
    zero_points, scales, weights = set(), set(), set()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scales.add(node.input[1])
            zero_points.add(node.input[2])
            if node.op_type == "DequantizeLinear" and node.input[0] in inits:
                weights.add(node.input[0])
    ratio = np.float32(127.0 / 448.0)
    for name in scales:
        inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]) * ratio, name))
    for name in zero_points | weights:
        arr = numpy_helper.to_array(inits[name]).astype(np.float32)
        vals = arr / ratio if name in weights else np.zeros_like(arr)
        inits[name].CopyFrom(helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, arr.shape, vals.ravel().tolist()))
    for vi in model.graph.value_info:  # Q outputs were typed int8
        if vi.type.tensor_type.elem_type == TensorProto.INT8:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT8E4M3FN
    onnx.checker.check_model(model)
    onnx.save(model, dst)


def test_zoo_fp32_vs_fp8_lists_every_quantized_layer_with_scales(built, tmp_path):
    _, out = built
    fp8 = tmp_path / "model.fp8.onnx"
    _int8_to_fp8(out / "model.int8.onnx", fp8)
    plan = QuantPlan.load(out / "plan.json")
    int8 = {c.name_b: c for c in diff(out / "model.onnx", out / "model.int8.onnx").layers if c.b is not None}
    result = diff(out / "model.onnx", fp8)
    by_b = {c.name_b: c for c in result.layers if c.b is not None}
    for name in plan.quantized_nodes():
        change = by_b[name]
        assert change.status == "changed" and (change.a.precision, change.b.precision) == ("FP32", "FP8")
        for i8, f8 in zip(int8[name].b.inputs, change.b.inputs):
            assert (i8.quant is None) == (f8.quant is None)
            if f8.quant is not None:
                assert f8.quant.dtype == "FLOAT8E4M3FN" and f8.quant.axis == i8.quant.axis
                np.testing.assert_allclose(f8.quant.scale, np.asarray(i8.quant.scale) * np.float32(127 / 448), rtol=1e-6)
    macs = result.summary["macs_by_precision"]["b"]
    assert macs["FP8"] == diff(out / "model.onnx", out / "model.int8.onnx").summary["macs_by_precision"]["b"]["INT8"]
