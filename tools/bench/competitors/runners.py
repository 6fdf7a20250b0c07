"""Run onnxq's competitors on the same ONNX model and calibration data, each in its own process.

    from runners import run_modelopt, run_inc_smoothquant, run_ort
    run_modelopt("model.onnx", "calib.npz", "modelopt.fp8.onnx", precision="fp8")
    -> {"output": "modelopt.fp8.onnx", "seconds": 41.2, "peak_rss_mb": 1890.0}

ModelOpt and INC run with the python of the competitor venv (tools/bench/competitors/setup_env.py),
so their pins (onnx, onnxruntime) never meet onnxq's imports; ORT's quantize_static runs with
onnxq's own python, as tools/bench/quantize_vs_ort.py runs it. Calibration arrays are the zoo's
calib.npz (one array per input, leading axis = samples), fed one sample per step to every tool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from onnxq.errors import OnnxqError

HERE = Path(__file__).resolve().parent
SETUP = HERE / "setup_env.py"


class CompetitorError(OnnxqError):
    """A competitor is not installed, or failed on the model."""


def bench_venv() -> Path:
    """$ONNXQ_BENCH_VENV or ~/.cache/onnxq/bench-venv (what setup_env.py creates by default)."""
    return Path(os.environ.get("ONNXQ_BENCH_VENV") or Path.home() / ".cache" / "onnxq" / "bench-venv").expanduser()


def _python(venv, module: str, install: str) -> Path:
    venv = Path(venv).expanduser() if venv else bench_venv()
    python = venv / "bin" / "python"
    setup = f"python {SETUP} --venv {venv} --only {install}"
    if not python.exists():
        raise CompetitorError(f"the competitor venv {venv} does not exist; create it with: {setup}")
    probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True)
    if probe.returncode != 0:
        last = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else f"exit {probe.returncode}"
        raise CompetitorError(f"{venv} cannot import {module} ({last}); install it with: {setup}")
    return python


def _run(cmd, output, env=None) -> dict:
    # in the output's folder: ORT's symbolic shape inference leaves temporary files in the cwd
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=Path(output).parent)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise CompetitorError(
            f"{Path(cmd[1]).name} {cmd[2]} failed on {cmd[3]}: {lines[-1] if lines else f'exit {proc.returncode}'}"
            + ("\n" + "\n".join(lines[-15:]) if len(lines) > 1 else "")
        )
    return {"output": str(output), **json.loads(proc.stdout.strip().splitlines()[-1])}


def _worker(tool, python, model_path, calib_npz, output_path, options) -> dict:
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(python), str(HERE / "_worker.py"), tool, *(str(Path(p).resolve()) for p in (model_path, output_path, calib_npz)), json.dumps(options)]
    return _run(cmd, output_path)


def run_modelopt(
    model_path,
    calib_npz,
    output_path,
    precision: str = "int8",
    *,
    calib_samples: int | None = None,
    calibration_method: str | None = None,
    high_precision: str = "fp32",
    block_size: int = 128,
    venv=None,
) -> dict:
    """NVIDIA ModelOpt's ONNX PTQ (``modelopt.onnx.quantization.quantize``) calibrated on the CPU EP.

    precision: "int8" or "fp8" (ModelOpt's FP8 takes the INT8 calibration ranges and rescales
    them by 448/127), or "int4": weight-only INT4 (W4A16), MatMul weights as symmetric blocked
    INT4 DequantizeLinear (opset 21) of ``block_size``, activations float. calibration_method:
    None for ModelOpt's default (entropy for int8 and fp8, awq_clip for int4), "max" (int8/fp8),
    or for int4 "awq_clip", "awq_lite", "awq_full", "rtn_dq". high_precision: "fp32" keeps the
    unquantized ops in FP32, so the comparison is of quantization alone; "fp16" is ModelOpt's own
    default (ops outside Q/DQ converted to FP16; int4 keeps the model's float type either way).
    """
    if precision not in ("int8", "fp8", "int4"):
        raise CompetitorError(f"ModelOpt precision must be int8, fp8 or int4, got {precision!r}")
    python = _python(venv, "modelopt.onnx.quantization", "modelopt")
    options = {"precision": precision, "calib_samples": calib_samples, "calibration_method": calibration_method, "high_precision": high_precision, "block_size": block_size}
    return _worker("modelopt", python, model_path, calib_npz, output_path, options)


def run_inc_smoothquant(model_path, calib_npz, output_path, *, alpha: float = 0.5, calib_samples: int | None = None, venv=None) -> dict:
    """Intel Neural Compressor's ONNX SmoothQuant (onnx-neural-compressor), then W8A8 static QDQ.

    Symmetric INT8 activations, per-channel symmetric INT8 weights, MinMax ranges; alpha is the
    migration strength of all layers.
    """
    python = _python(venv, "onnx_neural_compressor.quantization", "inc")
    return _worker("inc-smoothquant", python, model_path, calib_npz, output_path, {"alpha": alpha, "calib_samples": calib_samples})


def run_ort(model_path, calib_npz, output_path, *, target: str = "tensorrt", calib_samples: int | None = None) -> dict:
    """ONNX Runtime's quantize_static, exactly as tools/bench/quantize_vs_ort.py runs it (MinMax, QDQ)."""
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    paths = (str(Path(p).resolve()) for p in (model_path, output_path, calib_npz))
    cmd = [sys.executable, str(HERE.parent / "_job.py"), "ort", *paths, target, str(calib_samples or "all")]
    return _run(cmd, output_path, env={"ONNXQ_NO_PROGRESS": "1"})
