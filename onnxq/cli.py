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
        smoothquant=args.smoothquant,
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
    q.add_argument("--precision", choices=["int8"], default="int8", help="quantized precision (default: int8)")
    q.add_argument("--exclude", action="append", metavar="NAME|REGEX", help="keep matching nodes in float (repeatable; regexes match whole names)")
    q.add_argument("--plan", help="replay a QuantPlan JSON (from --save-plan, possibly edited) instead of the target's policy")
    q.add_argument("--save-plan", metavar="PATH", help="write the QuantPlan as JSON")
    q.add_argument("--calib-samples", type=int, metavar="N", help="use at most N calibration samples")
    q.add_argument("--calib-method", choices=list(METHODS), help="activation range method (default per target: " + ", ".join(f"{k}: {v}" for k, v in DEFAULT_METHOD.items()) + "; with --table: the table's)")
    q.add_argument("--percentile", type=float, metavar="P", help="percentile for --calib-method percentile (default 99.99)")
    q.add_argument("--table", metavar="TABLE.json", help="ranges from a calibration table written by onnxq calibrate (skips calibration)")
    q.add_argument("--smoothquant", metavar="ALPHA|auto", help="fold SmoothQuant scales into the graph first: migration strength in [0, 1], or auto (per group, by simulated W8A8 error)")
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
