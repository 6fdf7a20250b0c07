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
    assert check["outputs"][0]["samples"] == 8 and check["outputs"][0]["cosine_mean"] >= 0.95


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
