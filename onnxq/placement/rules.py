"""Graph facts the target policies share: which inputs are weights, GEMV shapes, exclusions."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.ops import LINEAR_OPS, conv_gemm_dims, gemm_dims, static_dims, weight_axis
from onnxq.plan import FLOAT, WEIGHT_DTYPE, NodeDecision, QuantPlan, WeightQuant
from onnxq.weights import FLOAT_TYPES, weight_source

# TensorRT gains nothing from INT8 on GEMV-like products and on convs whose GEMM is that small.
MIN_GEMM_DIM = 16
MIN_CONV_CHANNELS = 16


def is_activation(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is None and value.dtype in FLOAT_TYPES


def gemv_reason(node: ir.Node) -> str | None:
    m, k, n = gemm_dims(node)
    if m == 1 or n == 1:
        return f"GEMV-like (M={m}, N={n}): INT8 gains nothing"
    if (k is not None and k < MIN_GEMM_DIM) or (n is not None and n < MIN_GEMM_DIM):
        return f"too small (K={k}, N={n} < {MIN_GEMM_DIM}): INT8 gains nothing"
    return None


def conv_channels_reason(node: ir.Node) -> str | None:
    """Why a Conv/ConvTranspose stays in float: judged by the GEMM it becomes (per group: reduction
    K = input channels per group × kernel taps, N output channels), like a MatMul. A ViT patch
    embedding (3 → 384 channels, 14×14: K = 588) is a large GEMM; a 1×1 conv from 8 channels
    (K = 8) is not. Depthwise convs (one input channel per group) are judged by their channel
    count, since TensorRT runs them as one batched kernel."""
    gemm = conv_gemm_dims(node)
    if gemm.k is None or gemm.c_out is None:
        return None
    if gemm.groups > 1 and gemm.in_per_group == 1:
        if gemm.c_out < MIN_CONV_CHANNELS:
            return f"depthwise conv with {gemm.c_out} channels (fewer than {MIN_CONV_CHANNELS}): INT8 gains nothing"
        return None
    if gemm.k < MIN_GEMM_DIM or gemm.c_out < MIN_CONV_CHANNELS:
        return (f"GEMM too small: reduction K = {gemm.k} (input channels per group × kernel taps) and "
                f"{gemm.c_out} output channels, where both need >= {MIN_GEMM_DIM}: INT8 gains nothing")
    return None


# TensorRT's FP8 convolution kernels: at least 16 input channels per group and at most 32 filter
# taps (ModelOpt's ONNX FP8 rule, which follows them). Depthwise convs have one channel per group.
MIN_FP8_CONV_GROUP_CHANNELS = 16
MAX_FP8_CONV_TAPS = 32


def fp8_conv_reason(node: ir.Node) -> str | None:
    """Why a Conv stays out of FP8, or None."""
    if node.op_type != "Conv":
        return None
    dims = static_dims(node.inputs[1].shape if node.inputs[1] is not None else None)
    if not dims or len(dims) < 3 or any(d is None for d in dims[1:]):
        return None
    per_group, taps = dims[1], math.prod(dims[2:])
    if per_group < MIN_FP8_CONV_GROUP_CHANNELS:
        return f"FP8 convolution needs >= {MIN_FP8_CONV_GROUP_CHANNELS} input channels per group (has {per_group}: depthwise/grouped)"
    if taps > MAX_FP8_CONV_TAPS:
        return f"FP8 convolution needs filters of <= {MAX_FP8_CONV_TAPS} taps (has {taps})"
    return None


def linear_decision(node: ir.Node, plan: QuantPlan, *, gemv_ok: bool = False) -> NodeDecision:
    """The default decision for a Conv/ConvTranspose/Gemm/MatMul: quantize activations and weight
    at the plan's precision (``gemv_ok``: GEMV-like products too, where the target gains)."""
    weight_dtype = WEIGHT_DTYPE[plan.precision]
    if node.op_type.startswith("Conv"):
        reason = conv_channels_reason(node)
    else:
        reason = None if gemv_ok else gemv_reason(node)
    if reason is None and plan.precision == "fp8":
        reason = fp8_conv_reason(node)
    if reason:
        return NodeDecision(node.op_type, FLOAT, {}, reason)
    inputs: dict[int, str] = {}
    w_index, axis = weight_axis(node)
    if weight_source(node.inputs[0]) is not None:
        return NodeDecision(node.op_type, FLOAT, {}, "constant first operand: not a supported layout")
    if not is_activation(node.inputs[0]):
        return NodeDecision(node.op_type, FLOAT, {}, "first operand is not a float tensor")
    inputs[0] = "activation"
    w = node.inputs[w_index]
    source = weight_source(w)
    if source is not None:
        inputs[w_index] = "weight"
        rank = len(source.initializer.shape) if source.initializer.shape is not None else 0
        # the axis as the node reads the weight: a rewrite that drops a Transpose (SmoothQuant) keeps it valid
        plan.set_weight(node.name, w_index, WeightQuant(dtype=weight_dtype, axis=axis if rank else None))
    elif is_activation(w):
        inputs[w_index] = "activation"  # e.g. attention's Q·Kᵀ: both operands are activations
    else:
        return NodeDecision(node.op_type, FLOAT, {}, "second operand is not a float tensor")
    kind = "weight" if inputs.get(w_index) == "weight" else "activation"
    return NodeDecision(node.op_type, plan.precision, inputs, f"inputs of {node.op_type} ({kind} {'per-channel' if kind == 'weight' and axis is not None else 'per-tensor'})")


def _matching(names: Sequence[str], pattern: str, option: str) -> list[str]:
    """Node names equal to or fully matching ``pattern``; none is an error (almost always a typo)."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise OnnxqError(f"{option} {pattern!r} is not a valid regular expression ({exc})") from None
    hits = [n for n in names if n == pattern or regex.fullmatch(n)]
    if not hits:
        raise OnnxqError(f"{option} {pattern!r} matches no node name; names look like {names[:3]} (use `onnxq quantize --save-plan` to list them)")
    return hits


def _set_float(plan: QuantPlan, name: str, reason: str) -> None:
    decision = plan.nodes.get(name)
    if decision is None or not decision.quantized:
        return  # a node no policy would quantize: nothing to exclude
    decision.precision = FLOAT
    decision.inputs = {}
    decision.reason = reason


def apply_exclusions(model: ir.Model, plan: QuantPlan, patterns: Sequence[str]) -> None:
    """Set every node whose name equals or fully matches a pattern to float."""
    apply_filters(model, plan, exclude=patterns)


def apply_filters(
    model: ir.Model, plan: QuantPlan, *, exclude: Sequence[str] = (), exclude_op: Sequence[str] = (),
    include: Sequence[str] = (), include_op: Sequence[str] = (),
) -> None:
    """The recipe's node filters: ``exclude`` names/regexes and ``exclude_op`` op types go to
    float; with ``include`` / ``include_op``, only matching Conv/ConvTranspose/Gemm/MatMul nodes
    stay quantized. A pattern or op type that matches nothing is an error."""
    names = [n.name for n in model.graph.all_nodes() if n.name]
    ops = {n.op_type for n in model.graph.all_nodes()}
    for op in (*exclude_op, *include_op):
        if op not in ops:
            raise OnnxqError(f"--{'exclude' if op in exclude_op else 'include'}-op {op!r}: the model has no {op} node; its op types are {sorted(ops)[:12]}")
    for pattern in exclude:
        for name in _matching(names, pattern, "--exclude"):
            _set_float(plan, name, f"excluded by --exclude {pattern!r}")
    for name, d in list(plan.nodes.items()):
        if d.op_type in exclude_op:
            _set_float(plan, name, f"excluded by --exclude-op {d.op_type}")
    if include or include_op:
        included = {n for p in include for n in _matching(names, p, "--include")}
        for name, d in list(plan.nodes.items()):
            if d.op_type in LINEAR_OPS and name not in included and d.op_type not in include_op:
                _set_float(plan, name, "not selected by --include/--include-op")
    drop_unused_weights(model, plan)


def drop_unused_weights(model: ir.Model, plan: QuantPlan) -> None:
    """Forget weight entries that no quantized node reads any more."""
    used = {
        plan.weight_key(name, i)
        for name, decision in plan.nodes.items() if decision.quantized
        for i, kind in decision.inputs.items() if kind == "weight"
    }
    # only node-keyed entries: an old plan's entries are keyed by initializer name
    for w in [w for w in plan.weights if w not in used and w.rpartition(":")[0] in plan.nodes]:
        del plan.weights[w]


def consumers_of(value: ir.Value) -> list[ir.Node]:
    return [use.node for use in value.uses()]


def producer_op(value: ir.Value | None) -> str | None:
    if value is None:
        return None
    prod = value.producer()
    return prod.op_type if prod is not None else None


def nodes(model: ir.Model, op_types: Iterable[str]) -> list[ir.Node]:
    """Nodes of ``op_types`` in the main graph and in every If/Loop/Scan body (node names are
    unique across scopes after preprocessing, so the plan keys them by name)."""
    ops = set(op_types)
    return [n for n in model.graph.all_nodes() if n.op_type in ops and n.domain in ("", "ai.onnx")]
