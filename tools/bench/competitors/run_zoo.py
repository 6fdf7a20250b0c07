"""Competitors (ModelOpt INT8/FP8, ORT quantize_static, INC SmoothQuant) on zoo models, same data.

    python tools/bench/competitors/run_zoo.py [--models minilm-l6-v2 smollm2-6l]
        [--tools modelopt-int8 modelopt-fp8 ort inc-sq] [--calib-samples N] [--eval-samples N]
        [--alpha 0.5] [--modelopt-high-precision fp32|fp16] [--modelopt-calibration entropy|max]
        [--out bench_competitors.json]

Each model is exported with the zoo (model.onnx, calib.npz, eval.npz, as `onnxq zoo export`
writes them); each tool quantizes it in its own process (runners.py) from the same calib.npz,
and the zoo's task metric (`onnxq.zoo.get(name).evaluate`) scores the result against FP32.
Prints a table and writes JSON. Needs the competitor venv (setup_env.py) for ModelOpt and INC.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import runners  # noqa: E402
from quantize_vs_ort import count_qdq, print_table  # noqa: E402

TOOLS = ("modelopt-int8", "modelopt-fp8", "ort", "inc-sq")


def quantize_with(tool, case, out, args) -> dict:
    model, calib = case["model"], case["calib"]
    if tool.startswith("modelopt-"):
        precision = tool.split("-", 1)[1]
        return runners.run_modelopt(
            model, calib, out, precision, calibration_method=args.modelopt_calibration, high_precision=args.modelopt_high_precision
        )
    if tool == "ort":
        return runners.run_ort(model, calib, out, target="tensorrt")
    if tool == "inc-sq":
        return runners.run_inc_smoothquant(model, calib, out, alpha=args.alpha)
    raise SystemExit(f"unknown tool {tool!r}; choose from {TOOLS}")


def bench_model(name, tools, workdir, args) -> list[dict]:
    from onnxq import zoo

    entry = zoo.get(name)
    case = zoo.export_case(name, workdir / name, n_calib=args.calib_samples, n_eval=args.eval_samples)
    rows = [{"model": name, "tool": "fp32", "target": "-", "metrics": entry.evaluate(case["model"], n=args.eval_samples)}]
    print(json.dumps(rows[0]), flush=True)
    for tool in tools:
        out = workdir / name / f"{tool}.onnx"
        row = {"model": name, "tool": tool, "target": "tensorrt"}
        try:
            row.update(quantize_with(tool, case, out, args))
            row["metrics"] = entry.evaluate(out, n=args.eval_samples)
            row["q_nodes"], row["dq_nodes"] = count_qdq(out)
        except Exception as exc:  # one tool's failure is a row of the table, not the end of the run
            row["error"] = str(exc).splitlines()[0]
            row["error_detail"] = str(exc)
        row.pop("output", None)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["minilm-l6-v2", "smollm2-6l"])
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--calib-samples", type=int)
    ap.add_argument("--eval-samples", type=int)
    ap.add_argument("--alpha", type=float, default=0.5, help="INC SmoothQuant migration strength")
    ap.add_argument("--modelopt-high-precision", choices=("fp32", "fp16"), default="fp32")
    ap.add_argument("--modelopt-calibration", choices=("entropy", "max"), help="ModelOpt's calibration method (default: its own, entropy)")
    ap.add_argument("--out", default="bench_competitors.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxq-competitors-") as tmp:
        for name in args.models:
            rows += bench_model(name, args.tools, Path(tmp), args)
    print_table(rows)
    Path(args.out).write_text(json.dumps({"rows": rows, "options": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
