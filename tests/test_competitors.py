"""The competitor runners (tools/bench/competitors): clear errors without the venv, real runs with it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import synthetic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools" / "bench" / "competitors"))
import runners  # noqa: E402

from onnxq.errors import OnnxqError  # noqa: E402
from onnxq.runtime.ort import create_session  # noqa: E402


@pytest.fixture(scope="module")
def attention_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("competitors")
    model = synthetic.save(synthetic.tiny_attention(opset=19), d / "model.onnx")
    calib = synthetic.random_npz(d / "calib.npz", "x", (1, 16, 32), 8)
    return model, calib, d


def test_missing_venv_names_the_setup_command(attention_case, tmp_path):
    model, calib, _ = attention_case
    with pytest.raises(runners.CompetitorError) as err:
        runners.run_modelopt(model, calib, tmp_path / "out.onnx", venv=tmp_path / "absent")
    assert isinstance(err.value, OnnxqError)
    assert "setup_env.py" in str(err.value) and str(tmp_path / "absent") in str(err.value)
    assert not (tmp_path / "out.onnx").exists()


def test_venv_without_the_package_says_what_cannot_be_imported(attention_case, tmp_path):
    model, calib, _ = attention_case
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tmp_path / "venv" / "bin" / "python")  # a python without INC
    with pytest.raises(runners.CompetitorError, match="cannot import onnx_neural_compressor"):
        runners.run_inc_smoothquant(model, calib, tmp_path / "out.onnx", venv=tmp_path / "venv")


def test_unknown_modelopt_precision_is_refused(attention_case, tmp_path):
    model, calib, _ = attention_case
    with pytest.raises(runners.CompetitorError, match="int8, fp8 or int4"):
        runners.run_modelopt(model, calib, tmp_path / "out.onnx", precision="nvfp4")


def _bench_venv_has(module):
    python = runners.bench_venv() / "bin" / "python"
    if not python.exists():
        return False
    import subprocess

    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


needs_modelopt = pytest.mark.skipif(
    not _bench_venv_has("modelopt.onnx.quantization"),
    reason=f"no ModelOpt in the competitor venv {runners.bench_venv()} (python tools/bench/competitors/setup_env.py)",
)


@needs_modelopt
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_modelopt_quantizes_on_cpu(attention_case, precision):
    model, calib, d = attention_case
    out = d / f"modelopt.{precision}.onnx"
    result = runners.run_modelopt(model, calib, out, precision)
    assert Path(result["output"]) == out and result["seconds"] > 0 and result["peak_rss_mb"] > 0
    proto = onnx.load(out)
    quantized_types = {
        i.data_type
        for i in proto.graph.initializer
        if any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] == i.name for n in proto.graph.node)
    }
    want = onnx.TensorProto.INT8 if precision == "int8" else onnx.TensorProto.FLOAT8E4M3FN
    assert quantized_types == {want}
    x = np.load(calib)["x"][:1]
    ref = create_session(model).run(None, {"x": x})[0]
    got = create_session(out).run(None, {"x": x})[0]
    cos = float(np.dot(ref.ravel(), got.ravel()) / (np.linalg.norm(ref) * np.linalg.norm(got)))
    assert 0.98 < cos < 1.0  # quantized (not identical), and close
