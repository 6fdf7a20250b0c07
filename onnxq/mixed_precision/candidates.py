"""From the float model to a candidate model: the steps the sweep and the solver share.

The base plan carries the decisions every candidate shares: SmoothQuant folded into the float
model (:func:`apply_smoothing`, the ``fold`` stage of :mod:`onnxq.emit`) and the opset raised
once for the candidate precisions (:func:`prepare_opset`, ``plan.min_opset``). A candidate is the
base plan with a precision per node (:func:`assemble_plan`), emitted by the same pipeline as
``onnxq quantize`` (:func:`insert_qdq`, :func:`qdq_proto`): a solver plan replayed with ``onnxq
quantize --plan`` rebuilds the very model the solver measured.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import onnx
import onnx_ir as ir

from onnxq import emit, modelio
from onnxq.passes.opset import require_opset
from onnxq.passes.qdq import FP8_MIN_OPSET
from onnxq.pipeline import decide_gptq, fold_smoothquant
from onnxq.plan import FLOAT, WEIGHT_DTYPE, ActivationQuant, NodeDecision, QuantPlan, WeightQuant, inputs_at
from onnxq.progress import log

from .ranges import Ranges


def apply_smoothing(model: ir.Model, base: QuantPlan, data, smoothquant, split_outliers: int, timings: dict):
    """SmoothQuant decided for ``base`` (every quantizable layer), recorded in it and folded into
    the float ``model``; the decisions, or None."""
    if smoothquant is None:
        return None
    t = time.perf_counter()
    smooth_plan = fold_smoothquant(model, base, data, smoothquant, split_outliers=split_outliers)
    timings["smoothquant"] = time.perf_counter() - t
    summary = smooth_plan.summary()
    log(f"onnxq: SmoothQuant ({smoothquant}) folded in: {summary['smoothed']} of {summary['groups']} groups, {summary['split_channels']} channels split off")
    return smooth_plan


def prepare_opset(model: ir.Model, base: QuantPlan, precisions: Iterable[str]) -> None:
    """Raise the opset once to what the precisions need (FP8: 19), so that each quantized copy
    made from the model does not convert it again; recorded as ``base.min_opset`` so that a plan
    replayed from the float model gets the same opset."""
    if "fp8" in precisions:
        base.min_opset = FP8_MIN_OPSET
        require_opset(model, FP8_MIN_OPSET)


def insert_qdq(model: ir.Model, plan: QuantPlan) -> None:
    """``plan``'s Q/DQ inserted into the float ``model`` (already folded and at its opset) in
    place: the ``quantize`` and ``finish`` stages of the emit pipeline."""
    emit.emit(model, plan, ["quantize", "finish"])


def qdq_proto(float_proto: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """The float model with ``plan`` applied, as a proto (``float_proto`` is not modified)."""
    model = ir.serde.deserialize_model(float_proto)
    insert_qdq(model, plan)
    return modelio.to_proto(model)


def _conv_output_owner(model: ir.Model, tensor: str) -> str | None:
    """The Conv whose (Relu/Clip'd) output ``tensor`` is: plan.outputs entries belong to it."""
    for node in model.graph:
        if any(o.name == tensor for o in node.outputs):
            if node.op_type in ("Relu", "Clip") and node.inputs[0] is not None and node.inputs[0].producer() is not None:
                return node.inputs[0].producer().name
            return node.name
    return None


def assemble_plan(model: ir.Model, base: QuantPlan, assignment: Mapping[str, str], ranges: Ranges, reasons: Mapping[str, str] | None = None, offsets: Mapping[str, Mapping[str, str]] | None = None) -> QuantPlan:
    """The plan with each node of ``assignment`` at its precision and every other node in float.

    Float nodes keep their ``inputs``, so setting one back to a quantized precision in the JSON
    and replaying it (which calibrates again) is all a user needs to do; a node at FP8 keeps its
    bias float (:func:`onnxq.plan.inputs_at`). ``offsets``: {precision: {weight key: GPTQ's
    offsets}} (:func:`gptq_offsets`), given to each weight its reader's precision decided.
    """
    counts: dict[str, int] = {}
    for p in assignment.values():
        if p != FLOAT:
            counts[p] = counts.get(p, 0) + 1
    default = max(counts, key=counts.__getitem__) if counts else base.precision
    plan = QuantPlan(target=base.target, precision=default, smoothquant=base.smoothquant, min_opset=base.min_opset, recipe=base.recipe, equalization=base.equalization, rotation=base.rotation, attention=base.attention)
    by_name = {n.name: n for n in model.graph}
    for name, d in base.nodes.items():
        p = assignment.get(name, FLOAT) if d.quantized else d.precision
        plan.nodes[name] = NodeDecision(d.op_type, p, inputs_at(d.inputs, p), (reasons or {}).get(name, d.reason))
        if not d.quantized:
            continue
        node = by_name[name]
        for index, kind in d.inputs.items():
            value = node.inputs[index]
            if kind == "activation" and p != FLOAT:
                plan.set_activation(value.name, p, ActivationQuant(**vars(ranges.params[p][value.name])))
            elif kind == "weight":
                entry = base.weight(name, index)
                # the reader's precision picks the dtype
                rounding = (offsets or {}).get(p, {}).get(QuantPlan.weight_key(name, index))
                plan.set_weight(name, index, WeightQuant(WEIGHT_DTYPE[default], entry.axis if entry else None, offsets=rounding))
    for tensor in base.outputs:
        owner = _conv_output_owner(model, tensor)
        if owner and assignment.get(owner, FLOAT) != FLOAT:
            plan.outputs.append(tensor)
            plan.set_activation(tensor, default, ActivationQuant(**vars(ranges.params[default][tensor])))
    return plan


def gptq_offsets(model: ir.Model, base: QuantPlan, data, ranges: Ranges, precisions: Iterable[str], act_order: bool) -> dict[str, dict[str, str]]:
    """GPTQ's rounding of every W8A8 weight per precision (every node at it), on the folded float
    ``model``: {precision: {weight key: offsets}} for :func:`assemble_plan`. A candidate's node
    reads the offsets of its own precision; the Hessians are of the float inputs, the same for
    every candidate, so they are collected once and one rounding per precision serves them all."""
    plans = {p: assemble_plan(model, base, {name: p for name, d in base.nodes.items() if d.quantized}, ranges) for p in precisions}
    decide_gptq(model, list(plans.values()), data, act_order)
    return {p: {key: w.offsets for key, w in plan.weights.items() if w.offsets} for p, plan in plans.items()}
