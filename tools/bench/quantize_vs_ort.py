"""onnxq vs ONNX Runtime's quantize_static on the zoo models, same model and data.

For each model and target (tensorrt: symmetric INT8 activations; ort: UINT8 activations), both
tools quantize with MinMax ranges and per-channel symmetric INT8 weights in QDQ format, each in
its own process (time and peak RSS are that process's). Then each result is evaluated with the
zoo's task metric and timed in ORT on the CPU (median of repeated runs on one eval sample).

    python tools/bench/quantize_vs_ort.py [--models minilm-l6-v2 ...] [--targets tensorrt ort]
                                          [--out bench.json]

Prints a table and writes JSON. Also: --calib-memory runs onnxq calibration of MiniLM with 32 and
512 samples and prints the peak-RSS ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def run_job(tool, model, out, calib, target, n=None):
    cmd = [sys.executable, str(HERE / "_job.py"), tool, str(model), str(out), str(calib), target, str(n or "all")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "ONNXQ_NO_PROGRESS": "1"})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def latency_ms(model_path, feed, runs=20):
    from onnxq.runtime.ort import create_session

    sess = create_session(model_path)
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def count_qdq(path):
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return sum(n.op_type == "QuantizeLinear" for n in m.graph.node), sum(n.op_type == "DequantizeLinear" for n in m.graph.node)


def bench_model(name, targets, workdir, calib_n, eval_n):
    from onnxq import zoo

    entry = zoo.get(name)
    case = zoo.export_case(name, workdir / name, n_calib=calib_n, n_eval=eval_n)
    eval_arrays = np.load(case["eval"])
    feed = {k: eval_arrays[k][0:1] for k in eval_arrays.files}
    rows = []
    fp32 = entry.evaluate(case["model"], n=eval_n)
    rows.append({"model": name, "tool": "fp32", "target": "-", "metrics": fp32, "latency_ms": latency_ms(case["model"], feed)})
    for target in targets:
        for tool in ("onnxq", "ort"):
            out = workdir / name / f"{tool}.{target}.onnx"
            job = run_job(tool, case["model"], out, case["calib"], target)
            row = {"model": name, "tool": tool, "target": target, **job}
            if "error" not in job:
                row["metrics"] = entry.evaluate(out, n=eval_n)
                row["latency_ms"] = latency_ms(out, feed)
                row["q_nodes"], row["dq_nodes"] = count_qdq(out)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def calib_memory(workdir, sizes=(32, 512)):
    from onnxq import zoo

    name = "minilm-l6-v2"
    entry = zoo.get(name)
    model = entry.onnx_path()
    results = {}
    for n in sizes:
        arrays = entry.calib_data(None)
        have = len(next(iter(arrays.values())))
        # cycle the calibration documents when n exceeds them: memory behaviour is what is measured
        idx = np.arange(n) % have
        path = workdir / f"minilm_calib_{n}.npz"
        np.savez(path, **{k: v[idx] for k, v in arrays.items()})
        results[n] = run_job("onnxq", model, workdir / f"minilm_{n}.onnx", path, "tensorrt")
        print(f"calibration with {n} samples: {results[n]}", flush=True)
    lo, hi = results[sizes[0]]["peak_rss_mb"], results[sizes[-1]]["peak_rss_mb"]
    return {"samples": list(sizes), "runs": results, "peak_rss_ratio": hi / lo}


# The metrics worth a column, per zoo model (the JSON keeps them all).
KEY_METRICS = {
    "minilm-l6-v2": ("cosine_vs_fp32", "spearman"),
    "efficientnet-lite0": ("top1", "top1_agreement", "logit_cosine"),
    "smollm2-6l": ("top1_agreement", "kl"),
    "smollm2-135m": ("perplexity", "top1_agreement", "kl"),
}


def print_table(rows):
    width = max([7] + [len(r["tool"]) + 1 for r in rows])  # competitor names (modelopt-int8) are longer
    for model in dict.fromkeys(r["model"] for r in rows):
        keys = KEY_METRICS.get(model) or tuple(sorted({k for r in rows if r["model"] == model for k in r.get("metrics", {})}))
        print(f"\n{model}")
        print(f"  {'tool':<{width}}{'target':<10}{'time s':>8}{'RSS MB':>8}{'lat ms':>9}{'Q/DQ':>11}" + "".join(f"{k:>16}" for k in keys))
        for r in (r for r in rows if r["model"] == model):
            m = r.get("metrics", {})
            qdq = f"{r['q_nodes']}/{r['dq_nodes']}" if "q_nodes" in r else "-"
            line = f"  {r['tool']:<{width}}{r['target']:<10}{r.get('seconds', float('nan')):>8.1f}{r.get('peak_rss_mb', float('nan')):>8.0f}{r.get('latency_ms', float('nan')):>9.2f}{qdq:>11}"
            line += "".join(f"{m[k]:>16.4f}" if isinstance(m.get(k), (int, float)) else f"{'-':>16}" for k in keys)
            if "error" in r:
                line += f"  ERROR: {r['error']}"
            print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["minilm-l6-v2", "efficientnet-lite0", "smollm2-6l", "smollm2-135m"])
    ap.add_argument("--targets", nargs="+", default=["tensorrt", "ort"])
    ap.add_argument("--calib-samples", type=int)
    ap.add_argument("--eval-samples", type=int)
    ap.add_argument("--calib-memory", action="store_true", help="also measure calibration peak RSS at 32 and 512 MiniLM samples")
    ap.add_argument("--out", default="bench_quantize_vs_ort.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnxq-bench-") as tmp:
        work = Path(tmp)
        rows = []
        for name in args.models:
            rows += bench_model(name, args.targets, work, args.calib_samples, args.eval_samples)
        result = {"rows": rows}
        if args.calib_memory:
            result["calib_memory"] = calib_memory(work)
    print_table(rows)
    if "calib_memory" in result:
        cm = result["calib_memory"]
        print(f"calibration peak RSS, {cm['samples'][0]} vs {cm['samples'][1]} MiniLM samples: ratio {cm['peak_rss_ratio']:.3f}")
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
