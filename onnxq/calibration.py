"""The calibration step: which tensors a plan needs, which range method each gets, their
statistics (from one streaming pass over data, or from a saved table), and the plan's activation
scales and zero points.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxq import modelio
from onnxq.calibrators import CalibrationTable, collect
from onnxq.calibrators.blocks import parse_blocks, use_calib_blocks
from onnxq.calibrators.table import TensorStats
from onnxq.calibrators.methods import DEFAULT_METHOD, HISTOGRAM_METHODS
from onnxq.data import open_source
from onnxq.errors import OnnxqError, PlanError
from onnxq.grids import GRIDS, scale_zero_point
from onnxq.ops import activation_channel_axis
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.placement import TARGETS, place
from onnxq.placement.fp16 import float_tensor_names
from onnxq.plan import FLOAT, FP8_DTYPE, ActivationQuant, NodeDecision, QuantPlan, activation_precision
from onnxq.progress import log, quiet_option, warn
from onnxq.runtime import ort as ort_rt

DataArg = str | os.PathLike | Iterable[Mapping[str, np.ndarray]]
MethodArg = str | Mapping[str, str] | None

# Activation integer type of each target: TensorRT is symmetric INT8, ORT's CPU kernels prefer U8.
ACTIVATION_DTYPE = {"tensorrt": "int8", "ort": "uint8"}


def activation_dtype(target: str, precision: str) -> str:
    """The activation dtype of a precision on a target: FP8 is symmetric E4M3FN everywhere."""
    return FP8_DTYPE if precision == "fp8" else ACTIVATION_DTYPE[target]


def _quantized_readers(model: ir.Model, plan: QuantPlan) -> dict[str, list[tuple[ir.Node, str]]]:
    """tensor -> (node, precision) of each quantized node the plan has read it as an activation."""
    by_name = {n.name: n for n in model.graph.all_nodes()}
    readers: dict[str, list[tuple[ir.Node, str]]] = {}
    for node_name, decision in plan.nodes.items():
        node = by_name.get(node_name)
        if not decision.quantized or node is None:
            continue
        for index, kind in decision.inputs.items():
            if kind == "activation" and index < len(node.inputs) and node.inputs[index] is not None:
                readers.setdefault(node.inputs[index].name, []).append((node, activation_precision(decision.precision)))
    return readers


def tensor_precisions(model: ir.Model, plan: QuantPlan) -> dict[str, set[str]]:
    """For each activation tensor the plan quantizes, the precisions of the nodes reading it
    (``plan.outputs`` are read at the plan's precision)."""
    out = {t: {p for _, p in r} for t, r in _quantized_readers(model, plan).items()}
    for tensor in plan.outputs:
        out.setdefault(tensor, set()).add(plan.precision)
    return out


def activation_tensors(model: ir.Model, plan: QuantPlan) -> list[str]:
    """Names of the activation tensors the plan quantizes, in graph order."""
    by_name = {n.name: n for n in model.graph.all_nodes()}
    names: dict[str, None] = {}
    for node_name, decision in plan.nodes.items():
        if not decision.quantized:
            continue
        node = by_name.get(node_name)
        if node is None:
            raise PlanError(f"the plan names node {node_name!r}, which the model does not have; was it made for another model?")
        for index, kind in decision.inputs.items():
            if kind == "activation":
                names[node.inputs[index].name] = None
    for tensor in plan.outputs:
        names[tensor] = None
    return list(names)


def resolve_methods(method: MethodArg, target: str) -> dict[str, str]:
    """``method`` as ``{consumer op type (lower case) or "default": method}``.

    A string applies to every tensor; a mapping picks by the op type of the node that reads the
    tensor (e.g. ``{"matmul": "entropy", "default": "minmax"}``); without ``"default"`` the
    target's default method fills in.
    """
    from onnxq.calibrators.methods import check_method

    if method is None:
        return {"default": DEFAULT_METHOD[target]}
    if isinstance(method, str):
        return {"default": check_method(method)}
    if not isinstance(method, Mapping):
        raise OnnxqError(f"method must be a name or a mapping {{op type: name}}, got {type(method).__name__}")
    out = {str(k).lower(): check_method(v) for k, v in method.items()}
    out.setdefault("default", DEFAULT_METHOD[target])
    return out


def tensor_methods(model: ir.Model, plan: QuantPlan, tensors: Sequence[str], methods: Mapping[str, str]) -> dict[str, str]:
    """The range method of each tensor: that of the first quantized reader whose op type is named."""
    readers = {t: [n.op_type.lower() for n, _ in r] for t, r in _quantized_readers(model, plan).items()}
    if len(methods) > 1:
        values = {v.name: v for n in model.graph.all_nodes() for v in n.outputs}
        values.update({v.name: v for v in model.graph.inputs})
        for tensor in plan.outputs:
            value = values.get(tensor)
            if value is not None:
                readers.setdefault(tensor, []).extend(u.node.op_type.lower() for u in value.uses())
    out = {}
    for t in tensors:
        op = next((o for o in readers.get(t, []) if o in methods), "default")
        out[t] = methods[op]
    return out


def channel_axes(model: ir.Model, plans: Iterable[QuantPlan]) -> dict[str, int]:
    """Per-channel statistics axis of every activation read by a MatMul/Gemm/Conv in ``plans``."""
    by_name = {n.name: n for n in model.graph.all_nodes()}
    axes: dict[str, int] = {}
    for plan in plans:
        for node_name, decision in plan.nodes.items():
            node = by_name.get(node_name)
            if node is None:
                continue
            for index, kind in decision.inputs.items():
                if kind != "activation" or index >= len(node.inputs) or node.inputs[index] is None:
                    continue
                axis = activation_channel_axis(node.op_type, index, node.attributes)
                if axis is not None:
                    axes.setdefault(node.inputs[index].name, axis)
    return axes


def activation_params(lo: float, hi: float, dtype: str) -> ActivationQuant:
    """The plan entry of an activation range on the ``dtype`` grid (int8 symmetric, uint8
    asymmetric, float8e4m3fn symmetric), its scale stored as float32."""
    if dtype not in GRIDS:
        raise PlanError(f"activation dtype {dtype!r} is not supported; use int8, uint8 or {FP8_DTYPE}")
    grid = GRIDS[dtype]
    scale, zero = scale_zero_point(lo, hi, grid)
    return ActivationQuant(dtype=dtype, symmetric=grid.symmetric, min=lo, max=hi, scale=float(np.float32(scale)), zero_point=zero)


def fill_activation_params(
    plan: QuantPlan,
    table: CalibrationTable,
    methods: Mapping[str, str] | None = None,
    percentile: float | None = None,
    tensors: Iterable[str] | None = None,
    precisions: Mapping[str, Iterable[str]] | None = None,
) -> None:
    """Scale and zero point of each activation tensor from its statistics and range method.

    ``precisions``: the precisions ("int8", "fp8") to fill for each tensor (default: the plan's
    precision for every tensor); each gets its range on its own grid (``plan.set_activation``).
    A sweep that tries every tensor at both precisions passes ``{t: ("int8", "fp8") ...}``.
    """
    from onnxq.calibrators.methods import DEFAULT_PERCENTILE, compute_range

    methods = methods or {}
    p = DEFAULT_PERCENTILE if percentile is None else percentile
    for name in table.tensors if tensors is None else tensors:
        stats = table.tensors[name]
        wanted = (plan.precision,) if precisions is None else precisions.get(name, (plan.precision,))
        for precision in sorted(wanted):
            dtype = activation_dtype(plan.target, precision)
            lo, hi = compute_range(
                stats.min, stats.max, stats.histogram, methods.get(name, "minmax"), symmetric=dtype != "uint8",
                percentile=p, name=name, grid="fp8" if precision == "fp8" else "int8",
            )
            plan.set_activation(name, precision, activation_params(lo, hi, dtype))


def all_calibration_tensors(model: ir.Model) -> tuple[list[str], dict[str, int]]:
    """Every activation any target's policy could quantize (quantized or kept float by default),
    and their per-channel axes: what a reusable calibration table holds."""
    plans = [place(model, target) for target in TARGETS]
    names: dict[str, None] = {}
    for plan in plans:
        relaxed = QuantPlan(
            target=plan.target,
            nodes={k: NodeDecision(d.op_type, plan.precision, dict(d.inputs), d.reason) for k, d in plan.nodes.items()},
            outputs=list(plan.outputs),
        )
        names.update(dict.fromkeys(activation_tensors(model, relaxed)))
    return list(names), channel_axes(model, plans)


@quiet_option
def calibrate(
    model: str | os.PathLike,
    calib: DataArg,
    output: str | os.PathLike | None = None,
    *,
    method: MethodArg = None,
    percentile: float | None = None,
    calib_samples: int | None = None,
    calib_batch: int | None = None,
    calib_blocks: str | None = None,
    providers: Sequence[str] = (),
) -> CalibrationTable:
    """Collect every statistic quantization needs (min, max, histogram, per-channel abs-max) for
    every tensor either target may quantize, and min/max of every other FP32 tensor (the FP16
    overflow check), in one pass; write it as JSON to ``output``.

    The table records the preprocessed model's hash and ``method``/``percentile`` (the defaults
    when the table is used by ``quantize(..., table=...)``). ``calib_blocks``: run the model
    block by block (``"auto"`` or a weight budget in MB per block, :mod:`onnxq.calibrators.blocks`).
    """
    from onnxq.calibrators import model_hash
    from onnxq.calibrators.methods import check_method, check_percentile

    if isinstance(method, str):
        check_method(method)
    elif method is not None:
        resolve_methods(method, "tensorrt")
    if percentile is not None:
        percentile = check_percentile(percentile)
    parse_blocks(calib_blocks)
    with modelio.transaction([output], [model, calib]), ort_rt.use_providers(providers), use_calib_blocks(calib_blocks):
        float_model = load_and_preprocess(model)
        spec = ort_rt.model_input_spec(float_model)
        data = open_source(calib, spec, limit=calib_samples, batch=calib_batch)
        tensors, axes = all_calibration_tensors(float_model)
        # The min/max of every other FP32 tensor too (two scalars each, no histogram): what the
        # FP16 overflow protection of quantize --table T --high-precision fp16 reads.
        fp16_extra = [t for t in float_tensor_names(float_model.graph) if t not in set(tensors)]
        table = collect(float_model, [*tensors, *fp16_extra], data, progress=True, histograms=set(tensors), channel_axes=axes)
        table.method = dict(method) if isinstance(method, Mapping) else method
        table.percentile = percentile
        table.model_sha256 = model_hash(float_model)
        if output is not None:
            table.save(output)
    log(f"onnxq: calibrated {len(table.tensors)} tensors on {table.num_samples} samples")
    return table


def plan_ranges(
    model: ir.Model,
    plan: QuantPlan,
    data: Iterable[Mapping[str, np.ndarray]] | None,
    table: CalibrationTable | None,
    *,
    method: MethodArg = None,
    percentile: float | None = None,
    table_source: str = "the calibration table",
    extra_tensors: Sequence[str] = (),
    channel_axes: Mapping[str, int] | None = None,
    channel_ranges: Iterable[str] = (),
    reservoirs: Mapping | None = None,
    only: Sequence[str] | None = None,
) -> CalibrationTable:
    """Fill the plan's activation parameters (at the precision of each tensor's readers) from a
    pass over ``data``, or from ``table`` when given.

    A table's method and percentile apply unless ``method``/``percentile`` override them. Returns
    the table the ranges came from. ``extra_tensors``: more tensors whose min/max the same pass
    collects (no histograms, no plan parameters), e.g. for the FP16 overflow check.
    ``channel_axes``/``channel_ranges``/``reservoirs`` ask the same pass for per-channel abs-max,
    per-channel min/max and sampled rows (SmoothQuant). ``only``: calibrate and fill just these
    of the plan's tensors (those a given plan has no parameters for).
    """
    tensors = activation_tensors(model, plan) if only is None else list(only)
    if method is None and table is not None and table.method is not None:
        method = table.method
    if percentile is None and table is not None:
        percentile = table.percentile
    methods = tensor_methods(model, plan, tensors, resolve_methods(method, plan.target))
    needs_hist = {t for t, m in methods.items() if m in HISTOGRAM_METHODS}
    if table is not None:
        from onnxq.calibrators import model_hash
        from onnxq.calibrators.collector import float_tensors

        table.check_model(model_hash(model), table_source)
        observed = float_tensors(model, tensors)
        table.require(observed, histograms=needs_hist & set(observed), source=table_source)
        fill_activation_params(plan, table, methods, percentile, tensors=observed, precisions=tensor_precisions(model, plan))
        log(f"onnxq: {len(observed)} tensor ranges from {table_source} ({table.num_samples} samples)")
        return table
    extra = list(dict.fromkeys(t for t in [*extra_tensors, *(channel_axes or {})] if t not in set(tensors)))
    table = collect(
        model, [*tensors, *extra], data, progress=True, histograms=needs_hist,
        channel_axes=channel_axes, channel_ranges=set(channel_ranges), reservoirs=reservoirs,
    )
    table.method = method if method is None or isinstance(method, str) else dict(method)
    table.percentile = percentile
    _float_unobserved(model, plan, table)
    fill_activation_params(
        plan, table, methods, percentile, tensors=[t for t in tensors if t in table.tensors], precisions=tensor_precisions(model, plan)
    )
    log(f"onnxq: calibrated {len(table.tensors)} tensors on {table.num_samples} samples")
    return table


def _float_unobserved(model: ir.Model, plan: QuantPlan, table: CalibrationTable) -> None:
    """Tensors no calibration sample reached (inside an If branch the data never takes, or a Loop
    that ran no iteration) have no range: their readers stay in float, with the reason, and the
    tensors leave the table."""
    unobserved = [t for t, stats in table.tensors.items() if not math.isfinite(stats.min)]
    if not unobserved:
        return
    readers = _quantized_readers(model, plan)
    for tensor in unobserved:
        del table.tensors[tensor]
        for node, _ in readers.get(tensor, []):
            decision = plan.nodes[node.name]
            for index in [i for i, kind in decision.inputs.items() if kind == "weight"]:
                plan.weights.pop(plan.weight_key(node.name, index), None)
            decision.precision, decision.inputs = FLOAT, {}
            decision.reason = f"input {tensor!r} not reached by any calibration sample (a control-flow branch the data never took)"
        if tensor in plan.outputs:
            plan.outputs.remove(tensor)
    warn(f"onnxq: warning: {len(unobserved)} tensors were not reached by the calibration data (e.g. {unobserved[0]!r}, inside a branch it never took); their readers stay in float")


def missing_tensors(model: ir.Model, plan: QuantPlan) -> list[str]:
    """Activation tensors the plan quantizes at some precision it holds no parameters for."""
    precisions = tensor_precisions(model, plan)
    return [t for t in activation_tensors(model, plan) if any(plan.activation(t, p) is None for p in precisions.get(t, ()))]


def derived_ranges(
    model: ir.Model,
    plan: QuantPlan,
    table: CalibrationTable,
    derived: Mapping[str, tuple[float, float]],
    data: Iterable[Mapping[str, np.ndarray]] | None,
    *,
    method: MethodArg = None,
    percentile: float | None = None,
) -> CalibrationTable:
    """Fill the plan's parameters of tensors a rewrite of ``model`` changed (SmoothQuant) without
    a full recalibration; returns ``table`` with their statistics as an overlay (``table`` itself
    is not modified).

    ``derived``: tensor -> (min, max) that follows from statistics already collected (for
    SmoothQuant: per-channel min/max divided by s). Those are the ranges of ``minmax`` tensors.
    Tensors whose method needs a histogram get it from a second pass over ``data`` that observes
    only them (a histogram of ``x / s`` cannot be derived from the histogram of ``x``). The table's
    method and percentile apply unless ``method``/``percentile`` override them.
    """
    names = [t for t in activation_tensors(model, plan) if t in derived]
    method = table.method if method is None else method
    percentile = table.percentile if percentile is None else percentile
    methods = tensor_methods(model, plan, names, resolve_methods(method, plan.target))
    overlay = {t: TensorStats(min=derived[t][0], max=derived[t][1]) for t in names}
    hist = [t for t in names if methods[t] in HISTOGRAM_METHODS]
    if hist:
        if data is None:
            raise OnnxqError("SmoothQuant with a histogram range method needs calibration data (--calib) to recompute the smoothed tensors' histograms")
        log(
            f"onnxq: SmoothQuant: second calibration pass for the histograms of {len(hist)} smoothed tensors "
            f"({', '.join(sorted({methods[t] for t in hist}))}); min/max come from per-channel statistics",
        )
        second = collect(model, hist, data, progress=True, histograms=True)
        for t in hist:
            overlay[t].histogram = second.tensors[t].histogram
    view = with_overlay(table, overlay)
    fill_activation_params(plan, view, methods, percentile, tensors=names, precisions=tensor_precisions(model, plan))
    return view


def with_overlay(table: CalibrationTable, overlay: Mapping[str, TensorStats]) -> CalibrationTable:
    """A view of ``table`` whose ``overlay`` tensors replace its own (``table`` is unchanged)."""
    return dataclasses.replace(table, tensors={**table.tensors, **overlay})
