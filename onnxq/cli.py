"""`onnxq` command line: parses arguments, calls the API, prints. Errors exit 2 without traceback."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import re
import sys

from onnxq.errors import OnnxqError, one_line

EXIT_ERROR = 2


def _recipe(args: argparse.Namespace):
    """The recipe: ``--recipe FILE`` (if given) with the recipe flags given on the command line
    overriding it."""
    from onnxq.recipe import Recipe

    base = Recipe.load(args.recipe) if getattr(args, "recipe", None) else Recipe()
    given = {name: getattr(args, name) for name in RECIPE_OPTIONS if hasattr(args, name)}
    return base.merged(given)


def _quantize(args: argparse.Namespace) -> int:
    from onnxq.pipeline import quantize

    result = quantize(
        args.model, args.output, args.calib, recipe=_recipe(args), eval=args.eval, plan=args.plan,
        save_plan=args.save_plan, table=args.table, evaluate=not args.no_eval, quiet=args.quiet,
    )
    if not args.quiet and result.accuracy:
        from onnxq.check import format_table
        from onnxq.pipeline import precision_label

        plan = result.plan
        print(format_table(result.accuracy, f"ORT FP32 vs ORT {precision_label(plan)} ({plan.target}) on {result.eval_source}:"))
    print(f"wrote {result.output}" + (f" and {result.report_path}" if result.report_path else ""))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from onnxq.calibration import calibrate

    recipe = _recipe(args)
    table = calibrate(
        args.model, args.calib, args.output, method=recipe.calib_method, percentile=recipe.percentile,
        calib_samples=recipe.calib_samples, calib_batch=recipe.calib_batch, calib_blocks=recipe.calib_blocks, providers=recipe.providers, quiet=args.quiet,
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

    recipe = _recipe(args)
    result = sweep(
        args.model,
        args.calib,
        args.output,
        eval=args.eval,
        mode=args.mode,
        precisions=args.precisions,
        recipe=recipe,  # flags and --recipe FILE merged: every field the sweep uses, none dropped
        metric=_metric_spec(args),
        eval_samples=args.eval_samples,
        layers_only=args.layers.split(",") if args.layers else None,
        quiet=args.quiet,
    )
    if not args.quiet:
        print(result.to_markdown())
    print(f"wrote {args.output} ({len(result.layers)} layers x {len(result.precisions)} precisions, mode {result.mode})")
    return 0


def _solve(args: argparse.Namespace) -> int:
    from onnxq.mixed_precision.options import TargetNotMetError

    try:
        result = _run_solve(args)
    except TargetNotMetError as exc:
        # a result, like a failed check: the candidates' report is written (exit 1), no plan
        print(f"onnxq: target not met: {exc}", file=sys.stderr)
        return 1
    c = result.chosen
    print(
        f"wrote {result.output} ({c['high_precision_layers']} of {len(result.order)} layers in high precision; "
        f"accuracy {c['accuracy']:.4f}; cost x{c['cost']:.3f} of all-8-bit; "
        f"{c['matmul_macs_8bit_fraction']:.1%} of MatMul/Gemm MACs in 8 bits), {result.report_path}"
        + (f", {result.curve_path}" if result.curve_path else "")
        + (f", {result.model_path}" if result.model_path else "")
    )
    return 0


def _run_solve(args: argparse.Namespace):
    from onnxq.mixed_precision.solver import solve

    recipe = _recipe(args)
    return solve(
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
        calib_samples=recipe.calib_samples,
        eval_samples=args.eval_samples,
        method=recipe.calib_method if recipe.given("calib_method") else None,
        percentile=recipe.percentile,
        save_model=args.save_model,
        quiet=args.quiet,
    )


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

    from onnxq.modelio import check_outputs

    check_outputs([args.output], [args.factory])
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
    from onnxq.modelio import atomic_path

    with atomic_path(output) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def _diff(args: argparse.Namespace) -> int:
    from onnxq.diff import diff, render
    from onnxq.modelio import transaction

    with transaction([args.output], [args.a, args.b]):
        result = diff(args.a, args.b, dims=_dims(args.dim))
        _write_or_print(render(result, args.format), args.output)
    return 0 if result.equivalent else 1


def _inspect(args: argparse.Namespace) -> int:
    import json

    from onnxq.inspect import format_text, inspect
    from onnxq.modelio import transaction

    with transaction([args.output], [args.model]):
        info = inspect(args.model, dims=_dims(args.dim))
        _write_or_print(json.dumps(info, indent=1) if args.format == "json" else format_text(info), args.output)
    return 0


def _build(args: argparse.Namespace) -> int:
    from onnxq.runtime.tensorrt import build_engine

    result = build_engine(args.model, args.output, shapes=args.shapes or (), workspace=args.workspace, timing_cache=args.timing_cache)
    print(f"wrote {result.engine} and {result.manifest}")
    return 0


def _run_check(args: argparse.Namespace, check, thresholds):
    return check(
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
        thresholds=thresholds,
        metric=_metric_spec(args),
        metric_samples=args.zoo_samples,
        layers=args.layers,
        layer_samples=args.layer_samples,
        progress=not args.quiet,
    )


def _check(args: argparse.Namespace) -> int:
    from onnxq.check import EXIT_FAILED, Thresholds, check, format_metric_table, format_table
    from onnxq.localize import format_layers
    from onnxq.modelio import transaction
    from onnxq.report import report_paths, write_reports

    inputs = [args.reference, *args.candidates, *(args.engine or ()), args.data, args.metric]
    with transaction(report_paths(args.output).values(), inputs):
        report = _run_check(args, check, Thresholds(args.min_cosine, args.min_snr, args.max_latency_ratio))
        paths = write_reports(report, args.output)
    if not args.quiet:
        for cand in report.candidates:
            print(format_table(cand.outputs, f"{cand.label} vs {report.reference} on {report.samples} samples:"))
            for lat in cand.latency:
                print(f"  latency batch {lat.batch}: median {lat.median_ms:.3f} ms, p90 {lat.p90_ms:.3f}, p99 {lat.p99_ms:.3f} "
                      f"(x{cand.latency_ratio.get(lat.batch, float('nan')):.3f} of FP32)")
            if cand.layers is not None:
                print("  lowest per-layer SNR:")
                print(format_layers(cand.layers, top=args.layer_top))
            print(f"  {report.verdict(cand)}")
        if format_metric_table(report):
            print(format_metric_table(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if report.passed else EXIT_FAILED


# --- option groups, declared once ----------------------------------------------------------------

# The recipe's options (onnxq.recipe.Recipe): default SUPPRESS, so only flags given on the command
# line override a --recipe file.
RECIPE_OPTIONS: dict[str, tuple[tuple[str, ...], dict]] = {
    "target": (("--target",), {"choices": ["tensorrt", "ort"], "help": "deployment target whose Q/DQ rules apply (default: tensorrt)"}),
    "precision": (("--precision",), {"choices": ["int8", "fp8", "w4a16", "w8a16", "w4a8"], "help": "quantized precision: int8, fp8 (E4M3FN, opset 19; ranges on the FP8 grid), weight-only w4a16 / w8a16 (blocked INT4/INT8 MatMul/Gemm weights, float activations, opset 21), or w4a8 (blocked INT4 weights, FP8 activations) (default: int8)"}),
    "quantize_head": (("--quantize-head",), {"action": argparse.BooleanOptionalAction, "help": "weight-only: quantize the LM head (the MatMul/Gemm writing a graph output) too (default: on for w4a16/w8a16 on the ort target, off otherwise)"}),
    "weight_method": (("--weight-method",), {"choices": ["rtn", "awq", "gptq", "awq+gptq"], "help": "rtn (round to nearest, no data needed), gptq (each weight's rounding chosen against its layer's Hessian from --calib; also for int8/fp8 per-channel weights), or, weight-only, awq (per-channel scales and per-block clipping searched on --calib rows) or awq+gptq (GPTQ on the AWQ-scaled model) (default: rtn)"}),
    "dynamic": (("--dynamic",), {"action": "store_true", "help": "ort target, int8: quantize MatMul/Gemm activations at run time (DynamicQuantizeLinear + MatMulInteger, as quantize_dynamic); no calibration data needed"}),
    "head_bits": (("--head-bits",), {"type": int, "choices": [4, 8], "help": "weight-only: bits of the LM head's and the embedding table's weights under --quantize-head / --quantize-embedding (default: 8; 4 costs SmolLM2-135M a third of its perplexity, docs/weight-only.md)"}),
    "ort_weight_form": (("--ort-weight-form",), {"choices": ["matmulnbits", "dq"], "help": "w4a16/w8a16, ort target: emit ONNX Runtime's com.microsoft MatMulNBits, or the standard blocked DequantizeLinear -> MatMul (ORT fuses it into MatMulNBits at accuracy level 4) (default: matmulnbits)"}),
    "ort_accuracy_level": (("--ort-accuracy-level",), {"type": int, "choices": [0, 1, 2, 4], "help": "w4a16/w8a16, ort target: MatMulNBits' accuracy_level for 4-bit weights: 0/1/2 float compute (prefill at FP32's speed, lower perplexity), 4 INT8 activations per block (decoding ~1.6x faster) (default: 1; measured in docs/weight-only.md)"}),
    "int8_share": (("--int8-share",), {"type": float, "metavar": "F", "help": "weight-only GPTQ: keep this share (0-1) of the 4-bit weights' elements at 8 bits, the products whose 4-bit output error on their Hessian is largest first (default: 0)"}),
    "gptq_act_order": (("--gptq-act-order",), {"action": argparse.BooleanOptionalAction, "help": "GPTQ (weight-only and int8/fp8): quantize input channels in decreasing order of their Hessian diagonal (default: on)"}),
    "attention_probs": (("--attention-probs",), {"choices": ["int8", "fp8", "float", "unnormalized"], "help": "int8 plans: attention's P·V products (a MatMul reading a Softmax's output) at int8 like every MatMul, fp8 (both operands E4M3: TensorRT on Ada/Hopper GPUs), float, or unnormalized (int8 on E = exp(s - rowmax), whose rows peak at 1, and P·V divided by the row sums of E afterwards: the same function in float) (default: int8)"}),
    "quantize_embedding": (("--quantize-embedding",), {"action": argparse.BooleanOptionalAction, "help": "weight-only, ort target: quantize the embedding Gather's table too (com.microsoft GatherBlockQuantized); a tied LM head needs --quantize-head as well (default: on for w4a16/w8a16 on the ort target)"}),
    "block_size": (("--block-size",), {"type": int, "choices": [32, 64, 128], "metavar": "32|64|128", "help": "weight-only: weights per scale along the reduction axis (default: 128)"}),
    "high_precision": (("--high-precision",), {"choices": ["fp32", "fp16"], "help": "precision of the non-quantized regions: fp32, or fp16 with explicit Casts (norms, softmax inputs and tensors that overflow FP16 stay FP32) (default: fp32)"}),
    "exclude": (("--exclude",), {"action": "append", "metavar": "NAME|REGEX", "help": "keep matching nodes in float (repeatable; regexes match whole names)"}),
    "exclude_op": (("--exclude-op",), {"action": "append", "metavar": "OP", "help": "keep every node of this op type in float (repeatable), e.g. ConvTranspose"}),
    "include": (("--include",), {"action": "append", "metavar": "NAME|REGEX", "help": "quantize only the matching Conv/Gemm/MatMul nodes (repeatable)"}),
    "include_op": (("--include-op",), {"action": "append", "metavar": "OP", "help": "quantize only Conv/Gemm/MatMul nodes of these op types (repeatable)"}),
    "per_tensor_weights": (("--per-tensor-weights",), {"action": "store_true", "help": "one weight scale per tensor instead of per output channel (for runtimes without per-channel weights)"}),
    "calib_samples": (("--calib-samples",), {"type": int, "metavar": "N", "help": "use at most N calibration samples"}),
    "providers": (("--providers",), {"metavar": "LIST", "help": "ONNX Runtime providers for calibration and the closing comparison, preferred first, comma-separated from cpu,cuda,tensorrt (one this onnxruntime lacks is skipped with a message; CPU is always the last fallback) (default: cpu)"}),
    "calib_batch": (("--calib-batch",), {"type": int, "metavar": "N", "help": "calibration samples per ONNX Runtime call where the batch axis is dynamic (default: chosen from memory, at most 16)"}),
    "calib_blocks": (("--calib-blocks",), {"metavar": "auto|MB", "help": "calibrate block by block, only one block's weights resident: auto cuts at every residual boundary (each RMSNorm/LayerNorm input), MB merges them into blocks of about MB of weights (default: the whole model at once)"}),
    "calib_method": (("--calib-method",), {"choices": ["minmax", "percentile", "entropy", "mse"], "help": "activation range method (default: mse; with --table: the table's)"}),
    "percentile": (("--percentile",), {"type": float, "metavar": "P", "help": "percentile for --calib-method percentile (default 99.99)"}),
    "smoothquant": (("--smoothquant",), {"metavar": "ALPHA|auto", "help": "fold SmoothQuant scales into the graph first: migration strength in [0, 1], or auto (per group, by simulated W8A8 error)"}),
    "split_outliers": (("--split-outliers",), {"metavar": "N", "type": int, "help": "with --smoothquant: up to N input channels per MatMul/Gemm group whose smoothed range dominates go to a float side product (LLM.int8()-style)"}),
    "equalize": (("--equalize",), {"action": "store_true", "help": "cross-layer equalization: rescale the channels of consecutive Conv/Gemm pairs so their weight ranges match (exact in float; before calibration)"}),
    "rotate": (("--rotate",), {"action": "store_true", "help": "rotate a pre-norm decoder's residual stream by a randomized Hadamard matrix folded into the weights (QuaRot-style; exact in float; before calibration)"}),
    "rotate_online": (("--rotate-online",), {"type": int, "metavar": "B", "help": "with --rotate: a block-diagonal Hadamard (blocks of B, a power of two) inserted before each MLP down projection as a MatMul, its transpose folded into the weight, and a per-head Hadamard on attention's queries and keys"}),
    "bias_correction": (("--bias-correction",), {"action": "store_true", "help": "add to each quantized Conv/Gemm's bias the opposite of its quantized output's mean error per channel, measured on --calib"}),
    "depthwise_min_snr": (("--depthwise-min-snr",), {"type": float, "metavar": "DB", "help": "keep in float each depthwise Conv whose own quantized output's SNR, measured on --calib, is below DB (e.g. 34)"}),
}
PLACEMENT = ("target", "precision", "high_precision", "exclude", "exclude_op", "include", "include_op", "per_tensor_weights", "block_size", "quantize_head", "quantize_embedding", "head_bits", "weight_method", "gptq_act_order", "int8_share", "ort_weight_form", "ort_accuracy_level", "dynamic", "attention_probs")
CALIBRATION = ("calib_samples", "calib_method", "percentile")
SMOOTHING = ("smoothquant", "split_outliers")
CORRECTIONS = ("equalize", "rotate", "rotate_online", "bias_correction", "depthwise_min_snr")


def _add_recipe(p: argparse.ArgumentParser, names) -> None:
    g = p.add_argument_group("recipe (flags override --recipe)")
    g.add_argument("--recipe", metavar="FILE", help="the request as YAML or JSON, keys spelled like these options (e.g. 'calib-method: minmax')")
    for name in names:
        flags, kwargs = RECIPE_OPTIONS[name]
        g.add_argument(*flags, dest=name, default=argparse.SUPPRESS, **kwargs)


def _add_model(p: argparse.ArgumentParser, name: str = "model", help: str = "input ONNX model (never modified)") -> None:
    p.add_argument(name, help=help)


def _add_output(p: argparse.ArgumentParser, help: str, *, metavar: str | None = None, required: bool = True, default: str | None = None) -> None:
    p.add_argument("-o", "--output", required=required, default=default, metavar=metavar, help=help)


def _add_quiet(p: argparse.ArgumentParser, help: str = "no progress or summary on stderr/stdout") -> None:
    p.add_argument("-q", "--quiet", action="store_true", help=help)


def _add_data(p: argparse.ArgumentParser, *, calib_required: bool, eval_help: str | None, eval_required: bool = False) -> None:
    p.add_argument("--calib", required=calib_required, help="calibration data: .npz (one array per input, leading axis = samples), a directory of .npz, or module:function")
    if eval_help is not None:
        p.add_argument("--eval", required=eval_required, help=eval_help)


def _add_metric(p: argparse.ArgumentParser, purpose: str) -> None:
    g = p.add_argument_group("task metric")
    g.add_argument("--metric", metavar="MODULE:FUNCTION", help=f"{purpose}: FUNCTION(candidate, reference, samples) -> {{name: value}}")
    g.add_argument("--zoo", metavar="NAME", help="shorthand for --metric with this zoo model's metric (onnxq zoo list)")


def _add_eval_samples(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-samples", type=int, metavar="N", help="use at most N evaluation samples")


def _add_dims(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of a dynamic dimension for MAC counts (default 1), e.g. seq=128")


# --- subcommands ---------------------------------------------------------------------------------


def _quantize_parser(sub) -> None:
    q = sub.add_parser("quantize", help="insert Q/DQ from calibration data and compare with the float model")
    _add_model(q)
    _add_output(q, "output Q/DQ ONNX model; a .report.json is written beside it")
    _add_data(q, calib_required=False, eval_help="held-out evaluation data, same forms as --calib (default: the calibration data, flagged as not held out)")
    _add_recipe(q, (*PLACEMENT, *CALIBRATION, "calib_batch", "calib_blocks", "providers", *SMOOTHING, *CORRECTIONS))
    q.add_argument("--plan", help="a QuantPlan JSON (from --save-plan, possibly edited): its decisions are used as they are; a complete plan rebuilds its model byte for byte")
    q.add_argument("--save-plan", metavar="PATH", help="write the QuantPlan as JSON")
    q.add_argument("--table", metavar="TABLE.json", help="ranges from a calibration table written by onnxq calibrate (skips calibration)")
    q.add_argument("--no-eval", action="store_true", help="skip the closing comparison with the float model")
    _add_quiet(q)
    q.set_defaults(func=_quantize)


def _calibrate_parser(sub) -> None:
    c = sub.add_parser("calibrate", help="collect calibration statistics once and write them as a reusable table")
    _add_model(c)
    _add_data(c, calib_required=True, eval_help=None)
    _add_output(c, "calibration table to write (JSON)", metavar="TABLE.json")
    _add_recipe(c, (*CALIBRATION, "calib_batch", "calib_blocks", "providers"))
    _add_quiet(c, "no progress or summary on stderr")
    c.set_defaults(func=_calibrate)


def _export_parser(sub) -> None:
    e = sub.add_parser("export", help="export a PyTorch module to ONNX (dynamo exporter) and verify it against torch in ORT")
    e.add_argument("factory", metavar="MODULE:FACTORY", help="a function returning the torch.nn.Module, e.g. onnxq.zoo.minilm:torch_module or path/to/file.py:build")
    _add_output(e, "output .onnx (weights over 1 GiB go to OUT.onnx.data)")
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


def _review_parsers(sub) -> None:
    d = sub.add_parser("diff", help="compare two ONNX graphs layer by layer, looking through Q/DQ and Cast (exit 0 equivalent, 1 different, 2 error)")
    _add_model(d, "a", "first model (e.g. the FP32 one)")
    _add_model(d, "b", "second model (e.g. its quantized version)")
    d.add_argument("--format", choices=["text", "json", "html"], default="text", help="report format (default text); html is one self-contained page")
    _add_output(d, "write the report to this file instead of stdout", required=False)
    _add_dims(d)
    d.set_defaults(func=_diff)

    i = sub.add_parser("inspect", help="opset, IR version, op histogram, Q/DQ by precision, parameters, inputs and outputs")
    _add_model(i, help="ONNX model to describe")
    i.add_argument("--format", choices=["text", "json"], default="text", help="report format (default text)")
    _add_output(i, "write the report to this file instead of stdout", required=False)
    _add_dims(i)
    i.set_defaults(func=_inspect)


def _build_parser(sub) -> None:
    b = sub.add_parser("build", help="build a strongly typed TensorRT engine from a Q/DQ ONNX model (needs tensorrt and a GPU)")
    _add_model(b, help="Q/DQ ONNX model (never modified)")
    _add_output(b, "engine file to write; ENGINE.manifest.json is written beside it", metavar="ENGINE")
    b.add_argument("--shapes", action="append", metavar="NAME:MIN,OPT,MAX", help="optimization profile range of a dynamic input, shapes written 1x128 (repeatable)")
    b.add_argument("--workspace", metavar="SIZE", help="builder workspace limit, e.g. 512M or 2G (default: TensorRT's)")
    b.add_argument("--timing-cache", metavar="PATH", help="tactic timing cache to read (if it exists) and update")
    b.set_defaults(func=_build)


def _check_parser(sub) -> None:
    k = sub.add_parser("check", help="accuracy and latency of candidates vs the FP32 model, with pass/fail thresholds")
    _add_model(k, "reference", "the float ONNX model (run in ONNX Runtime on the CPU)")
    k.add_argument("candidates", nargs="*", help="quantized ONNX models to compare (each on every provider in --providers)")
    k.add_argument("--engine", action="append", metavar="ENGINE", help="a TensorRT engine to compare (repeatable; needs tensorrt and a GPU)")
    k.add_argument("--data", required=True, help="evaluation data, same forms as for quantize")
    _add_output(k, "writes BASE.json, BASE.md and BASE.html (default: check_report)", metavar="BASE", required=False, default="check_report")
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
    _add_metric(k, "also report this task metric for ONNX candidates")
    k.add_argument("--zoo-samples", type=int, metavar="N", help="evaluation samples for --zoo or --metric")
    k.add_argument("--layers", action="store_true", help="per-layer SNR through the Q/DQ pairs, lowest first")
    k.add_argument("--layer-samples", type=int, metavar="N", help="samples for --layers (default: --samples)")
    k.add_argument("--layer-top", type=int, default=10, metavar="N", help="layers printed (all are in the reports; default 10)")
    _add_quiet(k, "no progress or tables on stdout/stderr")
    k.set_defaults(func=_check)


def _mixed_precision_parsers(sub) -> None:
    s = sub.add_parser("sweep", help="per-layer sensitivity: the error of quantizing each layer alone, per precision")
    _add_model(s)
    _add_data(s, calib_required=True, eval_help="data the errors are measured on (default: the calibration data)")
    _add_output(s, "sweep JSON; SWEEP.md (table) and SWEEP.png (chart) are written beside it", metavar="SWEEP.json")
    s.add_argument("--mode", choices=["local", "e2e", "both"], default="local", help="local: every layer in one pass (quantized twins); e2e: one quantized model per layer; both: and their rank correlation (default: local)")
    s.add_argument("--precisions", default="int8,fp8", help="comma-separated candidate precisions (default: %(default)s)")
    s.add_argument("--layers", metavar="NAME,...", help="measure only these layers (default: all)")
    _add_metric(s, "e2e mode: also compute this task metric per layer; solve repeats it")
    _add_eval_samples(s)
    _add_recipe(s, ("target", *CALIBRATION, *SMOOTHING, "equalize", "rotate", "rotate_online", "attention_probs", "weight_method", "gptq_act_order"))
    _add_quiet(s, "no progress or table")
    s.set_defaults(func=_sweep)

    v = sub.add_parser("solve", help="choose each layer's precision from a sweep: lowest cost meeting an accuracy target; writes a QuantPlan")
    v.add_argument("sweep", metavar="SWEEP.json", help="output of onnxq sweep for this model")
    _add_model(v)
    _add_data(v, calib_required=True, eval_help="held-out data the candidates are verified on", eval_required=True)
    _add_output(v, "QuantPlan to write (replay with onnxq quantize --plan); PLAN.solve.json and PLAN.curve.png beside it", metavar="PLAN.json")
    target = v.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-cosine", type=float, metavar="C", help="smallest mean output cosine vs FP32 on --eval")
    target.add_argument("--target-metric", metavar="NAME>=VALUE", help="task metric bound, e.g. top1_agreement>=0.97 (needs --metric or --zoo, or a sweep that has one)")
    target.add_argument("--max-high-precision-layers", type=int, metavar="N", help="keep the N layers the sweep ranks first in high precision")
    _add_metric(v, "the task metric --target-metric names (default: the sweep's)")
    v.add_argument("--latency-json", metavar="FILE", help="per-layer costs {layer or node: {precision: cost}} instead of the nominal roofline")
    v.add_argument("--min-8bit-macs", type=float, metavar="FRACTION", help="never promote a layer if that leaves less than FRACTION of MatMul/Gemm MACs in 8 bits")
    v.add_argument("--order", choices=["sensitivity", "per-cost"], default="sensitivity", help="promotion order: most sensitive first, or sensitivity per added cost (default: sensitivity)")
    v.add_argument("--precisions", help="comma-separated 8-bit candidates to use, a subset of the sweep's (default: all)")
    _add_eval_samples(v)
    _add_recipe(v, CALIBRATION)
    v.add_argument("--save-model", metavar="MODEL.onnx", help="also write the chosen candidate's Q/DQ model (the one the accuracy was measured on)")
    _add_quiet(v, "no progress")
    v.set_defaults(func=_solve)


def _zoo_parser(sub) -> None:
    z = sub.add_parser("zoo", help="the built-in model zoo (needs the zoo extra: pip install 'onnxq[zoo]')")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zl = zsub.add_parser("list", help="list zoo models")
    zl.set_defaults(func=_zoo_list)
    ze = zsub.add_parser("export", help="write model.onnx, calib.npz and eval.npz for a zoo model")
    ze.add_argument("name", help="a zoo model (onnxq zoo list)")
    _add_output(ze, "output directory (created if missing)")
    ze.add_argument("--calib-samples", type=int, metavar="N", help="calibration samples to write (default: the model's)")
    _add_eval_samples(ze)
    ze.set_defaults(func=_zoo_export)


class UsageError(Exception):
    """A command line argparse refused: the message (one line) and the usage of the (sub)command."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """argparse with onnxq's error format: ``onnxq: error: ...`` (plus a "did you mean" for a
    misspelt option or subcommand), then the usage of the subcommand, exit 2 (see :func:`_main`).
    Subparsers are made of this class too (argparse uses the parent's class)."""

    def error(self, message: str):
        command = self.prog.removeprefix("onnxq").strip()  # "quantize", "zoo export"; "" at the top
        raise UsageError(f"{command + ': ' if command else ''}{message}{_suggestion(self, message)}", self.format_usage())


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [o for action in parser._actions for o in action.option_strings if o.startswith("--")]


def _suggestion(parser: argparse.ArgumentParser, message: str) -> str:
    """" (did you mean --xyz?)" for the first misspelt option or choice of ``message``."""
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        words, known = [choice.group(1)], re.findall(r"'([^']*)'", choice.group(2))
    else:
        words, known = re.findall(r"(?<!\S)(--[\w-]+)", message.split(":", 1)[-1]), _option_strings(parser)
    for word in words:
        close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
        if close and close[0] != word:
            return f" (did you mean {close[0]}?)"
    return ""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; an unknown one is reported by the subcommand it was given to (its usage,
    its options for "did you mean"), not by the top-level parser."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _chosen_subparser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _chosen_subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _chosen_subparser(action.choices[getattr(args, action.dest)], args)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from onnxq import __version__

    parser = _Parser(prog="onnxq", description="Post-training quantization of ONNX models for TensorRT and ONNX Runtime.")
    parser.add_argument("--version", action="version", version=f"onnxq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_quantize_parser, _calibrate_parser, _export_parser, _review_parsers, _build_parser, _check_parser, _mixed_precision_parsers, _zoo_parser):
        add(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (which a test harness may have replaced)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


@contextlib.contextmanager
def _logging_to_stderr(quiet: bool):
    """The library's status lines (the ``onnxq`` logger) on stderr while a command runs; ``-q``
    keeps warnings only. The logger is left as it was found."""
    logger = logging.getLogger("onnxq")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM ends the run like Ctrl-C: KeyboardInterrupt unwinds it, so the outputs'
    transaction removes its temporaries (the default action would kill the process at once)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    """The command inside one output transaction: every file it writes appears when it returns."""
    from onnxq import modelio

    with _logging_to_stderr(getattr(args, "quiet", False)), modelio.transaction(inputs=[getattr(args, "recipe", None)]):
        return args.func(args)


def _os_error_line(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{one_line(exc.strerror or exc)}; check the path, its permissions and the free space"


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if argv is None:
        # The program itself, and its outputs are settled: a signal while the interpreter shuts
        # down (ONNX Runtime's threads take a moment) must not turn the exit code into a death.
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code


def _main(argv: list[str] | None) -> int:
    try:
        with _sigterm_interrupts():
            return _run(_parse(argv))
    except UsageError as exc:
        print(f"onnxq: error: {one_line(exc)}\n{exc.usage}", end="", file=sys.stderr)
        return EXIT_ERROR
    except OnnxqError as exc:
        print(f"onnxq: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except UnicodeDecodeError as exc:  # a text file (recipe, plan, table, metric) that is binary
        print(f"onnxq: error: a file given as text is not UTF-8 ({exc.reason} at byte {exc.start}); give the text file (JSON, YAML or Python) it asks for", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("onnxq: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, read-only folder, name too long, a path through a file
        print(f"onnxq: error: {_os_error_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except ModuleNotFoundError as exc:
        if exc.name in ("torch", "transformers", "gguf", "tokenizers", "safetensors", "PIL"):
            print(f"onnxq: error: {exc.name} is not installed; install the zoo extra: pip install 'onnxq[zoo]'", file=sys.stderr)
            return EXIT_ERROR
        raise
