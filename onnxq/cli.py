"""`onnxq` command line: parses arguments, calls the API, prints. Errors exit 2 without traceback."""

from __future__ import annotations

import argparse
import sys

from onnxq.errors import OnnxqError

EXIT_ERROR = 2


def _quantize(args: argparse.Namespace) -> int:
    from onnxq.pipeline import quantize

    result = quantize(
        args.model,
        args.output,
        args.calib,
        target=args.target,
        precision=args.precision,
        eval=args.eval,
        exclude=args.exclude or (),
        plan=args.plan,
        save_plan=args.save_plan,
        calib_samples=args.calib_samples,
        method=args.calib_method,
        percentile=args.percentile,
        table=args.table,
        quiet=args.quiet,
        high_precision=args.high_precision,
    )
    print(f"wrote {result.output}" + (f" and {result.report_path}" if result.report_path else ""))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from onnxq.calibration import calibrate

    table = calibrate(
        args.model,
        args.calib,
        args.output,
        method=args.calib_method,
        percentile=args.percentile,
        calib_samples=args.calib_samples,
        quiet=args.quiet,
    )
    print(f"wrote {args.output} ({len(table.tensors)} tensors, {table.num_samples} samples)")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from onnxq.sensitivity import sweep

    result = sweep(
        args.model,
        args.calib,
        args.output,
        eval=args.eval,
        mode=args.mode,
        precisions=args.precisions,
        target=args.target,
        zoo=args.zoo,
        calib_samples=args.calib_samples,
        eval_samples=args.eval_samples,
        method=args.calib_method,
        layers_only=args.layers.split(",") if args.layers else None,
        quiet=args.quiet,
    )
    if not args.quiet:
        print(result.to_markdown())
    print(f"wrote {args.output} ({len(result.layers)} layers x {len(result.precisions)} precisions, mode {result.mode})")
    return 0


def _solve(args: argparse.Namespace) -> int:
    from onnxq.solver import solve

    result = solve(
        args.sweep,
        args.model,
        args.calib,
        args.output,
        eval=args.eval,
        target_cosine=args.target_cosine,
        target_metric=args.target_metric,
        max_high_precision_layers=args.max_high_precision_layers,
        zoo=args.zoo,
        latency_json=args.latency_json,
        min_8bit_macs=args.min_8bit_macs,
        precisions=args.precisions,
        order_by=args.order,
        calib_samples=args.calib_samples,
        eval_samples=args.eval_samples,
        method=args.calib_method,
        quiet=args.quiet,
    )
    c = result.chosen
    print(
        f"wrote {result.output} ({c['high_precision_layers']} of {len(result.order)} layers in high precision; "
        f"accuracy {c['accuracy']:.4f}; cost x{c['cost']:.3f} of all-8-bit; "
        f"{c['matmul_macs_8bit_fraction']:.1%} of MatMul/Gemm MACs in 8 bits), {result.report_path}"
        + (f", {result.curve_path}" if result.curve_path else "")
    )
    return 0


def _zoo_list(args: argparse.Namespace) -> int:
    from onnxq import zoo

    for name in zoo.names():
        print(f"{name:<16} {zoo.get(name).description}")
    return 0


def _zoo_export(args: argparse.Namespace) -> int:
    from onnxq import zoo

    files = zoo.export_case(args.name, args.output, n_calib=args.calib_samples, n_eval=args.eval_samples)
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from onnxq.calibrators.methods import DEFAULT_METHOD, METHODS

    parser = argparse.ArgumentParser(prog="onnxq", description="Post-training quantization of ONNX models for TensorRT and ONNX Runtime.")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="insert Q/DQ from calibration data and compare with the float model")
    q.add_argument("model", help="input ONNX model (never modified)")
    q.add_argument("-o", "--output", required=True, help="output Q/DQ ONNX model; a .report.json is written beside it")
    q.add_argument("--calib", help="calibration data: .npz (one array per input, leading axis = samples), a directory of .npz, or module:function")
    q.add_argument("--eval", help="held-out evaluation data, same forms as --calib (default: the calibration data, flagged as not held out)")
    q.add_argument("--target", choices=["tensorrt", "ort"], default="tensorrt", help="deployment target whose Q/DQ rules apply (default: tensorrt)")
    q.add_argument("--precision", choices=["int8", "fp8"], default="int8", help="quantized precision: int8, or fp8 (E4M3FN, opset 19; ranges on the FP8 grid) (default: int8)")
    q.add_argument("--high-precision", choices=["fp32", "fp16"], default="fp32", help="precision of the non-quantized regions: fp32, or fp16 with explicit Casts (norms, softmax inputs and tensors that overflow FP16 stay FP32) (default: fp32)")
    q.add_argument("--exclude", action="append", metavar="NAME|REGEX", help="keep matching nodes in float (repeatable; regexes match whole names)")
    q.add_argument("--plan", help="replay a QuantPlan JSON (from --save-plan, possibly edited) instead of the target's policy")
    q.add_argument("--save-plan", metavar="PATH", help="write the QuantPlan as JSON")
    q.add_argument("--calib-samples", type=int, metavar="N", help="use at most N calibration samples")
    q.add_argument("--calib-method", choices=list(METHODS), help="activation range method (default per target: " + ", ".join(f"{k}: {v}" for k, v in DEFAULT_METHOD.items()) + "; with --table: the table's)")
    q.add_argument("--percentile", type=float, metavar="P", help="percentile for --calib-method percentile (default 99.99)")
    q.add_argument("--table", metavar="TABLE.json", help="ranges from a calibration table written by onnxq calibrate (skips calibration)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress or summary on stderr/stdout")
    q.set_defaults(func=_quantize)

    c = sub.add_parser("calibrate", help="collect calibration statistics once and write them as a reusable table")
    c.add_argument("model", help="input ONNX model (never modified)")
    c.add_argument("--calib", required=True, help="calibration data, same forms as for quantize")
    c.add_argument("-o", "--output", required=True, metavar="TABLE.json", help="calibration table to write (JSON)")
    c.add_argument("--calib-samples", type=int, metavar="N", help="use at most N calibration samples")
    c.add_argument("--calib-method", choices=list(METHODS), help="range method recorded in the table as the default for quantize --table")
    c.add_argument("--percentile", type=float, metavar="P", help="percentile recorded in the table (default 99.99)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress or summary on stderr")
    c.set_defaults(func=_calibrate)

    from onnxq.plan import QUANTIZED_PRECISIONS

    s = sub.add_parser("sweep", help="per-layer sensitivity: the error of quantizing each layer alone, per precision")
    s.add_argument("model", help="input ONNX model (never modified)")
    s.add_argument("--calib", required=True, help="calibration data for the ranges, same forms as for quantize")
    s.add_argument("--eval", help="data the errors are measured on (default: the calibration data)")
    s.add_argument("-o", "--output", required=True, metavar="SWEEP.json", help="sweep JSON; SWEEP.md (table) and SWEEP.png (chart) are written beside it")
    s.add_argument("--mode", choices=["local", "e2e", "both"], default="local", help="local: every layer in one pass (quantized twins); e2e: one quantized model per layer; both: and their rank correlation (default: local)")
    s.add_argument("--precisions", default=",".join(QUANTIZED_PRECISIONS), help="comma-separated candidate precisions (default: %(default)s)")
    s.add_argument("--target", choices=["tensorrt", "ort"], default="tensorrt", help="placement policy whose plan defines the layers (default: tensorrt)")
    s.add_argument("--layers", metavar="NAME,...", help="measure only these layers (default: all)")
    s.add_argument("--zoo", metavar="NAME", help="e2e mode: also compute this zoo model's task metric per layer")
    s.add_argument("--calib-samples", type=int, metavar="N", help="use at most N calibration samples")
    s.add_argument("--eval-samples", type=int, metavar="N", help="use at most N evaluation samples")
    s.add_argument("--calib-method", choices=list(METHODS), help="activation range method (default per target: " + ", ".join(f"{k}: {v}" for k, v in DEFAULT_METHOD.items()) + ")")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress or table")
    s.set_defaults(func=_sweep)

    v = sub.add_parser("solve", help="choose each layer's precision from a sweep: lowest cost meeting an accuracy target; writes a QuantPlan")
    v.add_argument("sweep", metavar="SWEEP.json", help="output of onnxq sweep for this model")
    v.add_argument("model", help="input ONNX model (never modified)")
    v.add_argument("--calib", required=True, help="calibration data, same forms as for quantize")
    v.add_argument("--eval", required=True, help="held-out data the candidates are verified on")
    v.add_argument("-o", "--output", required=True, metavar="PLAN.json", help="QuantPlan to write (replay with onnxq quantize --plan); PLAN.solve.json and PLAN.curve.png beside it")
    target = v.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-cosine", type=float, metavar="C", help="smallest mean output cosine vs FP32 on --eval")
    target.add_argument("--target-metric", metavar="NAME>=VALUE", help="zoo task metric bound, e.g. top1_agreement>=0.97 (needs --zoo)")
    target.add_argument("--max-high-precision-layers", type=int, metavar="N", help="keep the N layers the sweep ranks first in high precision")
    v.add_argument("--zoo", metavar="NAME", help="zoo model whose task metric --target-metric names (default: the sweep's)")
    v.add_argument("--latency-json", metavar="FILE", help="per-layer costs {layer or node: {precision: cost}} instead of the nominal roofline")
    v.add_argument("--min-8bit-macs", type=float, metavar="FRACTION", help="never promote a layer if that leaves less than FRACTION of MatMul/Gemm MACs in 8 bits")
    v.add_argument("--order", choices=["sensitivity", "per-cost"], default="sensitivity", help="promotion order: most sensitive first, or sensitivity per added cost (default: sensitivity)")
    v.add_argument("--precisions", help="comma-separated 8-bit candidates to use, a subset of the sweep's (default: all)")
    v.add_argument("--calib-samples", type=int, metavar="N", help="use at most N calibration samples")
    v.add_argument("--eval-samples", type=int, metavar="N", help="use at most N evaluation samples")
    v.add_argument("--calib-method", choices=list(METHODS), help="activation range method (as for quantize)")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress")
    v.set_defaults(func=_solve)

    z = sub.add_parser("zoo", help="the built-in model zoo (needs the zoo extra: pip install 'onnxq[zoo]')")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zl = zsub.add_parser("list", help="list zoo models")
    zl.set_defaults(func=_zoo_list)
    ze = zsub.add_parser("export", help="write model.onnx, calib.npz and eval.npz for a zoo model")
    ze.add_argument("name")
    ze.add_argument("-o", "--output", required=True, help="output directory (created if missing)")
    ze.add_argument("--calib-samples", type=int, metavar="N")
    ze.add_argument("--eval-samples", type=int, metavar="N")
    ze.set_defaults(func=_zoo_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except OnnxqError as exc:
        print(f"onnxq: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("onnxq: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        if exc.name in ("torch", "transformers", "gguf", "tokenizers", "safetensors", "PIL"):
            print(f"onnxq: error: {exc.name} is not installed; install the zoo extra: pip install 'onnxq[zoo]'", file=sys.stderr)
            return EXIT_ERROR
        raise
