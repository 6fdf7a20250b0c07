"""FP8 on the zoo: onnxq INT8 vs onnxq FP8 (amax/448 and MSE on the FP8 grid) vs ModelOpt's FP8.

Every column quantizes the same model with the same calibration samples (tensorrt placement,
per-tensor activations, per-channel weights, zero points 0) and is scored with the zoo's task
metric on the same evaluation samples:

- ``onnxq-int8``: INT8, the target's default range method (MSE on the INT8 grid);
- ``onnxq-fp8-amax``: FP8 E4M3FN, scale = amax/448 (``--precision fp8 --calib-method minmax``);
- ``onnxq-fp8-mse``: FP8 E4M3FN, the MSE-optimal range on the FP8 grid (``--precision fp8``);
- ``modelopt-fp8``: ModelOpt's own ONNX FP8 quantization (``run_modelopt`` of
  ``tools/bench/competitors/runners.py``, its default entropy calibration, run in the competitor
  venv; the column reports the runner's error if that venv is missing);
- ``modelopt-fp8 (emulated)``: ModelOpt's documented rule applied by onnxq — max-calibrated INT8
  scales (amax/127, activations and per-channel weights) multiplied by 448/127
  (``modelopt.onnx.quantization.fp8.int8_to_fp8``), on onnxq's placement. It emulates the scale
  rule only: ModelOpt's placement (it leaves attention's QKᵀ/PV MatMuls unquantized on
  SmolLM2) and calibration (entropy) differ.

    python tools/bench/fp8.py [--models minilm-l6-v2 efficientnet-lite0 smollm2-6l]
                              [--calib-samples N] [--eval-samples N] [--high-precision fp16]
                              [--out bench_fp8.json]

``--high-precision fp16`` runs the onnxq columns with FP16 non-quantized regions (the table then
shows what FP16 regions cost on top of each 8-bit scheme).

Prints a table per model and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quantize_vs_ort import metric_cells, metric_keys  # noqa: E402

# ModelOpt turns a max-calibrated INT8 scale s = amax/127 into the FP8 scale s * 448/127, i.e.
# amax / (127**2/448): its FP8 values reach only ±36 of E4M3FN's ±448.
MODELOPT_FP8_GRID_MAX = 127.0**2 / 448.0

COLUMNS = {
    "onnxq-int8": {"precision": "int8", "method": None},
    "onnxq-fp8-amax": {"precision": "fp8", "method": "minmax"},
    "onnxq-fp8-mse": {"precision": "fp8", "method": "mse"},
}


@contextlib.contextmanager
def modelopt_scale_rule():
    """onnxq's FP8 scales computed as ModelOpt's: amax/36.0 instead of amax/448 (saturation
    still at ±448, as real E4M3FN)."""
    import dataclasses

    from onnxq import grids

    name = grids.FP8.name
    saved = grids.GRIDS[name], grids.WEIGHT_GRIDS[name]
    grids.GRIDS[name] = grids.WEIGHT_GRIDS[name] = dataclasses.replace(grids.FP8, scale_max=MODELOPT_FP8_GRID_MAX)
    try:
        yield
    finally:
        grids.GRIDS[name], grids.WEIGHT_GRIDS[name] = saved


def run_modelopt(model, calib_npz, out, high_precision):
    """ModelOpt's own FP8 through the competitors' runner (an error row if it cannot run)."""
    sys.path.insert(0, str(HERE / "competitors"))
    try:
        from runners import run_modelopt as runner  # type: ignore[import-not-found]
    except ImportError:
        raise RuntimeError("tools/bench/competitors/runners.py is not in this checkout") from None
    runner(model, calib_npz, out, precision="fp8", high_precision=high_precision)


def bench_model(name, workdir, calib_n, eval_n, high_precision="fp32"):
    import onnxq
    from onnxq import zoo

    entry = zoo.get(name)
    case = zoo.export_case(name, workdir / name, n_calib=calib_n, n_eval=eval_n)
    model, calib = case["model"], case["calib"]
    eval_n = eval_n or entry.default_eval
    rows = [{"model": name, "tool": "fp32", "metrics": entry.evaluate(model, model, n=eval_n)}]
    runs = {**COLUMNS, "modelopt-fp8": {"real_modelopt": True},
            "modelopt-fp8 (emulated)": {"precision": "fp8", "method": "minmax", "modelopt_rule": True}}
    for tool, cfg in runs.items():
        out = workdir / f"{name}.{tool.split()[0]}{'.emulated' if cfg.get('modelopt_rule') else ''}.onnx"
        t = time.perf_counter()
        try:
            if cfg.get("real_modelopt"):
                run_modelopt(model, calib, out, high_precision)
            else:
                rule = modelopt_scale_rule() if cfg.get("modelopt_rule") else contextlib.nullcontext()
                with rule:
                    onnxq.quantize(model, out, calib, precision=cfg["precision"], method=cfg["method"],
                                   high_precision=high_precision, report=False, evaluate=False, quiet=True)
            row = {"model": name, "tool": tool, "high_precision": high_precision, "seconds": time.perf_counter() - t,
                   "metrics": entry.evaluate(out, model, n=eval_n)}
        except Exception as exc:  # a failed column is reported, the others still run
            row = {"model": name, "tool": tool, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def print_table(rows):
    for model in dict.fromkeys(r["model"] for r in rows):
        keys = metric_keys(rows, model)
        print(f"\n{model}")
        print(f"  {'tool':<26}{'time s':>8}" + "".join(f"{k:>16}" for k in keys))
        for r in (r for r in rows if r["model"] == model):
            print(f"  {r['tool']:<26}{r.get('seconds', float('nan')):>8.1f}" + metric_cells(r, keys))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["minilm-l6-v2", "efficientnet-lite0", "smollm2-6l"])
    ap.add_argument("--calib-samples", type=int)
    ap.add_argument("--eval-samples", type=int)
    ap.add_argument("--high-precision", choices=["fp32", "fp16"], default="fp32", help="precision of the onnxq columns' non-quantized regions")
    ap.add_argument("--out", default="bench_fp8.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxq-bench-fp8-") as tmp:
        for name in args.models:
            rows += bench_model(name, Path(tmp), args.calib_samples, args.eval_samples, args.high_precision)
    print_table(rows)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
