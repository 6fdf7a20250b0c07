"""All-8-bit accuracy with the residual stream rotated (``--rotate``) or not, with and without
SmoothQuant, INT8 and FP8, next to ORT quantize_static in the same run, on the zoo's SmolLM2.

    python tools/bench/rotation.py [--models smollm2-6l smollm2-135m] [--precisions int8 fp8]
        [--rotate off on on+64] [--smoothquant none auto auto+16] [--methods minmax mse]
        [--attention-probs int8 fp8 float unnormalized] [--weight-method rtn gptq] [--calib-samples N] [--eval-samples N] [--tools onnxq ort]
        [--out bench.json]

Rows per model: FP32; onnxq per (precision, range method, SmoothQuant setting — ``auto+16`` is
``--smoothquant auto --split-outliers 16`` —, rotation: ``on+64`` is ``--rotate
--rotate-online 64``, ``--weight-method`` rtn or gptq, and ``--attention-probs``: attention's P·V at INT8, FP8, float, or INT8 on unnormalized exp(s - rowmax)), every
MatMul/Gemm quantized (the
``tensorrt`` target's placement); ORT quantize_static (QDQ, MinMax, per-channel symmetric INT8
weights, symmetric INT8 activations; its own process through tools/bench/_job.py).
Metrics are the zoo's: SmolLM2 6-layer next-token top-1 agreement and KL vs FP32, SmolLM2-135M
perplexity. Also printed: the largest |activation| entering the norms' readers (Q/K/V, gate/up,
LM head) and the MLP down projections on the first evaluation window, float model, rotation off
and on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quantize_vs_ort import KEY_METRICS, run_job  # noqa: E402


def _smoothing(label: str):
    """(α, split channels) of a --smoothquant column label: none, auto, 0.5, auto+16."""
    if label == "none":
        return None, 0
    alpha, _, split = label.partition("+")
    return (alpha if alpha == "auto" else float(alpha)), int(split or 0)


def quantize_onnxq(case, out, precision, method, label, rotate, calib_n=None, attention_probs="int8", weight_method="rtn"):
    import onnxq

    alpha, split = _smoothing(label)
    rotate, _, online = rotate.partition("+")
    t = time.perf_counter()
    onnxq.quantize(
        case["model"], out, case["calib"], target="tensorrt", precision=precision, method=method, smoothquant=alpha,
        split_outliers=split, rotate=rotate == "on", rotate_online=int(online or 0), calib_samples=calib_n, attention_probs=attention_probs, weight_method=weight_method, report=False, evaluate=False, quiet=True,
    )
    return {"seconds": round(time.perf_counter() - t, 1)}


def activation_amax(model_path, ids):
    """{"readers": max |x| over the norms' readers' inputs, "writers": over o_proj/down_proj inputs} of the
    float model, rotation off and on, on ``ids`` (one window)."""
    import onnx

    from onnxq import emit, modelio
    from onnxq.passes.preprocess import load_and_preprocess
    from onnxq.plan import QuantPlan
    from onnxq.rotation import find_residual_stream
    from onnxq.runtime import ort as ort_rt

    model = load_and_preprocess(model_path)
    plan = QuantPlan(target="tensorrt")
    plan.rotation = find_residual_stream(model)
    readers = {r for n in plan.rotation.norms for r in n.readers}
    result = {}
    for state in ("off", "on"):
        if state == "on":
            emit.emit(model, plan, ["rotate"])
        proto = modelio.to_proto(model)
        tensors = {"readers": sorted({n.input[0] for n in proto.graph.node if n.name in readers}),
                   "writers": sorted({n.input[0] for n in proto.graph.node if n.name in plan.rotation.writers})}
        names = [t for group in tensors.values() for t in group]
        proto.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in names)
        values = dict(zip(names, ort_rt.create_session(proto).run(names, {"input_ids": ids})[-len(names):] if names else []))
        result[state] = {k: float(max(np.abs(values[t]).max() for t in group)) for k, group in tensors.items() if group}
        result[state]["per_reader"] = [round(float(np.abs(values[t]).max()), 2) for t in tensors["readers"]]
    return result


def bench_model(name, args, work):
    from onnxq import zoo

    entry = zoo.get(name)
    case = zoo.export_case(name, work / name, n_calib=args.calib_samples, n_eval=args.eval_samples)
    rows = [{"model": name, "tool": "fp32", "metrics": entry.evaluate(case["model"], n=args.eval_samples)}]
    print(json.dumps(rows[-1]), flush=True)
    if args.amax:
        ids = np.load(case["eval"])["input_ids"][:1]
        rows[0]["amax"] = activation_amax(case["model"], ids)
        print(json.dumps(rows[0]["amax"]), flush=True)
    for precision in args.precisions if "onnxq" in args.tools else ():
        for method in args.methods:
            for label in args.smoothquant:
                for rotate in args.rotate:
                    for probs in args.attention_probs if precision == "int8" else ["int8"]:
                        for weights in args.weight_method:
                            rows.append(onnxq_row(entry, case, work / name, args, precision, method, label, rotate, probs, weights))
                            print(json.dumps(rows[-1]), flush=True)
    if "ort" in args.tools:
        out = work / name / "ort.onnx"
        row = {"model": name, "tool": "ort", "precision": "int8", "method": "minmax", "smoothquant": "none", "rotate": "off", **run_job("ort", case["model"], out, case["calib"], "tensorrt")}
        if "error" not in row:
            row["metrics"] = entry.evaluate(out, n=args.eval_samples)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def onnxq_row(entry, case, work, args, precision, method, label, rotate, probs, weights="rtn"):
    out = work / f"onnxq.{precision}.{method}.{label}.{rotate}.{probs}.{weights}.onnx"
    row = {"model": entry.name, "tool": "onnxq", "precision": precision, "method": method, "smoothquant": label, "rotate": rotate, "attention_probs": probs, "weights": weights}
    try:
        row.update(quantize_onnxq(case, out, precision, method, label, rotate, args.calib_samples, probs, weights))
        row["metrics"] = entry.evaluate(out, n=args.eval_samples)
    except Exception as exc:  # a failing setting is a row, not the end of the benchmark
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def print_table(rows):
    for model in dict.fromkeys(r["model"] for r in rows):
        keys = KEY_METRICS.get(model, ())
        fp32 = next((r for r in rows if r["model"] == model and r["tool"] == "fp32"), None)
        print(f"\n{model}")
        print(f"  {'tool':<7}{'prec':<6}{'method':<8}{'SQ':<9}{'rotate':<8}{'P·V':<13}{'weights':<8}" + "".join(f"{k:>16}" for k in keys) + f"{'vs FP32':>10}")
        for r in (r for r in rows if r["model"] == model):
            m = r.get("metrics", {})
            line = f"  {r['tool']:<7}{r.get('precision', '-'):<6}{r.get('method', '-'):<8}{r.get('smoothquant', '-'):<9}{r.get('rotate', '-'):<8}{r.get('attention_probs', '-'):<13}{r.get('weights', '-'):<8}"
            line += "".join(f"{m[k]:>16.4f}" if isinstance(m.get(k), (int, float)) else f"{'-':>16}" for k in keys)
            if "perplexity" in m and fp32 is not None and "perplexity" in fp32.get("metrics", {}):
                line += f"{m['perplexity'] / fp32['metrics']['perplexity']:>9.3f}x"
            if "error" in r:
                line += f"   {r['error']}"
            print(line)
        if fp32 is not None and "amax" in fp32:
            a = fp32["amax"]
            print(f"  amax into the norms' readers: {a['off']['readers']:.1f} -> {a['on']['readers']:.1f} rotated; into the writers (o_proj, down_proj; rotated online only): {a['off']['writers']:.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["smollm2-6l"])
    ap.add_argument("--precisions", nargs="+", default=["int8", "fp8"])
    ap.add_argument("--rotate", nargs="+", default=["off", "on", "on+64"], help="off, on, or on+B (with --rotate-online B)")
    ap.add_argument("--smoothquant", nargs="+", default=["none", "auto"], help="none, an α, auto, with +N for --split-outliers N")
    ap.add_argument("--methods", nargs="+", default=["minmax"])
    ap.add_argument("--attention-probs", nargs="+", default=["int8"], choices=["int8", "fp8", "float", "unnormalized"], help="INT8 rows: P·V at int8, fp8, float or unnormalized (int8 on exp(s - rowmax))")
    ap.add_argument("--weight-method", nargs="+", default=["rtn"], choices=["rtn", "gptq"], help="onnxq rows: weights rounded to nearest or by GPTQ (--weight-method)")
    ap.add_argument("--calib-samples", type=int)
    ap.add_argument("--eval-samples", type=int)
    ap.add_argument("--tools", nargs="+", default=["onnxq", "ort"])
    ap.add_argument("--no-amax", dest="amax", action="store_false", help="skip the float activations' amax, rotation off and on")
    ap.add_argument("--out", default="bench_rotation.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxq-rot-bench-") as tmp:
        for name in args.models:
            rows += bench_model(name, args, Path(tmp))
    print_table(rows)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
