"""Weight-only INT4/INT8 (W4A16, W8A16) on the zoo's SmolLM2: onnxq next to ONNX Runtime's
MatMulNBitsQuantizer on the same model and data, in one process.

    python tools/bench/weight_only.py [--models smollm2-6l smollm2-135m] [--blocks 128 64]
        [--methods rtn awq gptq awq+gptq gptq-noact] [--calib-samples N] [--eval-samples N] [--latency-runs N] [--rows REGEX] [--out bench.json]
        [--competitors modelopt-awq_clip modelopt-rtn_dq]
    python tools/bench/weight_only.py --prefill [--models smollm2-135m] [--rounds 7] [--no-metrics] [--rows REGEX]

Rows per model and block size: FP32; onnxq ``--precision w4a16`` per method, ort target
(asymmetric UINT4 MatMulNBits at accuracy level 1, its defaults) and tensorrt target
(symmetric INT4 blocked DequantizeLinear), with the LM head float (passed explicitly: the ort
target's default quantizes it) and quantized (``--quantize-head``, "+head", INT8 by default),
and the embedding too (``--quantize-embedding``, "+emb": no float copy of the tied table left;
"+head4 +emb4": both INT4, ``--head-bits 4``);
onnxq w4a8 (INT4 weights, FP8 activations; tensorrt target) next to onnxq fp8 (W8A8); onnxq w8a16;
ORT's ``MatMulNBitsQuantizer`` (RTN symmetric and asymmetric, HQQ, GPTQ with act-order on the
same calibration windows; it skips the tied head, whose weight is a Transpose of the embedding,
not an initializer); with ``--competitors``, NVIDIA ModelOpt's ONNX INT4 weight-only
(``modelopt.onnx.quantization.quantize(quantize_mode="int4", calibration_method=...)``: symmetric
blocked INT4 DequantizeLinear, the tied head float as ORT's) run in the competitor venv
(tools/bench/competitors/setup_env.py) on the same calib.npz. A method ending in ``-noact`` is GPTQ with ``gptq_act_order=False``; ``gptq-s0.25`` is GPTQ with ``--int8-share 0.25``. Columns: the zoo metric (6 layers:
next-token top-1 agreement and KL vs FP32; full model: perplexity), file bytes and their ratio
to FP32, and ORT CPU latency (one thread, median of ``--latency-runs``) for a 1-token forward
and a full window, with the ratio to FP32 and to ORT's own MatMulNBits model.

``--prefill``: the ort target's form and MatMulNBits accuracy level (RTN, block 128): FP32; onnxq
``--ort-accuracy-level`` 0, 1, 2, 4 and ``--ort-weight-form dq`` (ORT fuses it at level 4), each
with the head float and with ``--quantize-head --quantize-embedding`` ("+head +emb"); ORT's
``MatMulNBitsQuantizer`` (symmetric RTN) at accuracy level 0 (its default) and 4. Latency of a
1-token and a full-window forward (one thread; pin the process with ``taskset -c N``), timed in
``--rounds`` interleaved rounds (every session once per round, the order reversed every other
round, so load that changes reaches all rows alike), median; ratios to FP32 and to ORT's model at
level 0. The zoo metric (perplexity) per row unless ``--no-metrics``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

# One BLAS thread unless told otherwise: on a loaded machine OpenBLAS's spinning worker threads made
# GPTQ's 576-wide Cholesky take 1.4 s instead of 10 ms (set before numpy loads OpenBLAS).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "competitors"))
import runners  # noqa: E402


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def quantize_onnxq(case, out, *, precision, target, block, method, head=False, embedding=False, head_bits=8, calib_n=None):
    import onnxq

    options = {"weight_method": method} if method != "rtn" else {}
    if method.endswith("-noact"):  # GPTQ without act-order
        options = {"weight_method": method.removesuffix("-noact"), "gptq_act_order": False}
    if "-s" in method:  # gptq-s0.25: --int8-share 0.25
        base, share = method.split("-s")
        options = {"weight_method": base, "int8_share": float(share)}
    t = time.perf_counter()
    calib = case["calib"] if method != "rtn" or precision not in ("w4a16", "w8a16") else None
    onnxq.quantize(case["model"], out, calib, precision=precision, target=target, block_size=block,
                   quantize_head=head, quantize_embedding=embedding, head_bits=head_bits, calib_samples=calib_n, report=False, evaluate=False, quiet=True, **options)
    return time.perf_counter() - t


class NpzReader:
    """ORT's CalibrationDataReader over a zoo ``calib.npz`` (one feed per sample; iterable
    again from the start, as ORT's GPTQ iterates it)."""

    def __init__(self, path: Path):
        data = np.load(path)
        self.samples = [{k: np.atleast_2d(data[k][i]) for k in data.files} for i in range(len(data[data.files[0]]))]
        self.feeds = iter(self.samples)

    def get_next(self):
        return next(self.feeds, None)

    def rewind(self):
        self.feeds = iter(self.samples)

    def __iter__(self):
        return iter(self.samples)


def ort_config(case, algo: str, block: int, symmetric: bool):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if algo == "hqq":
        return mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=4)
    if algo == "gptq":
        return mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=NpzReader(case["calib"]), block_size=block, actorder=True)
    return mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric)


def quantize_ort(case, out, *, block, symmetric, algo="default"):
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    t = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(onnx.load(str(case["model"])), algo_config=ort_config(case, algo, block, symmetric))
    quantizer.process()
    onnx.save(quantizer.model.model, str(out))
    return time.perf_counter() - t


def quantize_modelopt(case, out, *, block, method, calib_n=None):
    """ModelOpt INT4 weight-only in the competitor venv; the seconds are its worker process's."""
    return runners.run_modelopt(case["model"], case["calib"], out, "int4", calibration_method=method, block_size=block, calib_samples=calib_n)["seconds"]


def latency_ms(path: Path, ids: np.ndarray, runs: int) -> dict[str, float]:
    """Median forward time (ms) for one token and for the whole window, one ORT thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = {}
    for label, feed in (("1 token", ids[:, :1]), (f"{ids.shape[1]} tokens", ids)):
        session.run(None, {"input_ids": feed})
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            session.run(None, {"input_ids": feed})
            times.append((time.perf_counter() - t) * 1e3)
        out[label] = statistics.median(times)
    return out


def variants(model: str, blocks, methods, competitors=()):
    """(label, kind, options) of every row after FP32."""
    rows = []
    for block in blocks:
        for method in methods:
            rows.append((f"onnxq w4a16 {method} ort b{block}", "onnxq", {"precision": "w4a16", "target": "ort", "block": block, "method": method}))
            rows.append((f"onnxq w4a16 {method} tensorrt b{block}", "onnxq", {"precision": "w4a16", "target": "tensorrt", "block": block, "method": method}))
            rows.append((f"onnxq w4a16 {method} ort b{block} +head", "onnxq", {"precision": "w4a16", "target": "ort", "block": block, "method": method, "head": True}))
            rows.append((f"onnxq w4a16 {method} ort b{block} +head +emb", "onnxq", {"precision": "w4a16", "target": "ort", "block": block, "method": method, "head": True, "embedding": True}))
            rows.append((f"onnxq w4a16 {method} ort b{block} +head4 +emb4", "onnxq", {"precision": "w4a16", "target": "ort", "block": block, "method": method, "head": True, "embedding": True, "head_bits": 4}))
            rows.append((f"onnxq w4a8 {method} tensorrt b{block}", "onnxq", {"precision": "w4a8", "target": "tensorrt", "block": block, "method": method}))
        rows.append((f"ORT MatMulNBits RTN sym b{block}", "ort", {"block": block, "symmetric": True}))
        rows.append((f"ORT MatMulNBits RTN asym b{block}", "ort", {"block": block, "symmetric": False}))
        rows.append((f"ORT MatMulNBits HQQ b{block}", "ort", {"block": block, "symmetric": False, "algo": "hqq"}))
        rows.append((f"ORT MatMulNBits GPTQ b{block}", "ort", {"block": block, "symmetric": False, "algo": "gptq"}))
        for tool in competitors:  # modelopt-awq_clip -> ModelOpt int4 calibration_method awq_clip
            rows.append((f"ModelOpt int4 {tool.removeprefix('modelopt-')} b{block}", "modelopt", {"block": block, "method": tool.removeprefix("modelopt-")}))
    rows.append(("onnxq w8a16 rtn ort b128 +head", "onnxq", {"precision": "w8a16", "target": "ort", "block": 128, "method": "rtn", "head": True}))
    rows.append(("onnxq fp8 (W8A8 FP8) tensorrt", "onnxq", {"precision": "fp8", "target": "tensorrt", "block": 128, "method": "rtn"}))
    return rows


def bench_model(name, blocks, methods, calib_n, eval_n, runs, work: Path, only: str | None = None, competitors=()) -> list[dict]:
    from onnxq import zoo

    entry = zoo.get(name)
    case = zoo.export_case(name, work / name, n_calib=calib_n, n_eval=eval_n)
    ids = entry.eval_data(1)["input_ids"]
    rows = [{"model": name, "row": "FP32", "path": case["model"], "seconds": 0.0}]
    for i, (label, kind, opts) in enumerate(variants(name, blocks, methods, competitors)):
        if only and not re.search(only, label):
            continue
        out = work / name / f"v{i}.onnx"
        try:
            if kind == "onnxq":
                seconds = quantize_onnxq(case, out, precision=opts["precision"], target=opts["target"], block=opts["block"], method=opts["method"], head=opts.get("head", False),
                                         embedding=opts.get("embedding", False), head_bits=opts.get("head_bits", 8), calib_n=calib_n)
            elif kind == "modelopt":
                seconds = quantize_modelopt(case, out, block=opts["block"], method=opts["method"], calib_n=calib_n)
            else:
                seconds = quantize_ort(case, out, block=opts["block"], symmetric=opts["symmetric"], algo=opts.get("algo", "default"))
            rows.append({"model": name, "row": label, "path": out, "seconds": seconds})
        except Exception as exc:  # a tool that cannot run gives a row that says why
            rows.append({"model": name, "row": label, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"})
        print(f"{name}: {label} done", file=sys.stderr, flush=True)
    for row in rows:
        if "path" in row:
            row["metrics"] = entry.evaluate(str(row["path"]), str(case["model"]), n=eval_n)
            row["bytes"] = file_bytes(Path(row["path"]))
    # latency interleaved by round so drift hits every row alike
    timed = [r for r in rows if "path" in r]
    for r in timed:
        r["latency_ms"] = latency_ms(Path(r["path"]), ids, runs)
    return rows


PREFILL_LEVELS = (0, 1, 2, 4)


def prefill_variants() -> list[tuple[str, str, dict]]:
    """(label, kind, options) of ``--prefill``'s rows after FP32."""
    rows = []
    for quantized, suffix in ((False, " (head, table float)"), (True, " +head +emb")):
        extra = {"quantize_head": quantized, "quantize_embedding": quantized}
        rows += [(f"onnxq MatMulNBits acc{level}{suffix}", "onnxq", {"ort_accuracy_level": level, **extra}) for level in PREFILL_LEVELS]
        rows.append((f"onnxq DQ (ORT fuses, acc4){suffix}", "onnxq", {"ort_weight_form": "dq", **extra}))
    rows += [(f"ORT MatMulNBits sym acc{level}", "ort", {"accuracy_level": level}) for level in (0, 4)]
    return rows


def quantize_prefill_row(case, out: Path, kind: str, options: dict) -> float:
    """Write one ``--prefill`` row's model (RTN, block 128); returns the seconds it took."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    import onnxq

    t = time.perf_counter()
    if kind == "onnxq":
        onnxq.quantize(case["model"], out, None, precision="w4a16", target="ort", block_size=128, report=False, evaluate=False, quiet=True, **options)
    else:
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, accuracy_level=options["accuracy_level"])
        quantizer = mnq.MatMulNBitsQuantizer(onnx.load(str(case["model"])), algo_config=config)
        quantizer.process()
        onnx.save(quantizer.model.model, str(out))
    return time.perf_counter() - t


def interleaved_latency_ms(paths: list[Path], ids: np.ndarray, rounds: int) -> list[dict[str, float]]:
    """Per model, the median ms of a 1-token and a full-window forward (one thread) over
    ``rounds`` rounds; each round runs every session once (10 times for 1 token), the order
    reversed every other round."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]
    feeds = {"1 token": (ids[:, :1], 10), f"{ids.shape[1]} tokens": (ids, 1)}
    times: list[dict[str, list[float]]] = [{label: [] for label in feeds} for _ in sessions]
    for session in sessions:
        for feed, _ in feeds.values():
            session.run(None, {"input_ids": feed})
    for r in range(rounds):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            for label, (feed, reps) in feeds.items():
                t = time.perf_counter()
                for _ in range(reps):
                    sessions[i].run(None, {"input_ids": feed})
                times[i][label].append((time.perf_counter() - t) * 1e3 / reps)
    return [{label: statistics.median(v) for label, v in per.items()} for per in times]


def bench_prefill(name: str, rounds: int, metrics: bool, eval_n, work: Path, only: str | None = None) -> list[dict]:
    """``--prefill``'s rows for zoo model ``name`` (those whose label matches ``only``, and
    FP32 and ORT's level-0 model, the references)."""
    from onnxq import zoo

    entry = zoo.get(name)
    case = zoo.export_case(name, work / name, n_eval=eval_n)
    rows = [{"model": name, "row": "FP32", "path": case["model"], "seconds": 0.0}]
    for i, (label, kind, options) in enumerate(prefill_variants()):
        if only and not re.search(only, label) and label != "ORT MatMulNBits sym acc0":
            continue
        out = work / name / f"p{i}.onnx"
        rows.append({"model": name, "row": label, "path": out, "seconds": quantize_prefill_row(case, out, kind, options)})
        print(f"{name}: {label} written", file=sys.stderr, flush=True)
    for row in rows:
        row["bytes"] = file_bytes(Path(row["path"]))
        row["metrics"] = entry.evaluate(str(row["path"]), str(case["model"]), n=eval_n) if metrics else {}
    latencies = interleaved_latency_ms([Path(r["path"]) for r in rows], entry.eval_data(1)["input_ids"], rounds)
    for row, latency in zip(rows, latencies, strict=True):
        row["latency_ms"] = latency
    return rows


def print_prefill_table(rows: list[dict]) -> None:
    fp32 = rows[0]
    ort_ref = next(r for r in rows if r["row"] == "ORT MatMulNBits sym acc0")
    keys = list(fp32["latency_ms"])
    metric = next(iter(fp32["metrics"]), None) and ("perplexity" if "perplexity" in fp32["metrics"] else "top1_agreement")
    print(f"\n{fp32['model']} (ratios: × FP32, × ORT MatMulNBits sym acc0)")
    head = f"| {'variant':<34} | " + (f"{metric} | " if metric else "") + "× FP32 bytes | " + " | ".join(f"{k} ms (× FP32, × ORT acc0)" for k in keys) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        lat = " | ".join(f"{r['latency_ms'][k]:.2f} ({r['latency_ms'][k] / fp32['latency_ms'][k]:.2f}, {r['latency_ms'][k] / ort_ref['latency_ms'][k]:.2f})" for k in keys)
        quality = f"{r['metrics'][metric]:.3f} | " if metric else ""
        print(f"| {r['row']:<34} | {quality}{r['bytes'] / fp32['bytes']:.3f} | {lat} |")


def print_table(rows: list[dict]) -> None:
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    for model, group in by_model.items():
        fp32 = group[0]
        ort_ref = next((r for r in group if r["row"].startswith("ORT MatMulNBits RTN sym") and "latency_ms" in r), None)
        metric = "perplexity" if "perplexity" in fp32["metrics"] else "top1_agreement"
        lat_keys = list(fp32["latency_ms"])
        print(f"\n{model}")
        head = f"| {'variant':<42} | {metric} | KL | MB | × FP32 bytes | " + " | ".join(f"{k} ms (× FP32, × ORT)" for k in lat_keys) + " | quantize s |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for r in group:
            if "error" in r:
                print(f"| {r['row']:<42} | failed: {r['error']} |")
                continue
            m = r["metrics"]
            lat = " | ".join(
                f"{r['latency_ms'][k]:.2f} ({r['latency_ms'][k] / fp32['latency_ms'][k]:.2f}, {r['latency_ms'][k] / ort_ref['latency_ms'][k]:.2f})" if ort_ref else f"{r['latency_ms'][k]:.2f}"
                for k in lat_keys
            )
            print(f"| {r['row']:<42} | {m[metric]:.4f} | {m['kl']:.4f} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / fp32['bytes']:.3f} | {lat} | {r['seconds']:.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-6l"])
    ap.add_argument("--blocks", nargs="+", type=int, default=[128])
    ap.add_argument("--methods", nargs="+", default=["rtn"])
    ap.add_argument("--calib-samples", type=int)
    ap.add_argument("--eval-samples", type=int)
    ap.add_argument("--latency-runs", type=int, default=20)
    ap.add_argument("--rows", metavar="REGEX", help="only the variants whose label matches (FP32 always runs)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--prefill", action="store_true", help="the ort target's MatMulNBits accuracy levels and DQ form against ORT's model, 1 token and a full window")
    ap.add_argument("--rounds", type=int, default=7, help="--prefill: interleaved latency rounds")
    ap.add_argument("--no-metrics", action="store_true", help="--prefill: latency and bytes only")
    ap.add_argument("--competitors", nargs="+", default=[], choices=["modelopt-awq_clip", "modelopt-awq_lite", "modelopt-rtn_dq"],
                    help="ModelOpt INT4 rows (needs the competitor venv: tools/bench/competitors/setup_env.py --only modelopt)")
    args = ap.parse_args()
    if args.prefill:
        with tempfile.TemporaryDirectory(prefix="onnxq-prefill-") as tmp:
            for name in args.models:
                rows = bench_prefill(name, args.rounds, not args.no_metrics, args.eval_samples, Path(tmp), args.rows)
                print_prefill_table(rows)
                if args.out:
                    args.out.write_text(json.dumps([{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in rows], indent=1))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxq-wonly-") as tmp:
        for name in args.models:
            rows += bench_model(name, args.blocks, args.methods, args.calib_samples, args.eval_samples, args.latency_runs, Path(tmp), args.rows, args.competitors)
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps([{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
