"""The quantize job: recipe → placement → calibration → decisions in the plan → emit → compare.

Data flows one way. The recipe (the request) and the calibration table (immutable once collected)
go in; placement, SmoothQuant and the FP16 regions write their decisions into the
:class:`~onnxq.plan.QuantPlan`; :mod:`onnxq.emit` executes it; the report comes last. A plan
that already holds a decision (``--plan``) is not decided again, so a complete plan rebuilds the
model that wrote it, byte for byte, without calibration data.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxq import awq, emit, gptq, modelio
from onnxq import smoothquant as sq
from onnxq.bias_correction import measure_corrections, measure_local_snr
from onnxq.calibration import (
    DataArg,
    derived_ranges,
    missing_tensors,
    plan_ranges,
)
from onnxq.calibrators import CalibrationTable, collect
from onnxq.calibrators.blocks import use_calib_blocks
from onnxq.calibrators.collector import float_tensors
from onnxq.calibrators.methods import DEFAULT_METHOD
from onnxq.calibrators.subgraphs import graph_path, subgraph_owners
from onnxq.check import compare
from onnxq.data import open_source
from onnxq.equalization import plan_equalization
from onnxq.errors import OnnxqError, PlanError
from onnxq.metrics import OutputAccuracy
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.placement import plan_for
from onnxq.placement.fp16 import float_tensor_names, fp32_nodes
from onnxq.placement.measured import keep_float_below, quantized_depthwise
from onnxq.placement.rules import apply_filters
from onnxq.plan import QuantPlan, SmoothPlan
from onnxq.progress import log, quiet_option, warn
from onnxq.recipe import Recipe
from onnxq.rotation import find_residual_stream
from onnxq.runtime import ort as ort_rt


@dataclass
class QuantizeResult:
    output: Path
    plan: QuantPlan
    table: CalibrationTable | None
    accuracy: list[OutputAccuracy]
    eval_source: str
    report_path: Path | None = None
    high_precision: str = "fp32"
    timings: dict[str, float] = field(default_factory=dict)
    smoothquant: SmoothPlan | None = None
    warnings: list[str] = field(default_factory=list)
    quantized_by_graph: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "output": str(self.output),
            "target": self.plan.target,
            "precision": precision_label(self.plan),
            "precision_counts": precision_counts(self.plan),
            "high_precision": self.high_precision,
            "recipe": self.plan.recipe,
            "plan_summary": self.plan.summary(),
            "quantized_nodes": len(self.plan.quantized_nodes()),
            "quantized_nodes_by_graph": self.quantized_by_graph,
            "warnings": self.warnings,
            "calibration_samples": self.table.num_samples if self.table is not None else 0,
            # the method used: the target's default when none was asked for
            "calibration_method": (self.table.method or DEFAULT_METHOD[self.plan.target]) if self.table is not None else None,
            "evaluation": {"data": self.eval_source, "outputs": [a.to_json() for a in self.accuracy]},
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            **({"smoothquant": self.smoothquant.to_json()} if self.smoothquant is not None else {}),
            **({"rotation": {"summary": self.plan.rotation.summary(), **self.plan.rotation.to_json()}} if self.plan.rotation is not None else {}),
        }


def precision_counts(plan: QuantPlan) -> dict[str, int]:
    """How many of the plan's nodes run at each precision ("float": placed but kept in float)."""
    return dict(Counter(d.precision for d in plan.nodes.values()).most_common())


def precision_label(plan: QuantPlan) -> str:
    """The plan's precision, e.g. "int8"; for a plan that mixes quantized precisions, the mix:
    "mixed (int8 12, fp8 4, float 3)"."""
    if len(plan.precisions()) <= 1:
        return next(iter(plan.precisions()), plan.precision)
    return "mixed (" + ", ".join(f"{p} {n}" for p, n in precision_counts(plan).items()) + ")"


def make_recipe(recipe: Recipe | str | os.PathLike | None, options: Mapping[str, object]) -> Recipe:
    """The recipe of an API call: a Recipe or recipe file, with keyword ``options`` overriding it.
    ``method`` is accepted for ``calib_method`` (the older keyword)."""
    options = dict(options)
    if "method" in options:
        options["calib_method"] = options.pop("method")
    options = {k: v for k, v in options.items() if v is not None}  # None: not given
    base = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe) if recipe is not None else Recipe()
    return base.merged(options, source="options") if options else base.validated()


@quiet_option
def quantize(
    model: str | os.PathLike,
    output: str | os.PathLike,
    calib: DataArg | None = None,
    *,
    recipe: Recipe | str | os.PathLike | None = None,
    eval: DataArg | None = None,
    plan: str | os.PathLike | QuantPlan | None = None,
    save_plan: str | os.PathLike | None = None,
    table: str | os.PathLike | CalibrationTable | None = None,
    report: bool = True,
    evaluate: bool = True,
    **options,
) -> QuantizeResult:
    """Quantize ``model`` to Q/DQ ONNX at ``output`` and compare it with the float model in ORT.

    ``recipe``: a :class:`~onnxq.recipe.Recipe` or a recipe file; keyword ``options`` (``target``,
    ``precision``, ``high_precision``, ``calib_method``/``method``, ``percentile``,
    ``calib_samples``, ``smoothquant``, ``split_outliers``, ``exclude``, ``exclude_op``,
    ``include``, ``include_op``) override it. ``calib``/``eval``: an .npz file, a directory of
    .npz files, ``module:function``, or an iterable of feed dicts; without ``eval`` the comparison
    runs on the calibration data and the report says so. ``table``: a calibration table from
    :func:`onnxq.calibrate` used instead of calibrating. ``plan``: a plan (path or object) whose
    decisions are used as they are; those it lacks are made from the recipe. The report is
    written as JSON beside the output (``<output>.report.json``); ``save_plan`` writes the plan.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    inputs = [model, calib, eval, plan, table, recipe]  # the files among them are never written
    paths = _output_paths(output, save_plan, report)
    modelio.check_outputs(paths.values(), inputs)  # a clash is an error before anything is read
    recipe = make_recipe(recipe, options)
    given_plan = plan if isinstance(plan, QuantPlan) or plan is None else QuantPlan.load(plan)
    if calib is None and table is None and given_plan is None and recipe.activations_quantized:
        raise OnnxqError("quantization needs calibration data: pass --calib DATA (.npz, directory of .npz, or module:function) or --table TABLE")
    if recipe.bias_correction and calib is None and not (given_plan and given_plan.bias_correction is not None):
        raise OnnxqError("--bias-correction needs calibration data: pass --calib DATA (it measures each layer's mean output error)")
    if recipe.depthwise_min_snr is not None and calib is None and not (given_plan and given_plan.local_snr is not None):
        raise OnnxqError("--depthwise-min-snr needs calibration data: pass --calib DATA (it measures each depthwise conv's own error)")
    if recipe.smoothquant is not None and calib is None and not (given_plan and given_plan.smoothquant):
        raise OnnxqError("--smoothquant needs calibration data: pass --calib DATA (it samples activation rows and per-channel ranges)")
    table_source = str(table) if table is not None and not isinstance(table, CalibrationTable) else "the calibration table"
    if table is not None and not isinstance(table, CalibrationTable):
        table = CalibrationTable.load(table)
    _check_percentile_used(recipe, table)
    with modelio.transaction(paths.values(), inputs), ort_rt.use_providers(recipe.providers), use_calib_blocks(recipe.calib_blocks):
        float_model = load_and_preprocess(model)
        modelio.release_detached_values(float_model)  # the float weights are freed as they are quantized
        spec = ort_rt.model_input_spec(float_model)
        calib_data = open_source(calib, spec, limit=recipe.calib_samples, batch=recipe.calib_batch) if calib is not None else None
        # The evaluation data is opened (and its names and shapes checked) before the work.
        eval_data, eval_source = _evaluation_data(eval, calib, spec, recipe, evaluate)
        timings["load"] = time.perf_counter() - t0

        t = time.perf_counter()
        the_plan, table = build(float_model, recipe, calib_data, plan=given_plan, table=table, table_source=table_source, timings=timings)
        emit.check_model(float_model, source=model if isinstance(model, (str, os.PathLike)) else None)
        # the session reads the model from a file with its weights beside it: a proto's bytes
        # would be another copy of the weights
        quant_session = ort_rt.create_session(float_model)
        timings["build"] = time.perf_counter() - t

        t = time.perf_counter()
        # The float reference is the user's own file, as they would run it.
        accuracy = compare(model, quant_session, eval_data, progress=True) if eval_data is not None else []
        timings["evaluate"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        result = QuantizeResult(
            paths["model"], the_plan, table, accuracy, eval_source, timings=timings, high_precision=the_plan.high_precision, smoothquant=the_plan.smoothquant,
            warnings=plan_warnings(the_plan) + ort_level_warnings(float_model), quantized_by_graph=quantized_by_graph(float_model, the_plan),
        )
        _write_outputs(float_model, result, paths)
    return result


def plan_warnings(plan: QuantPlan) -> list[str]:
    """What the user must hear about a plan: nothing to quantize, or candidates but none
    quantized (the output then has no Q/DQ). Each is logged as a warning, and goes to the report."""
    quantized = plan.quantized_nodes()
    if quantized:
        return []
    if not plan.nodes:
        found = "the model has no Conv/ConvTranspose/Gemm/MatMul node (in any graph or If/Loop/Scan body)"
    else:
        reasons = Counter(d.reason.split(" (")[0] for d in plan.nodes.values())
        found = f"0 of {len(plan.nodes)} candidate nodes quantized; reasons: " + "; ".join(f"{r} ({n})" for r, n in reasons.most_common(3))
    warnings = [f"nothing quantized: {found}; the output has no Q/DQ (see --save-plan for each node's reason)"]
    for w in warnings:
        warn(f"onnxq: warning: {w}")
    return warnings


def ort_level_warnings(model: ir.Model) -> list[str]:
    """An FP8 graph that a default ONNX Runtime session computes wrong says so (warning and report).
    onnxq's own sessions run such models at ORT_ENABLE_BASIC, so its numbers are the right ones."""
    nodes = ort_rt.fp8_relu_quantize_nodes(model)
    if not nodes:
        return []
    warning = (
        f"ONNX Runtime at ORT_ENABLE_EXTENDED/ALL (its default) computes this model wrong: its {ort_rt.ORT_FP8_BAD_RULE} rule "
        f"deletes the Relu before {len(nodes)} FP8 QuantizeLinear nodes (e.g. {nodes[0]!r}); run it with "
        f"graph_optimization_level=ORT_ENABLE_BASIC or disabled_optimizers=[{ort_rt.ORT_FP8_BAD_RULE!r}] (TensorRT is not affected)"
    )
    warn(f"onnxq: warning: {warning}")
    return [warning]


def quantized_by_graph(model: ir.Model, plan: QuantPlan) -> dict[str, int]:
    """Quantized nodes per graph: ``main`` and each If/Loop/Scan body (``main/If_0.then_branch``)."""
    owners = subgraph_owners(model.graph)
    counts: dict[str, int] = {}
    for node in model.graph.all_nodes():
        decision = plan.nodes.get(node.name)
        if decision is not None and decision.quantized:
            scope = graph_path(node.graph, owners)
            counts[scope] = counts.get(scope, 0) + 1
    return counts


def _output_paths(output, save_plan, report: bool) -> dict[str, Path | None]:
    """Every output of the job (checked against the inputs and each other before any work)."""
    out = Path(output)
    return {
        "model": out,
        "report": out.parent / (out.name.removesuffix(".onnx") + ".report.json") if report else None,
        "plan": Path(save_plan) if save_plan else None,
    }


def _evaluation_data(eval, calib, spec, recipe: Recipe, evaluate: bool):
    """(data, description) of the closing comparison; data None when it does not run."""
    if not evaluate:
        return None, "skipped"
    if eval is not None:
        data = open_source(eval, spec, require_finite=False)
        return data, data.description
    if calib is None:
        return None, "skipped (ranges from a calibration table or a plan and no --eval data)"
    data = open_source(calib, spec, limit=recipe.calib_samples, require_finite=False)
    return data, f"{data.description} (calibration data, not held out: pass --eval)"


def _write_outputs(model: ir.Model, result: QuantizeResult, paths: Mapping[str, Path | None]) -> None:
    modelio.save(model, paths["model"])
    if paths["plan"] is not None:
        result.plan.save(paths["plan"])
    if paths["report"] is not None:
        with modelio.atomic_path(paths["report"]) as tmp:
            tmp.write_text(json.dumps(result.to_json(), indent=1))
        result.report_path = paths["report"]


# --- decisions and emit, stage by stage ---------------------------------------------------------


def build(
    model: ir.Model,
    recipe: Recipe,
    data,
    *,
    plan: QuantPlan | None = None,
    table: CalibrationTable | None = None,
    table_source: str = "the calibration table",
    timings: dict | None = None,
) -> tuple[QuantPlan, CalibrationTable | None]:
    """Make every decision ``plan`` lacks and execute it on ``model`` (in place), stage by stage
    (:mod:`onnxq.emit`). Returns the complete plan and the calibration table used."""
    timings = {} if timings is None else timings
    plan = _placement(model, recipe, plan)
    fold_rotation(model, plan, recipe)
    fold_equalization(model, plan, recipe)
    t = time.perf_counter()
    if plan.smoothquant is None and recipe.weight_method in ("awq", "awq+gptq"):
        _decide_awq(model, plan, data)
        timings["awq"] = time.perf_counter() - t
    decide_sq = plan.smoothquant is None and recipe.smoothquant is not None
    request = {}
    if decide_sq:
        groups = sq.find_groups(model, plan)
        request = sq.calibration_request(groups, recipe.smoothquant, split_outliers=recipe.split_outliers)
        if table is not None:
            log("onnxq: --table is not used with --smoothquant: calibrating on --calib (SmoothQuant needs activation rows)")
        table = None
    fp16_extra = float_tensor_names(model.graph) if plan.high_precision == "fp16" and plan.fp32_nodes is None else []
    if table is not None and fp16_extra:
        _require_fp16_ranges(model, table, fp16_extra, table_source)
    missing = missing_tensors(model, plan) if plan.smoothquant is None else []
    if missing or decide_sq:
        table = _calibrate(model, plan, recipe, data, table, table_source, missing, fp16_extra, request)
    timings["calibrate"] = time.perf_counter() - t
    if decide_sq:
        t = time.perf_counter()
        plan.smoothquant = sq.plan_smoothing(model, plan, groups, table, recipe.smoothquant, request.get("reservoirs"), sq.simulated_dtype(plan), recipe.split_outliers)
        request.clear()  # the sampled rows are no longer needed
        timings["smoothquant"] = time.perf_counter() - t
        _log_smoothquant(plan.smoothquant)
    emit.emit(model, plan, ["fold"])
    if recipe.weight_method in ("gptq", "awq+gptq") and not any(w.offsets for w in plan.weights.values()):
        t = time.perf_counter()
        decide_gptq(model, [plan], data, recipe.gptq_act_order, recipe.int8_share)
        timings["gptq"] = time.perf_counter() - t
    table = _fill_ranges(model, plan, recipe, data, table, decided_sq=decide_sq, fp16_extra=fp16_extra)
    _measured_placement(model, plan, recipe, data, timings)
    if recipe.bias_correction and plan.bias_correction is None:
        t = time.perf_counter()
        plan.bias_correction = measure_corrections(model, plan, data)
        timings["bias_correction"] = time.perf_counter() - t
        log(f"onnxq: bias correction: {len(plan.bias_correction)} Conv/Gemm biases corrected by their mean quantization error")
    emit.emit(model, plan, ["quantize"])
    if plan.high_precision == "fp16" and plan.fp32_nodes is None:
        ranges = {n: s.amax for n, s in table.tensors.items()} if table is not None else {}
        plan.fp32_nodes = fp32_nodes(model.graph, ranges)
        log(f"onnxq: FP16 high-precision regions; {len(plan.fp32_nodes)} nodes kept in FP32")
    emit.emit(model, plan, ["finish"])
    return plan, table


def _measured_placement(model: ir.Model, plan: QuantPlan, recipe: Recipe, data, timings: dict) -> None:
    """--depthwise-min-snr: measure each quantized depthwise conv's own error (the ranges are
    decided) and keep those below the threshold in float, before the bias correction."""
    if recipe.depthwise_min_snr is None or plan.local_snr is not None:
        return
    t = time.perf_counter()
    plan.local_snr = measure_local_snr(model, plan, data, quantized_depthwise(model, plan))
    floated = keep_float_below(model, plan, plan.local_snr, recipe.depthwise_min_snr)
    timings["measured_placement"] = time.perf_counter() - t
    log(f"onnxq: measured placement: {len(floated)} of {len(plan.local_snr)} depthwise convs below {recipe.depthwise_min_snr:g} dB kept in float")


def fold_rotation(model: ir.Model, plan: QuantPlan, recipe: Recipe) -> None:
    """Decide the residual stream's rotation if asked and absent, and fold it: before
    calibration, which must see the rotated activations (quantize, and the sweep's and solver's base).
    The same stage rewrites the unnormalized attention probabilities placement decided (``plan.attention``)."""
    if recipe.rotate and plan.rotation is None:
        plan.rotation = find_residual_stream(model, online_block=recipe.rotate_online)
    if plan.rotation is not None:
        log(f"onnxq: rotation: {plan.rotation.summary()}")
    emit.emit(model, plan, ["rotate"])


def fold_equalization(model: ir.Model, plan: QuantPlan, recipe: Recipe) -> None:
    """Decide cross-layer equalization if asked and absent, and fold it: before calibration,
    which must see the equalized activations (quantize, and the sweep's and solver's base)."""
    if recipe.equalize and plan.equalization is None:
        plan.equalization = plan_equalization(model)
        log(f"onnxq: cross-layer equalization: {len(plan.equalization.pairs)} Conv/Gemm pairs, {plan.equalization.iterations} sweeps")
    emit.emit(model, plan, ["equalize"])


def _check_plan_options(plan: QuantPlan, recipe: Recipe) -> None:
    """An option the plan has already decided differently is refused: the output would not be
    what the option asked for, and replaying a plan must not change it silently."""
    decided = {"target": plan.target, "precision": plan.precision}
    if plan.fp32_nodes is not None:
        decided["high_precision"] = plan.high_precision
    for name, value in decided.items():
        if recipe.given(name) and getattr(recipe, name) != value:
            flag = "--" + name.replace("_", "-")
            raise OnnxqError(
                f"{flag} {getattr(recipe, name)} conflicts with the plan, which decided {value}; drop {flag} to replay the plan, "
                f"or drop --plan (or edit the plan's nodes) to quantize at {getattr(recipe, name)}"
            )


def check_plan_fits(model: ir.Model, plan: QuantPlan) -> None:
    """Every quantized node of ``plan`` exists in ``model`` and has the inputs the plan quantizes:
    checked before calibration, so a plan for another model fails at once."""
    by_name = {node.name: node for node in model.graph.all_nodes()}
    for name, decision in plan.quantized_nodes().items():
        node = by_name.get(name)
        if node is None:
            raise PlanError(f"the plan names node {name!r}, which the model does not have; was the plan made for another model?")
        for index in decision.inputs:
            if not 0 <= index < len(node.inputs) or node.inputs[index] is None:
                raise PlanError(f"the plan quantizes input {index} of {name!r}, which has {len(node.inputs)} inputs; was the plan made for another model?")


def _check_percentile_used(recipe: Recipe, table: CalibrationTable | None) -> None:
    """--percentile without a method was accepted by the recipe (a table's method may be
    percentile); refused when the method in use is not."""
    if recipe.percentile is None or recipe.calib_method is not None:
        return
    method = table.method if table is not None and table.method is not None else DEFAULT_METHOD[recipe.target]
    methods = set(method.values()) if isinstance(method, Mapping) else {method}
    if "percentile" not in methods:
        raise OnnxqError(f"--percentile only applies to --calib-method percentile, and the method in use is {method!r}; drop --percentile or pass --calib-method percentile")


def _require_fp16_ranges(model: ir.Model, table: CalibrationTable, tensors, table_source: str) -> None:
    """FP16 regions keep the tensors that overflow FP16 in FP32, which needs every FP32 tensor's
    range: a table without them would silently drop that protection."""
    missing = [t for t in float_tensors(model, tensors) if t not in table.tensors]
    if missing:
        raise OnnxqError(
            f"{table_source} has no range for {len(missing)} FP32 tensors (e.g. {missing[0]!r}) that --high-precision fp16 checks for FP16 overflow; "
            "pass --calib DATA instead of --table, or write the table again with this version's onnxq calibrate (it records them)"
        )
def _group_statistics(model: ir.Model, plan: QuantPlan, data, alpha: float | str, split_outliers: int = 0):
    """(groups, request, table): the smoothing groups of ``plan`` and one pass over ``data``
    collecting what SmoothQuant and AWQ decide from (per-channel ranges, sampled rows)."""
    groups = sq.find_groups(model, plan)
    request = sq.calibration_request(groups, alpha, split_outliers=split_outliers)
    return groups, request, collect(model, [g.activation for g in groups], data, progress=True, **request)


def _decide_awq(model: ir.Model, plan: QuantPlan, data) -> None:
    """AWQ's scales and clip factors (:mod:`onnxq.awq`) from rows sampled in one calibration pass."""
    if data is None:
        raise OnnxqError("--weight-method awq needs calibration data: pass --calib DATA (it samples the input rows of each linear layer)")
    groups, request, table = _group_statistics(model, plan, data, "auto")
    plan.smoothquant = awq.plan_awq(model, plan, groups, request["reservoirs"], table)
    log(f"onnxq: AWQ: {len(plan.smoothquant.active())} of {len(groups)} groups scaled; clip factors searched for {sum(w.clip is not None for w in plan.weights.values())} weights")


def decide_gptq(model: ir.Model, plans: Sequence[QuantPlan], data, act_order: bool, int8_share: float = 0.0) -> None:
    """GPTQ's rounding (:mod:`onnxq.gptq`) of every weight-only MatMul/Gemm, and of the int8/FP8
    weights of W8A8 ones (per channel or per tensor), from the Hessians of their inputs summed in
    calibration passes over the folded (AWQ/SmoothQuant, rotation) model, a bounded set per pass.
    The Hessians are of the float activations, also where the node's input is quantized: GPTQ
    compensates the weight's rounding against the input the layer was trained on. So one set of
    Hessians serves every plan of ``plans`` (the solver's one plan per precision), each rounded
    on its own grids."""
    if data is None:
        raise OnnxqError("--weight-method gptq needs calibration data: pass --calib DATA (it sums each linear layer's input Hessian)")
    targets = [gptq.gptq_targets(model, plan) for plan in plans]
    union = {activation: nodes for t in targets for activation, nodes in t.items()}
    errors: dict[str, tuple[float, float]] = {}
    for chunk in gptq.hessian_chunks(model, plans[0], union):
        hessians = {name: gptq.HessianAccumulator(-1) for name in chunk}
        collect(model, chunk, data, progress=True, reservoirs=hessians)
        for plan, plan_targets in zip(plans, targets):
            if int8_share:  # per pass: one pass holds every Hessian of a model up to ~1.5B parameters
                promoted = gptq.promote_sensitive(model, plan, {a: (plan_targets[a], hessians[a].h) for a in chunk if a in plan_targets and hessians[a].h is not None}, int8_share)
                log(f"onnxq: GPTQ: {len(promoted)} weights with the largest 4-bit output error kept at 8 bits (--int8-share {int8_share:g})")
            for name in chunk:
                if name in plan_targets and hessians[name].h is not None:
                    errors.update(gptq.plan_gptq_nodes(model, plan, plan_targets[name], hessians[name].h, act_order=act_order))
        hessians.clear()
    rtn, ours = (float(np.mean([e[i] for e in errors.values()])) if errors else 0.0 for i in (0, 1))
    log(f"onnxq: GPTQ: {len(errors)} weights; mean relative layer output error {ours:.4g} (round-to-nearest: {rtn:.4g})")
    for name, (before, after) in sorted(errors.items(), key=lambda kv: -kv[1][1])[:5]:
        log(f"onnxq: GPTQ:   {name}: {after:.4g} (RTN {before:.4g})")


def _placement(model: ir.Model, recipe: Recipe, plan: QuantPlan | None) -> QuantPlan:
    if plan is None:
        plan = plan_for(model, recipe)
    else:
        _check_plan_options(plan, recipe)
        check_plan_fits(model, plan)
        apply_filters(model, plan, exclude=recipe.exclude, exclude_op=recipe.exclude_op, include=recipe.include, include_op=recipe.include_op)
        if plan.recipe is None:
            plan.recipe = recipe.to_json()
        if plan.fp32_nodes is None:
            plan.high_precision = recipe.high_precision
    log(f"onnxq: plan for {plan.target}: {len(plan.quantized_nodes())} of {len(plan.nodes)} candidate nodes quantized")
    return plan


def _calibrate(model, plan, recipe, data, table, table_source, tensors, fp16_extra, request) -> CalibrationTable:
    """Ranges for ``tensors`` (the plan's tensors without parameters) from ``table`` or one pass
    over ``data``, plus what SmoothQuant (``request``) and the FP16 overflow check need."""
    if data is None and table is None:
        raise OnnxqError(f"the plan has no ranges for {len(tensors)} tensors (e.g. {tensors[0]!r}); pass --calib DATA to calibrate them" if tensors else "pass --calib DATA")
    return plan_ranges(
        model, plan, data, table, method=recipe.calib_method, percentile=recipe.percentile, table_source=table_source, extra_tensors=fp16_extra, only=tensors, **request,
    )


def _fill_ranges(model, plan, recipe, data, table, *, decided_sq: bool, fp16_extra) -> CalibrationTable | None:
    """After the fold: ranges of the tensors SmoothQuant changed (an overlay on the table), and of
    any tensor the plan still lacks (a plan that arrived with its SmoothQuant decisions)."""
    if decided_sq:
        derived = {g.output: sq.smoothed_range(table.tensors[g.activation], np.asarray(g.scale), g.split) for g in plan.smoothquant.active()}
        return derived_ranges(model, plan, table, derived, data, method=recipe.calib_method, percentile=recipe.percentile)
    if missing := missing_tensors(model, plan):
        return _calibrate(model, plan, recipe, data, None, "", missing, fp16_extra, {})
    return table


def _log_smoothquant(smooth_plan: SmoothPlan) -> None:
    summary = smooth_plan.summary()
    log(
        f"onnxq: SmoothQuant: {summary['smoothed']} of {summary['groups']} groups smoothed; scales folded into "
        + ", ".join(f"{k}: {v}" for k, v in summary["absorbed_by"].items())
        + (f"; {summary['split_channels']} outlier channels in float side products" if smooth_plan.split_outliers else ""),
    )
    log(smooth_plan.format())


# --- SmoothQuant folded into a float model (the sweep, the solver, inspection) -----------------


def fold_smoothquant(model: ir.Model, plan: QuantPlan, data, alpha: float | str, *, split_outliers: int = 0) -> SmoothPlan:
    """Decide SmoothQuant for ``plan`` from one statistics pass over ``data``, record it in
    ``plan.smoothquant`` and fold it into the float ``model`` in place (no ranges: the sweep and
    the solver calibrate the smoothed model themselves)."""
    groups, request, table = _group_statistics(model, plan, data, alpha, split_outliers)
    plan.smoothquant = sq.plan_smoothing(model, plan, groups, table, alpha, request.get("reservoirs"), sq.simulated_dtype(plan), split_outliers)
    emit.emit(model, plan, ["fold"])
    return plan.smoothquant


def smooth_model(model, calib, alpha: float | str = 0.5, *, target: str = "tensorrt", exclude=(), calib_samples: int | None = None, split_outliers: int = 0) -> tuple[ir.Model, SmoothPlan]:
    """The float model with SmoothQuant folded in and no Q/DQ (what :func:`quantize` does before
    inserting Q/DQ), and the SmoothQuant decisions: to inspect or test the rewrite."""
    recipe = Recipe.from_options({"target": target, "exclude": list(exclude), "smoothquant": alpha, "split_outliers": split_outliers, "calib_samples": calib_samples})
    float_model = load_and_preprocess(model)
    data = open_source(calib, ort_rt.model_input_spec(float_model), limit=recipe.calib_samples)
    quant_plan = plan_for(float_model, recipe)
    return float_model, fold_smoothquant(float_model, quant_plan, data, recipe.smoothquant, split_outliers=recipe.split_outliers)
