"""Dynamic INT8 quantization (``onnxq quantize --target ort --dynamic``) next to ONNX Runtime's
``quantize_dynamic`` (per tensor, its default, and per channel) on the same zoo model, in one process.

    python tools/bench/dynamic.py [--models minilm-l6-v2 smollm2-6l] [--eval-samples N] [--runs N]

Columns: the zoo metric (MiniLM: embedding cosine vs FP32 and Spearman; SmolLM2: next-token
agreement and KL), file MB, the ORT CPU latency (one thread, median over the evaluation samples
run one at a time, ``--runs`` rounds, every model in turn per sample) with its ratio to FP32 and to quantize_dynamic, and how many
``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat`` nodes ORT's optimized graph holds (its fused kernels).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def fused_kernels(path: Path, tmp: Path) -> int:
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp / (path.stem + ".opt.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    return sum(op in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat") for op in ops)


def latencies_ms(paths: list[Path], feeds: list[dict], runs: int) -> list[float]:
    """Median latency of each model, timed in interleaved rounds: every feed runs on every model
    in turn (order reversed every other time), so load changes reach all models alike."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]
    for session in sessions:
        session.run(None, feeds[0])
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for i in range(runs * len(feeds)):
        for k in order if i % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            sessions[k].run(None, feeds[i % len(feeds)])
            times[k].append((time.perf_counter() - t) * 1e3)
    return [statistics.median(t) for t in times]


def bench(name: str, eval_n: int | None, runs: int, work: Path) -> list[dict]:
    import onnxq
    from onnxq import zoo
    from onnxruntime.quantization import QuantType, quantize_dynamic

    entry = zoo.get(name)
    fp32 = entry.onnx_path()
    rows = [{"row": "FP32", "path": fp32, "seconds": 0.0}]
    for label, make in (
        ("onnxq --dynamic", lambda out: onnxq.quantize(fp32, out, target="ort", precision="int8", dynamic=True, report=False, evaluate=False, quiet=True)),
        ("ORT quantize_dynamic (per tensor)", lambda out: quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)),
        ("ORT quantize_dynamic per_channel", lambda out: quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)),
    ):
        out = work / f"{name}-{len(rows)}.onnx"
        t = time.perf_counter()
        make(out)
        rows.append({"row": label, "path": out, "seconds": time.perf_counter() - t})
    data = entry.eval_data(eval_n)
    feeds = [{k: v[i : i + 1] for k, v in data.items()} for i in range(len(next(iter(data.values()))))]
    for r in rows:
        r["metrics"] = entry.evaluate(str(r["path"]), str(fp32), n=eval_n)
        r["mb"] = Path(r["path"]).stat().st_size / 1e6
        r["fused"] = fused_kernels(Path(r["path"]), work)
    for r, ms in zip(rows, latencies_ms([Path(r["path"]) for r in rows], feeds, runs)):
        r["latency_ms"] = ms
    return rows


def print_table(name: str, rows: list[dict]) -> None:
    fp32, ort_ref = rows[0], rows[2]
    keys = [k for k in rows[0]["metrics"] if isinstance(rows[0]["metrics"][k], float)]
    print(f"\n{name}")
    print("| variant | " + " | ".join(keys) + " | MB | latency ms (× FP32, × quantize_dynamic) | fused kernels | quantize s |")
    print("|---|" + "---|" * (len(keys) + 4))
    for r in rows:
        lat = r["latency_ms"]
        cells = " | ".join(f"{r['metrics'][k]:.4f}" for k in keys)
        print(f"| {r['row']} | {cells} | {r['mb']:.1f} | {lat:.2f} ({lat / fp32['latency_ms']:.2f}, {lat / ort_ref['latency_ms']:.2f}) | {r['fused']} | {r['seconds']:.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm-l6-v2"])
    ap.add_argument("--eval-samples", type=int)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnxq-dynamic-") as tmp:
        for name in args.models:
            print_table(name, bench(name, args.eval_samples, args.runs, Path(tmp)))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
