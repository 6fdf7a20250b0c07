"""Calibration cost against plain inference, and ``quantize --no-eval`` against ORT's quantize_static.

Per model, each column in its own process on the same calibration data:

- FP32 forward: the plain FP32 model run over the calibration samples (one ORT call per sample,
  as the data comes; same intra-op thread count as onnxq's calibration session);
- calibration: onnxq's calibration pass (the ``calibrate`` timing of ``onnxq.quantize``);
- onnxq quantize: the whole ``onnxq.quantize(..., evaluate=False)`` (its process's wall time,
  imports included);
- ORT quantize_static: ``quant_pre_process`` + ``quantize_static`` (MinMax, QDQ, per-channel
  symmetric INT8; its process's wall time; its reader holds the arrays in memory, read once).

Models: the zoo's (``minilm-l6-v2``, ``efficientnet-lite0``, ``smollm2-6l``) and the real-model
benchmark's (``ppocr-cls``, ``ppocr-det``, ``silero-vad``, tools/bench/real_models.py, with its
calibration samples). onnxq runs at its default range method (``--calib-method`` to change it).

    python tools/bench/calib_speed.py [--models minilm-l6-v2 ... silero-vad] [--calib-method mse] [--out calib_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ZOO_MODELS = ("minilm-l6-v2", "efficientnet-lite0", "smollm2-6l")
REAL_MODELS = ("ppocr-cls", "ppocr-det", "silero-vad")


class MemoryReader:
    """ORT's CalibrationDataReader over arrays read once (not an npz member re-read per sample)."""

    def __init__(self, path, ranks=None):
        self.arrays = dict(np.load(path))
        self.n = len(next(iter(self.arrays.values())))
        self.ranks, self.i = ranks or {}, 0

    def get_next(self):
        if self.i >= self.n:
            return None
        feed = {k: (v[self.i : self.i + 1] if v.ndim == self.ranks.get(k, v.ndim) else np.asarray(v[self.i])) for k, v in self.arrays.items()}
        self.i += 1
        return feed


# ------------------------------------------------------------------------------ jobs (children)
def _forward_job(model, calib, _method):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = len(os.sched_getaffinity(0))  # as onnxq's calibration session
    session = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    ranks = {i.name: len(i.shape) for i in session.get_inputs()}
    reader = MemoryReader(calib, ranks)
    feeds = [reader.get_next() for _ in range(reader.n)]
    t = time.perf_counter()
    for feed in feeds:
        session.run(None, feed)
    return {"forward_s": time.perf_counter() - t, "samples": len(feeds)}


def _onnxq_job(model, calib, method):
    import onnxq

    with tempfile.TemporaryDirectory(prefix="onnxq-calspeed-") as tmp:
        result = onnxq.quantize(model, Path(tmp) / "q.onnx", calib, method=None if method == "default" else method, evaluate=False, report=False, quiet=True)
    return {"calibrate_s": result.timings["calibrate"], "quantize_in_process_s": result.timings["total"]}


def _ort_job(model, calib, _method):
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="onnxq-calspeed-") as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        try:
            quant_pre_process(str(model), pre, skip_symbolic_shape=False)
        except Exception:  # noqa: BLE001 - ORT's symbolic shape inference gives up on some exporter outputs
            quant_pre_process(str(model), pre, skip_symbolic_shape=True)
        ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in onnx.load(pre, load_external_data=False).graph.input}
        quantize_static(
            pre, os.path.join(tmp, "q.onnx"), MemoryReader(calib, ranks), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    return {}


JOBS = {"forward": _forward_job, "onnxq": _onnxq_job, "ort": _ort_job}


def job_main(argv):
    kind, model, calib, method = argv
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # ORT's tools print progress
        info = JOBS[kind](model, calib, method)
    print(json.dumps(info), flush=True)


def timed_process(args):
    """Run this script's job ``args`` in a child; its JSON line plus the child's wall time."""
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxq-calspeed-") as cwd:  # ORT's tools may write side files to the cwd
        env = {**os.environ, "ONNXQ_NO_PROGRESS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--job", *args], check=False, capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = proc.stderr.strip().splitlines()
        return {"error": tail[-1][:300] if tail else f"exit {proc.returncode}", "wall_s": wall}
    return {**json.loads(lines[-1]), "wall_s": wall}


# ------------------------------------------------------------------------------ cases
def model_case(name: str, work: Path) -> tuple[str, str]:
    """(model path, calibration .npz) of a zoo or real-model benchmark model."""
    if name in REAL_MODELS:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import real_models

        model, calib, _, _ = real_models.CASES[name]()
        if name == "silero-vad":
            calib = real_models.vad_calibration(model, calib)
        return str(model), str(real_models._save_npz(calib, work / f"{name}.calib.npz"))
    from onnxq import zoo

    case = zoo.export_case(name, work / name)
    return str(case["model"]), str(case["calib"])


def bench(models, method):
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxq-calspeed-") as tmp:
        for name in models:
            model, calib = model_case(name, Path(tmp))
            fwd = timed_process(["forward", model, calib, method])
            cal = timed_process(["onnxq", model, calib, method])
            ort_q = timed_process(["ort", model, calib, method])
            row = {
                "model": name, "samples": fwd.get("samples"), "method": method, "forward_s": fwd.get("forward_s"),
                "calibrate_s": cal.get("calibrate_s"), "onnxq_quantize_s": cal.get("wall_s"), "ort_quantize_s": ort_q.get("wall_s"),
                "load_avg": os.getloadavg()[0], "errors": [r["error"] for r in (fwd, cal, ort_q) if "error" in r],
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def print_table(rows):
    print(f"\n{'model':<20}{'samples':>8}{'FP32 fwd s':>11}{'calib s':>9}{'calib/fwd':>10}{'onnxq q s':>11}{'ORT q s':>9}{'onnxq/ORT':>10}{'load':>6}")
    for r in rows:
        if r["errors"]:
            print(f"{r['model']:<20} error: {r['errors']}")
            continue
        print(
            f"{r['model']:<20}{r['samples']:>8}{r['forward_s']:>11.2f}{r['calibrate_s']:>9.2f}{r['calibrate_s'] / r['forward_s']:>10.2f}"
            f"{r['onnxq_quantize_s']:>11.2f}{r['ort_quantize_s']:>9.2f}{r['onnxq_quantize_s'] / r['ort_quantize_s']:>10.2f}{r['load_avg']:>6.1f}"
        )


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--job":
        return job_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[*ZOO_MODELS, *REAL_MODELS], choices=[*ZOO_MODELS, *REAL_MODELS])
    ap.add_argument("--calib-method", default="default", help="onnxq's range method (default: its default, mse)")
    ap.add_argument("--out", default="calib_speed.json")
    args = ap.parse_args()
    rows = bench(args.models, args.calib_method)
    print_table(rows)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
