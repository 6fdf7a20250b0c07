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
        smoothquant=args.smoothquant,
        split_outliers=args.split_outliers,
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


def _metric_spec(args: argparse.Namespace) -> str | None:
    """--metric MODULE:FUNCTION, or the zoo model's metric for --zoo NAME (the CLI may import the zoo; the core does not)."""
    if args.metric and args.zoo:
        raise OnnxqError("give --metric or --zoo, not both (--zoo NAME stands for its zoo model's --metric)")
    if args.zoo:
        from onnxq.zoo.metrics import metric_spec

        return metric_spec(args.zoo)
    return args.metric


def _sweep(args: argparse.Namespace) -> int:
    from onnxq.mixed_precision.sweep import sweep

    result = sweep(
        args.model,
        args.calib,
        args.output,
        eval=args.eval,
        mode=args.mode,
        precisions=args.precisions,
        target=args.target,
        metric=_metric_spec(args),
        calib_samples=args.calib_samples,
        eval_samples=args.eval_samples,
        method=args.calib_method,
        layers_only=args.layers.split(",") if args.layers else None,
        smoothquant=args.smoothquant,
        split_outliers=args.split_outliers,
        quiet=args.quiet,
    )
    if not args.quiet:
        print(result.to_markdown())
    print(f"wrote {args.output} ({len(result.layers)} layers x {len(result.precisions)} precisions, mode {result.mode})")
    return 0


def _solve(args: argparse.Namespace) -> int:
    from onnxq.mixed_precision.solver import solve

    result = solve(
        args.sweep,
        args.model,
        args.calib,
        args.output,
        eval=args.eval,
        target_cosine=args.target_cosine,
        target_metric=args.target_metric,
        max_high_precision_layers=args.max_high_precision_layers,
        metric=_metric_spec(args),
        latency_json=args.latency_json,
        min_8bit_macs=args.min_8bit_macs,
        precisions=args.precisions,
        order_by=args.order,
        calib_samples=args.calib_samples,
        eval_samples=args.eval_samples,
        method=args.calib_method,
        save_model=args.save_model,
        quiet=args.quiet,
    )
    c = result.chosen
    print(
        f"wrote {result.output} ({c['high_precision_layers']} of {len(result.order)} layers in high precision; "
        f"accuracy {c['accuracy']:.4f}; cost x{c['cost']:.3f} of all-8-bit; "
        f"{c['matmul_macs_8bit_fraction']:.1%} of MatMul/Gemm MACs in 8 bits), {result.report_path}"
        + (f", {result.curve_path}" if result.curve_path else "")
        + (f", {result.model_path}" if result.model_path else "")
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


def _export(args: argparse.Namespace) -> int:
    import numpy as np

    from onnxq.export import build_module, export, parse_dynamic, parse_input

    specs = [parse_input(t) for t in args.input]
    dynamic = [parse_dynamic(t) for t in args.dynamic or ()]
    module = build_module(args.factory)
    rng = np.random.default_rng(args.seed)
    example = {s.name: s.example(rng) for s in specs}
    ranges = {s.name: (s.low, s.high) for s in specs if s.low is not None}
    result = export(
        module, example, args.output, output_names=args.output_name, dynamic=dynamic, opset=args.opset,
        verify_outputs=not args.no_verify, random_checks=args.random_checks, min_cosine=args.min_cosine,
        atol=args.atol, input_ranges=ranges, seed=args.seed,
    )
    if result.verification is not None:
        for c in result.verification.checks:
            print(f"  {c.output} on {c.feed}: max abs error {c.max_abs_error:.3g}, cosine {c.cosine:.6f}")
    print(f"wrote {result.output} (exporter {result.exporter}, opset {result.opset}"
          + (", not verified" if result.verification is None else ", verified against torch") + ")")
    return 0


def _dims(items) -> dict[str, int]:
    dims = {}
    for item in items or ():
        name, _, value = item.partition("=")
        if not name or not value.isdigit():
            raise OnnxqError(f"--dim {item!r} is not NAME=SIZE (e.g. seq=128)")
        dims[name] = int(value)
    return dims


def _write_or_print(text: str, output: str | None) -> None:
    if output is None:
        print(text)
        return
    from pathlib import Path

    from onnxq.modelio import atomic_path

    if not Path(output).parent.exists():
        raise OnnxqError(f"output directory {Path(output).parent} does not exist; create it first")
    with atomic_path(output) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def _diff(args: argparse.Namespace) -> int:
    from onnxq.diff import diff, render

    result = diff(args.a, args.b, dims=_dims(args.dim))
    _write_or_print(render(result, args.format), args.output)
    return 0 if result.equivalent else 1


def _inspect(args: argparse.Namespace) -> int:
    import json

    from onnxq.inspect import format_text, inspect

    info = inspect(args.model, dims=_dims(args.dim))
    _write_or_print(json.dumps(info, indent=1) if args.format == "json" else format_text(info), args.output)
    return 0
def _build(args: argparse.Namespace) -> int:
    from onnxq.runtime.tensorrt import build_engine

    result = build_engine(args.model, args.output, shapes=args.shapes or (), workspace=args.workspace, timing_cache=args.timing_cache)
    print(f"wrote {result.engine} and {result.manifest}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from onnxq.check import EXIT_FAILED, Thresholds, check, format_table
    from onnxq.localize import format_layers
    from onnxq.report import write_reports

    report = check(
        args.reference,
        args.candidates,
        args.data,
        engines=args.engine or (),
        providers=args.providers.split(",") if args.providers else None,
        samples=args.samples,
        batch_sizes=args.batch or [1],
        warmup=args.warmup,
        runs=args.runs,
        latency=not args.no_latency,
        threads=args.threads,
        thresholds=Thresholds(args.min_cosine, args.min_snr, args.max_latency_ratio),
        metric=_metric_spec(args),
        metric_samples=args.zoo_samples,
        layers=args.layers,
        layer_samples=args.layer_samples,
        progress=not args.quiet,
    )
    paths = write_reports(report, args.output)
    if not args.quiet:
        for cand in report.candidates:
            print(format_table(cand.outputs, f"{cand.label} vs {report.reference} on {report.samples} samples:"))
            for lat in cand.latency:
                print(f"  latency batch {lat.batch}: median {lat.median_ms:.3f} ms, p90 {lat.p90_ms:.3f}, p99 {lat.p99_ms:.3f} "
                      f"(x{cand.latency_ratio.get(lat.batch, float('nan')):.3f} of FP32)")
            if cand.layers:
                print("  lowest per-layer SNR:")
                print(format_layers(cand.layers, top=args.layer_top))
            print(f"  {'PASS' if cand.passed else 'FAIL: ' + '; '.join(cand.failures)}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if report.passed else EXIT_FAILED


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
    q.add_argument("--smoothquant", metavar="ALPHA|auto", help="fold SmoothQuant scales into the graph first: migration strength in [0, 1], or auto (per group, by simulated W8A8 error)")
    q.add_argument("--split-outliers", metavar="N", type=int, default=0, help="with --smoothquant: up to N input channels per MatMul/Gemm group whose smoothed range dominates go to a float side product (LLM.int8()-style; as many as the simulated error says pay)")
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

    e = sub.add_parser("export", help="export a PyTorch module to ONNX (dynamo exporter) and verify it against torch in ORT")
    e.add_argument("factory", metavar="MODULE:FACTORY", help="a function returning the torch.nn.Module, e.g. onnxq.zoo.minilm:torch_module or path/to/file.py:build")
    e.add_argument("-o", "--output", required=True, help="output .onnx (weights over 1 GiB go to OUT.onnx.data)")
    e.add_argument("--input", action="append", required=True, metavar="NAME:SHAPE:DTYPE[:LOW..HIGH]", help="a model input, in forward's order, e.g. x:1x3x224x224:float32 (random example data: floats N(0,1), ints in [LOW, HIGH), default [0, 100))")
    e.add_argument("--dynamic", action="append", metavar="NAME:AXIS:DIM[=MIN..MAX]", help="make an input axis dynamic, e.g. input_ids:1:seq=2..512; inputs sharing DIM share the size")
    e.add_argument("--output-name", action="append", metavar="NAME", help="name the graph outputs, in order (repeatable)")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    e.add_argument("--no-verify", action="store_true", help="keep the export even when ORT and torch disagree")
    e.add_argument("--random-checks", type=int, default=2, metavar="N", help="fresh random inputs to verify on besides the example (default 2)")
    e.add_argument("--atol", type=float, default=1e-3, help="allowed max abs error, times max(1, max|torch output|) (default 1e-3)")
    e.add_argument("--min-cosine", type=float, default=0.9999, help="required cosine between ORT and torch outputs (default 0.9999)")
    e.add_argument("--seed", type=int, default=0, help="seed of the random example and check inputs")
    e.set_defaults(func=_export)

    d = sub.add_parser("diff", help="compare two ONNX graphs layer by layer, looking through Q/DQ and Cast (exit 0 equivalent, 1 different, 2 error)")
    d.add_argument("a", help="first model (e.g. the FP32 one)")
    d.add_argument("b", help="second model (e.g. its quantized version)")
    d.add_argument("--format", choices=["text", "json", "html"], default="text", help="report format (default text); html is one self-contained page")
    d.add_argument("-o", "--output", help="write the report to this file instead of stdout")
    d.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of a dynamic dimension for MAC counts (default 1), e.g. seq=128")
    d.set_defaults(func=_diff)

    i = sub.add_parser("inspect", help="opset, IR version, op histogram, Q/DQ by precision, parameters, inputs and outputs")
    i.add_argument("model")
    i.add_argument("--format", choices=["text", "json"], default="text")
    i.add_argument("-o", "--output", help="write the report to this file instead of stdout")
    i.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of a dynamic dimension for MAC counts (default 1)")
    i.set_defaults(func=_inspect)
    b = sub.add_parser("build", help="build a strongly typed TensorRT engine from a Q/DQ ONNX model (needs tensorrt and a GPU)")
    b.add_argument("model", help="Q/DQ ONNX model (never modified)")
    b.add_argument("-o", "--output", required=True, metavar="ENGINE", help="engine file to write; ENGINE.manifest.json is written beside it")
    b.add_argument("--shapes", action="append", metavar="NAME:MIN,OPT,MAX", help="optimization profile range of a dynamic input, shapes written 1x128 (repeatable)")
    b.add_argument("--workspace", metavar="SIZE", help="builder workspace limit, e.g. 512M or 2G (default: TensorRT's)")
    b.add_argument("--timing-cache", metavar="PATH", help="tactic timing cache to read (if it exists) and update")
    b.set_defaults(func=_build)

    k = sub.add_parser("check", help="accuracy and latency of candidates vs the FP32 model, with pass/fail thresholds")
    k.add_argument("reference", help="the float ONNX model (run in ONNX Runtime on the CPU)")
    k.add_argument("candidates", nargs="*", help="quantized ONNX models to compare (each on every provider in --providers)")
    k.add_argument("--engine", action="append", metavar="ENGINE", help="a TensorRT engine to compare (repeatable; needs tensorrt and a GPU)")
    k.add_argument("--data", required=True, help="evaluation data, same forms as for quantize")
    k.add_argument("-o", "--output", default="check_report", metavar="BASE", help="writes BASE.json, BASE.md and BASE.html (default: check_report)")
    k.add_argument("--providers", metavar="LIST", help="ORT providers for ONNX candidates, comma-separated from cpu,cuda,tensorrt (default: those installed)")
    k.add_argument("--samples", type=int, metavar="N", help="compare on at most N samples")
    k.add_argument("--batch", type=int, action="append", metavar="B", help="batch size to time (repeatable; default 1)")
    k.add_argument("--warmup", type=int, default=5, metavar="N", help="warm-up runs before timing (default 5)")
    k.add_argument("--runs", type=int, default=50, metavar="N", help="timed runs per model and batch size (default 50)")
    k.add_argument("--threads", type=int, metavar="N", help="ORT intra-op threads (default: all cores); recorded in the report")
    k.add_argument("--no-latency", action="store_true", help="accuracy only")
    k.add_argument("--min-cosine", type=float, metavar="C", help="fail (exit 1) if any output's mean cosine is below C")
    k.add_argument("--min-snr", type=float, metavar="DB", help="fail (exit 1) if any output's SNR is below DB")
    k.add_argument("--max-latency-ratio", type=float, metavar="R", help="fail (exit 1) if a candidate's median latency exceeds R x the reference's")
    k.add_argument("--zoo", metavar="NAME", help="also report the zoo model's task metric (onnxq zoo list) for ONNX candidates")
    k.add_argument("--metric", metavar="MODULE:FUNCTION", help="also report this task metric (FUNCTION(candidate, reference, samples) -> {name: value}) for ONNX candidates")
    k.add_argument("--zoo-samples", type=int, metavar="N", help="evaluation samples for --zoo or --metric")
    k.add_argument("--layers", action="store_true", help="per-layer SNR through the Q/DQ pairs, lowest first")
    k.add_argument("--layer-samples", type=int, metavar="N", help="samples for --layers (default: --samples)")
    k.add_argument("--layer-top", type=int, default=10, metavar="N", help="layers printed (all are in the reports; default 10)")
    k.add_argument("-q", "--quiet", action="store_true", help="no progress or tables on stdout/stderr")
    k.set_defaults(func=_check)
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
    s.add_argument("--metric", metavar="MODULE:FUNCTION", help="e2e mode: also compute this task metric per layer (FUNCTION(candidate, reference, samples) -> {name: value})")
    s.add_argument("--calib-samples", type=int, metavar="N", help="use at most N calibration samples")
    s.add_argument("--eval-samples", type=int, metavar="N", help="use at most N evaluation samples")
    s.add_argument("--calib-method", choices=list(METHODS), help="activation range method (default per target: " + ", ".join(f"{k}: {v}" for k, v in DEFAULT_METHOD.items()) + ")")
    s.add_argument("--smoothquant", metavar="ALPHA|auto", help="measure the model with SmoothQuant folded in (as quantize --smoothquant; decided for every layer in INT8); solve repeats it")
    s.add_argument("--split-outliers", metavar="N", type=int, default=0, help="with --smoothquant: as quantize --split-outliers")
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
    target.add_argument("--target-metric", metavar="NAME>=VALUE", help="task metric bound, e.g. top1_agreement>=0.97 (needs --metric or --zoo, or a sweep that has one)")
    target.add_argument("--max-high-precision-layers", type=int, metavar="N", help="keep the N layers the sweep ranks first in high precision")
    v.add_argument("--zoo", metavar="NAME", help="zoo model whose task metric --target-metric names (default: the sweep's metric)")
    v.add_argument("--metric", metavar="MODULE:FUNCTION", help="task metric --target-metric names (default: the sweep's)")
    v.add_argument("--latency-json", metavar="FILE", help="per-layer costs {layer or node: {precision: cost}} instead of the nominal roofline")
    v.add_argument("--min-8bit-macs", type=float, metavar="FRACTION", help="never promote a layer if that leaves less than FRACTION of MatMul/Gemm MACs in 8 bits")
    v.add_argument("--order", choices=["sensitivity", "per-cost"], default="sensitivity", help="promotion order: most sensitive first, or sensitivity per added cost (default: sensitivity)")
    v.add_argument("--precisions", help="comma-separated 8-bit candidates to use, a subset of the sweep's (default: all)")
    v.add_argument("--calib-samples", type=int, metavar="N", help="use at most N calibration samples")
    v.add_argument("--eval-samples", type=int, metavar="N", help="use at most N evaluation samples")
    v.add_argument("--calib-method", choices=list(METHODS), help="activation range method (as for quantize)")
    v.add_argument("--save-model", metavar="MODEL.onnx", help="also write the chosen candidate's Q/DQ model (the one the accuracy was measured on)")
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
