"""tools/export_and_build.py on a small torch module: artifacts, manifest, exit codes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the export step needs torch; install onnxq[zoo] (torch==2.13.0 CPU)")

TOOL = Path(__file__).resolve().parents[1] / "tools" / "export_and_build.py"

FACTORIES = Path(__file__).parent / "torch_factories.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("export_and_build", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("eab")
    rng = np.random.default_rng(0)
    np.savez(d / "calib.npz", x=rng.standard_normal((16, 4, 32)).astype(np.float32))
    np.savez(d / "eval.npz", x=rng.standard_normal((8, 4, 32)).astype(np.float32))
    return d


def _args(case, out, factory="mlp", *extra):
    return [f"{FACTORIES}:{factory}", "--input", "x:4x32:float32", "--calib", str(case / "calib.npz"),
            "--eval", str(case / "eval.npz"), "-o", str(out), *extra]


def test_pipeline_writes_every_artifact_and_a_manifest(tool, case, tmp_path):
    out = tmp_path / "build"
    assert tool.main(_args(case, out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passed"] is True
    for name in ("model.onnx", "export.json", "model.int8.onnx", "plan.json", "check.json", "check.md", "check.html",
                 "diff.html", "diff.json", "inspect.json"):
        assert name in manifest["artifacts"], name
    for name, entry in manifest["artifacts"].items():
        data = (out / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    steps = manifest["steps"]
    assert list(steps) == ["export", "quantize", "build", "check", "review"]
    assert steps["export"]["ort_vs_torch_worst_cosine"] > 0.9999
    assert steps["quantize"]["quantized_nodes"] == 2
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert steps["build"]["status"].startswith("skipped: the tensorrt Python package is not installed")
        assert not list(out.glob("*.plan"))
    assert steps["review"]["macs_by_precision"] == {"INT8": 4 * (32 * 64 + 64 * 16)}
    check = json.loads((out / "check.json").read_text())
    assert check["passed"] and check["samples"] == 8
    assert check["candidates"][0]["outputs"][0]["samples"] == 8 and check["thresholds"]["min_cosine"] == 0.95
    assert manifest["versions"]["onnxruntime"] and manifest["options"]["target"] == "tensorrt"


def test_failed_check_exits_1(tool, case, tmp_path):
    out = tmp_path / "strict"
    assert tool.main(_args(case, out, "mlp", "--min-cosine", "1.0")) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passed"] is False and manifest["steps"]["check"]["passed"] is False
    assert "model.int8.onnx" in manifest["artifacts"]


def test_factory_error_exits_2_with_the_reason_in_the_manifest(tool, case, tmp_path, capsys):
    out = tmp_path / "broken"
    assert tool.main(_args(case, out, "broken")) == 2
    assert "raised RuntimeError: checkpoint weights.pt not found" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert "raised RuntimeError" in manifest["error"] and manifest["steps"] == {}
