"""Histogram calibration: onnxq vs ONNX Runtime's calibrators, and accuracy per range method.

Speed/memory (default): calibrate all-MiniLM-L6-v2 with 32, 128 and 512 samples using onnxq
(entropy, percentile, mse: one streaming pass collecting min/max, histograms and per-channel
abs-max, then the ranges) and ORT (``create_calibrator`` with CalibrationMethod.Entropy
(num_bins=2048, num_quantized_bins=128) and Percentile (2048 bins, 99.99, symmetric), on the
inputs and outputs of MatMul/Gemm/Conv, the ops onnxq quantizes). Every job runs in its own
process, so its time and peak RSS are its own; ORT jobs run under an address-space cap
(``--ort-cap-gb``, default 16) so that a calibrator that keeps every activation fails with
"out of memory" instead of thrashing the machine. The zoo gives at most 300 distinct MiniLM
calibration paragraphs; larger sample counts cycle them (memory and time behave the same).

    python tools/bench/calibration_vs_ort.py [--samples 32 128 512] [--out calib_bench.json]

Cost against inference (FP32 forward vs calibration, quantize vs quantize_static per model):
tools/bench/calib_speed.py.

Accuracy (``--accuracy``): for each zoo model, one ``onnxq.calibrate`` pass writes a
table; then every method x target quantizes from that table (INT8) and the zoo's task metric is
measured.

    python tools/bench/calibration_vs_ort.py --accuracy [--models minilm-l6-v2 efficientnet-lite0 smollm2-135m]
                                             [--out calib_accuracy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _rss import peak_rss_mb  # noqa: E402
from calib_speed import MemoryReader  # noqa: E402

ONNXQ_METHODS = ("entropy", "percentile", "mse")
ORT_METHODS = ("Entropy", "Percentile")


# ------------------------------------------------------------------------------ one job (child)
def _job_onnxq(model, calib, method):
    from onnxq.calibrators import collect
    from onnxq.data import open_source
    from onnxq.calibration import activation_tensors, channel_axes, fill_activation_params
    from onnxq.passes.preprocess import load_and_preprocess
    from onnxq.placement import place
    from onnxq.runtime.ort import model_input_spec

    t = time.perf_counter()
    m = load_and_preprocess(model)
    plan = place(m, "tensorrt")
    tensors = activation_tensors(m, plan)
    data = open_source(calib, model_input_spec(m))
    table = collect(m, tensors, data, progress=False, histograms=True, channel_axes=channel_axes(m, [plan]))
    t_collect = time.perf_counter() - t
    t = time.perf_counter()
    fill_activation_params(plan, table, {name: method for name in table.tensors})
    return {"tensors": len(table.tensors), "samples": table.num_samples, "collect_s": t_collect, "ranges_s": time.perf_counter() - t}


def _job_ort(model, calib, method, workdir):
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    opts = {"Entropy": {"num_bins": 2048, "num_quantized_bins": 128, "symmetric": True},
            "Percentile": {"num_bins": 2048, "percentile": 99.99, "symmetric": True}}[method]
    t = time.perf_counter()
    cal = create_calibrator(
        model,
        ["MatMul", "Gemm", "Conv"],
        augmented_model_path=os.path.join(workdir, "augmented.onnx"),
        calibrate_method=getattr(CalibrationMethod, method),
        extra_options=opts,
    )
    reader = MemoryReader(calib)
    cal.collect_data(reader)
    t_collect = time.perf_counter() - t
    t = time.perf_counter()
    ranges = cal.compute_data()
    return {"tensors": len(ranges.data), "samples": reader.n, "collect_s": t_collect, "ranges_s": time.perf_counter() - t}


def job_main(argv):
    tool, model, calib, method, cap_gb = argv
    if tool == "ort" and float(cap_gb) > 0:
        cap = int(float(cap_gb) * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import contextlib
    import io

    t = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # ORT's calibrators print progress
            with tempfile.TemporaryDirectory(prefix="onnxq-calbench-") as tmp:
                info = _job_onnxq(model, calib, method) if tool == "onnxq" else _job_ort(model, calib, method, tmp)
    except MemoryError:
        info = {"error": "failed: out of memory"}
    except Exception as exc:  # ORT reports allocation failures as its own exceptions
        text = f"{type(exc).__name__}: {exc}"
        oom = any(s in text.lower() for s in ("bad_alloc", "memory", "allocat"))
        info = {"error": "failed: out of memory" if oom else text.splitlines()[0][:300]}
    info["seconds"] = time.perf_counter() - t
    info["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(info), flush=True)


def run_job(tool, model, calib, method, cap_gb):
    cmd = [sys.executable, __file__, "--job", tool, str(model), str(calib), method, str(cap_gb)]
    env = {**os.environ, "ONNXQ_NO_PROGRESS": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    if proc.returncode < 0 or "MemoryError" in proc.stderr or "bad_alloc" in proc.stderr:
        return {"error": "failed: out of memory"}
    tail = proc.stderr.strip().splitlines()
    return {"error": tail[-1][:300] if tail else f"exit {proc.returncode}"}


# ------------------------------------------------------------------------------ speed / memory
def minilm_calib(workdir, n):
    from onnxq import zoo

    entry = zoo.get("minilm-l6-v2")
    arrays = entry.calib_data(300)
    have = len(next(iter(arrays.values())))
    idx = np.arange(n) % have
    path = workdir / f"minilm_calib_{n}.npz"
    np.savez(path, **{k: v[idx] for k, v in arrays.items()})
    return entry.onnx_path(), path, have


def bench_speed(samples, cap_gb, tools):
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxq-calbench-") as tmp:
        work = Path(tmp)
        for n in samples:
            model, calib, have = minilm_calib(work, n)
            jobs = [("onnxq", m) for m in ONNXQ_METHODS if "onnxq" in tools] + [("ort", m) for m in ORT_METHODS if "ort" in tools]
            for tool, method in jobs:
                res = run_job(tool, model, calib, method, cap_gb)
                row = {"samples": n, "distinct_samples": min(n, have), "tool": tool, "method": method, **res}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def print_speed(rows):
    print(f"\n{'samples':>7} {'tool':<6} {'method':<11} {'time s':>8} {'collect s':>10} {'ranges s':>9} {'peak RSS MB':>12}  note")
    for r in rows:
        note = r.get("error", "")
        print(
            f"{r['samples']:>7} {r['tool']:<6} {r['method']:<11} {r.get('seconds', float('nan')):>8.1f} "
            f"{r.get('collect_s', float('nan')):>10.1f} {r.get('ranges_s', float('nan')):>9.2f} {r.get('peak_rss_mb', float('nan')):>12.0f}  {note}"
        )
    by = {(r["samples"], r["tool"], r["method"]): r for r in rows}
    for n in sorted({r["samples"] for r in rows}):
        ort = by.get((n, "ort", "Entropy"))
        for m in ONNXQ_METHODS:
            o = by.get((n, "onnxq", m))
            if o and ort and "error" not in ort and "error" not in o:
                print(f"{n} samples: ORT Entropy / onnxq {m}: time x{ort['seconds'] / o['seconds']:.1f}, peak RSS x{ort['peak_rss_mb'] / o['peak_rss_mb']:.1f}")


# ------------------------------------------------------------------------------ accuracy
def bench_accuracy(models, targets, methods):
    from onnxq import zoo
    from onnxq import calibrate, quantize

    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxq-calacc-") as tmp:
        work = Path(tmp)
        for name in models:
            entry = zoo.get(name)
            case = zoo.export_case(name, work / name)
            t = time.perf_counter()
            table = calibrate(case["model"], case["calib"], work / name / "table.json", quiet=True)
            calib_s = time.perf_counter() - t
            fp32 = entry.evaluate(case["model"])
            rows.append({"model": name, "target": "-", "method": "fp32", "metrics": fp32, "calibrate_s": calib_s, "samples": table.num_samples})
            print(json.dumps(rows[-1]), flush=True)
            for target in targets:
                for method in methods:
                    out = work / name / f"{target}.{method}.onnx"
                    t = time.perf_counter()
                    quantize(case["model"], out, table=table, target=target, method=method, evaluate=False, report=False, quiet=True)
                    q_s = time.perf_counter() - t
                    row = {"model": name, "target": target, "method": method, "metrics": entry.evaluate(out), "quantize_s": q_s}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    out.unlink()
                    for extra in out.parent.glob(out.name + ".data"):
                        extra.unlink()
    return rows


def print_accuracy(rows):
    keys = {}
    for r in rows:
        keys.setdefault(r["model"], [k for k in r["metrics"] if not (k.endswith("_fp32") and k[:-5] in r["metrics"]) and not k.startswith("n_") and k != "seq_len"])
    for model, ks in keys.items():
        print(f"\n{model}")
        print(f"{'target':<10}{'method':<12}" + "".join(f"{k:>18}" for k in ks))
        for r in rows:
            if r["model"] != model:
                continue
            m = r["metrics"]
            print(f"{r['target']:<10}{r['method']:<12}" + "".join(f"{m.get(k, float('nan')):>18.4f}" if isinstance(m.get(k), (int, float)) else f"{'-':>18}" for k in ks))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--job":
        return job_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--tools", nargs="+", default=["onnxq", "ort"], choices=["onnxq", "ort"])
    ap.add_argument("--ort-cap-gb", type=float, default=16.0, help="address-space cap of each ORT job (0: none)")
    ap.add_argument("--accuracy", action="store_true", help="accuracy per method on zoo models instead of speed")
    ap.add_argument("--models", nargs="+", default=["minilm-l6-v2", "efficientnet-lite0", "smollm2-135m"])
    ap.add_argument("--targets", nargs="+", default=["tensorrt", "ort"])
    ap.add_argument("--methods", nargs="+", default=["minmax", "percentile", "entropy", "mse"])
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.accuracy:
        rows = bench_accuracy(args.models, args.targets, args.methods)
        print_accuracy(rows)
        out = args.out or "calib_accuracy.json"
    else:
        rows = bench_speed(args.samples, args.ort_cap_gb, args.tools)
        print_speed(rows)
        out = args.out or "calib_bench.json"
    Path(out).write_text(json.dumps({"rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
