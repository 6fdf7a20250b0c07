"""W8A8 accuracy without and with SmoothQuant (fixed α and auto α), next to ORT quantize_static
and ModelOpt, on the zoo's transformer models, same model and data for every tool.

    python tools/bench/smoothquant.py [--models smollm2-6l minilm-l6-v2 smollm2-135m]
        [--targets tensorrt] [--methods minmax mse] [--alphas none 0.5 auto] [--splits 0 16]
        [--calib-samples N] [--eval-samples N] [--tools onnxq ort modelopt inc-sq]
        [--sweep MODEL] [--out bench.json]

Rows per model: FP32, onnxq per (range method, SmoothQuant α, --split-outliers N for α != none;
shown as "α+N"), ORT quantize_static (QDQ, MinMax,
per-channel symmetric INT8 weights; via tools/bench/_job.py, its own process), ModelOpt INT8
(its default entropy calibration, unquantized ops kept FP32) and Intel Neural Compressor's ONNX
SmoothQuant (α 0.5, MinMax) through tools/bench/competitors/runners.py (their own venv); a tool
that cannot run gives a row that says why.
Metrics are the zoo's: SmolLM2 6-layer next-token top-1 agreement and KL vs FP32, SmolLM2-135M
perplexity, MiniLM embedding cosine vs FP32 and Spearman ρ.

``--sweep MODEL`` measures what holds the best onnxq setting back: the same quantization with
each decoder layer (and the LM head), then each kind of projection, kept in float (--exclude),
and the metric gained. Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quantize_vs_ort import KEY_METRICS, run_job  # noqa: E402

TARGETS_OF = {"smollm2-6l": 0.95, "smollm2-135m": 1.05, "minilm-l6-v2": 0.99}
PRIMARY = {"smollm2-6l": "top1_agreement", "smollm2-135m": "perplexity", "minilm-l6-v2": "cosine_vs_fp32", "efficientnet-lite0": "logit_cosine"}


def _alpha(text: str):
    return None if text == "none" else ("auto" if text == "auto" else float(text))


def quantize_onnxq(case, out, target, method, alpha, exclude=(), calib_n=None, split=0):
    import onnxq

    t = time.perf_counter()
    result = onnxq.quantize(
        case["model"], out, case["calib"], target=target, method=method, smoothquant=alpha, exclude=exclude,
        calib_samples=calib_n, report=False, evaluate=False, quiet=True, split_outliers=split,
    )
    row = {"seconds": time.perf_counter() - t}
    if result.smoothquant is not None:
        row["sq_summary"] = result.smoothquant.summary()
        if alpha == "auto":
            row["alphas"] = [g.alpha for g in result.smoothquant.groups]
    return row


def competitor_row(tool, case, out):
    """ModelOpt INT8 (its default calibration) or INC SmoothQuant (α 0.5) through the runners in
    tools/bench/competitors/ (their own venv), when that directory exists on this branch."""
    runner = HERE / "competitors" / "runners.py"
    if not runner.exists():
        return {"error": "not run: no competitor runner under tools/bench/competitors/ on this branch"}
    sys.path.insert(0, str(runner.parent))
    try:
        import runners

        if tool == "modelopt":
            return runners.run_modelopt(case["model"], case["calib"], out, "int8")
        return runners.run_inc_smoothquant(case["model"], case["calib"], out, alpha=0.5)
    except Exception as exc:  # a competitor failing is a result, not a crash of the benchmark
        return {"error": f"not run: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"}


def bench_model(name, args, work):
    from onnxq import zoo

    entry = zoo.get(name)
    case = zoo.export_case(name, work / name, n_calib=args.calib_samples, n_eval=args.eval_samples)
    rows = [{"model": name, "tool": "fp32", "metrics": entry.evaluate(case["model"], n=args.eval_samples)}]
    print(json.dumps(rows[-1]), flush=True)
    for target in args.targets:
        for method in args.methods if "onnxq" in args.tools else ():
            for a, split in [(a, n) for a in args.alphas for n in (args.splits if a != "none" else [0])]:
                alpha = _alpha(a)
                label = a + (f"+{split}" if split else "")
                out = work / name / f"onnxq.{target}.{method}.{label}.onnx"
                row = {"model": name, "tool": "onnxq", "target": target, "method": method, "smoothquant": label}
                try:
                    row.update(quantize_onnxq(case, out, target, method, alpha, split=split))
                    row["metrics"] = entry.evaluate(out, n=args.eval_samples)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                print(json.dumps(row), flush=True)
        if "ort" in args.tools:
            out = work / name / f"ort.{target}.onnx"
            job = run_job("ort", case["model"], out, case["calib"], target)
            row = {"model": name, "tool": "ort", "target": target, "method": "minmax", "smoothquant": "none", **job}
            if "error" not in job:
                row["metrics"] = entry.evaluate(out, n=args.eval_samples)
            rows.append(row)
            print(json.dumps(row), flush=True)
    for tool in [t for t in ("modelopt", "inc-sq") if t in args.tools]:
        out = work / name / f"{tool}.onnx"
        row = {"model": name, "tool": tool, "target": "tensorrt", "method": "entropy" if tool == "modelopt" else "minmax", "smoothquant": "none" if tool == "modelopt" else "0.5"}
        row.update(competitor_row(tool, case, out))
        if "error" not in row:
            row["metrics"] = entry.evaluate(out, n=args.eval_samples)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _layer_sets(model_path, target):
    """Node names of the linear nodes per decoder layer (from their weights' names, else by
    order between norms) and per projection kind, for --exclude."""
    from onnxq.passes.preprocess import load_and_preprocess
    from onnxq.placement import place

    model = load_and_preprocess(model_path)
    plan = place(model, target)
    quantized = [n for n in model.graph if plan.nodes.get(n.name) is not None and plan.nodes[n.name].quantized and n.op_type in ("MatMul", "Gemm")]
    weighted = [n for n in quantized if plan.nodes[n.name].inputs.get(1) == "weight"]
    # a decoder layer = the 7 weighted projections q, k, v, o, gate, up, down in graph order
    layers, kinds = {}, {}
    names = ["q", "k", "v", "o", "gate", "up", "down"]
    body, head = weighted[:-1], weighted[-1:]
    for i, node in enumerate(body):
        layers.setdefault(f"layer {i // 7}", []).append(node.name)
        kinds.setdefault(names[i % 7], []).append(node.name)
    if head:
        layers["lm_head"] = [n.name for n in head]
    # products of two activations (attention's Q·Kᵀ and P·V)
    kinds["attention QK/PV"] = [n.name for n in quantized if plan.nodes[n.name].inputs.get(1) == "activation"]
    return layers, kinds


def sweep(name, args, work, method, alpha, target="tensorrt"):
    """The metric with each layer / projection kind kept in float: what holds the model back."""
    from onnxq import zoo

    entry = zoo.get(name)
    case = zoo.export_case(name, work / name, n_calib=args.calib_samples, n_eval=args.eval_samples)
    key = PRIMARY[name]
    base_out = work / name / "sweep_base.onnx"
    quantize_onnxq(case, base_out, target, method, alpha)
    base = entry.evaluate(base_out, n=args.eval_samples)[key]
    layers, kinds = _layer_sets(case["model"], target)
    results = {"method": method, "smoothquant": alpha, "metric": key, "base": base, "float": {}}
    sets = {**(layers if args.sweep_by in ("layers", "both") else {}), **({(f"all {k}_proj" if "attention" not in k else k): v for k, v in kinds.items()} if args.sweep_by in ("kinds", "both") else {})}
    for label, nodes in sets.items():
        out = work / name / "sweep.onnx"
        quantize_onnxq(case, out, target, method, alpha, exclude=[re.escape(n) for n in nodes])
        value = entry.evaluate(out, n=args.eval_samples)[key]
        results["float"][label] = {"nodes": len(nodes), key: value, "gain": value - base}
        print(f"  {label:<14} in float ({len(nodes)} nodes): {key} {value:.4f} ({value - base:+.4f})", flush=True)
    return results


def print_table(rows):
    for model in dict.fromkeys(r["model"] for r in rows):
        keys = KEY_METRICS.get(model, ())
        print(f"\n{model}")
        print(f"  {'tool':<9}{'target':<10}{'method':<8}{'SQ α':<8}" + "".join(f"{k:>16}" for k in keys) + "   SmoothQuant groups (absorbed / inserted Mul)")
        for r in (r for r in rows if r["model"] == model):
            m = r.get("metrics", {})
            line = f"  {r['tool']:<9}{r.get('target', '-'):<10}{r.get('method', '-'):<8}{r.get('smoothquant', '-'):<8}"
            line += "".join(f"{m[k]:>16.4f}" if isinstance(m.get(k), (int, float)) else f"{'-':>16}" for k in keys)
            info = r.get("sq_summary")
            if info:
                line += f"   {info['smoothed'] - info['inserted_muls']} / {info['inserted_muls']}"
            if "error" in r:
                line += f"   {r['error']}"
            print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["smollm2-6l", "minilm-l6-v2", "smollm2-135m"])
    ap.add_argument("--targets", nargs="+", default=["tensorrt"])
    ap.add_argument("--methods", nargs="+", default=["minmax", "mse"])
    ap.add_argument("--alphas", nargs="+", default=["none", "0.5", "auto"])
    ap.add_argument("--splits", nargs="+", type=int, default=[0], help="--split-outliers values for each α other than none (default: 0)")
    ap.add_argument("--calib-samples", type=int)
    ap.add_argument("--eval-samples", type=int)
    ap.add_argument("--tools", nargs="+", default=["onnxq", "ort", "modelopt", "inc-sq"], help="rows to run (default: all)")
    ap.add_argument("--sweep", metavar="MODEL", help="per-layer / per-projection float sweep of MODEL (best onnxq setting)")
    ap.add_argument("--sweep-by", choices=["layers", "kinds", "both"], default="both", help="keep each decoder layer, or each projection kind, in float")
    ap.add_argument("--sweep-method", default="mse")
    ap.add_argument("--sweep-alpha", default="auto")
    ap.add_argument("--out", default="bench_smoothquant.json")
    args = ap.parse_args()
    result = {"rows": []}
    with tempfile.TemporaryDirectory(prefix="onnxq-sq-bench-") as tmp:
        work = Path(tmp)
        for name in args.models:
            result["rows"] += bench_model(name, args, work)
        if args.sweep:
            result["sweep"] = sweep(args.sweep, args, work, args.sweep_method, _alpha(args.sweep_alpha))
    print_table(result["rows"])
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
