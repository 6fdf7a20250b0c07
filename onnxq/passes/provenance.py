"""Record in the model who made it, from which request, and what the plan did to tensors that
keep their names.

Rule: ``producer_name`` is ``onnxq`` and ``producer_version`` its version; the plan's recipe (the
request, as in the plan's JSON) is the ``onnxq.recipe`` metadata entry. Every activation whose channels the plan rescales in place — a SmoothQuant group folded
into its producer (no inserted ``Mul``), the outputs of a cross-layer equalization pair's first
node and of the nodes it passes through — gets an entry in the ``onnxq.rescaled`` metadata:
``{tensor: {"axis": negative channel axis, "multiplier_f32": base64 of the float32 per-channel
multiplier}}``, the quantized graph's tensor being the float one times the multiplier. ``onnxq
check --layers`` (:mod:`onnxq.localize`) undoes it before comparing with the float model. The
pass decides nothing; the entries follow from the plan alone, so a replayed plan writes the same
bytes.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import onnx_ir as ir

from onnxq import __version__
from onnxq.plan import QuantPlan

RECIPE_KEY = "onnxq.recipe"
RESCALED_KEY = "onnxq.rescaled"
ROTATED_KEY = "onnxq.rotated"


class RecordProvenancePass(ir.passes.InPlacePass):
    def __init__(self, plan: QuantPlan):
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model.producer_name, model.producer_version = "onnxq", __version__
        if self.plan.recipe is not None:
            model.metadata_props[RECIPE_KEY] = json.dumps(self.plan.recipe, sort_keys=True)
        rescaled = _rescaled_tensors(model, self.plan)
        if rescaled:
            model.metadata_props[RESCALED_KEY] = json.dumps(
                {t: {"axis": axis, "multiplier_f32": base64.b64encode(m.astype("<f4").tobytes()).decode()} for t, (axis, m) in rescaled.items()},
                sort_keys=True)
        rotated = _rotated_tensors(model, self.plan)
        if rotated:
            model.metadata_props[ROTATED_KEY] = json.dumps(rotated)
        return ir.passes.PassResult(model, True)


def _rescaled_tensors(model: ir.Model, plan: QuantPlan) -> dict[str, tuple[int, np.ndarray]]:
    """{tensor: (negative channel axis, multiplier)} of the activations rescaled in place."""
    out: dict[str, tuple[int, np.ndarray]] = {}

    def add(tensor: str, axis: int, multiplier: np.ndarray) -> None:
        if tensor in out:
            multiplier = out[tensor][1] * multiplier  # equalization iterations compound
        out[tensor] = (axis, multiplier.astype(np.float32))

    if plan.smoothquant is not None:
        for group in plan.smoothquant.active():
            if group.alpha is not None and not group.inserts_mul:
                add(group.activation, group.channel_axis - group.rank, group.inverse_scale())
    if plan.equalization is not None:
        by_name = {node.name: node for node in model.graph}
        for pair in plan.equalization.pairs:
            first = by_name.get(pair.first)
            if first is None:
                continue
            rank = _rank(first)
            inverse = 1.0 / np.asarray(pair.scale, dtype=np.float64)
            for name in (pair.first, *pair.through):
                if name in by_name:
                    add(by_name[name].outputs[0].name, 1 - rank, inverse)
    return out


def _rotated_tensors(model: ir.Model, plan: QuantPlan) -> list[str]:
    """The tensors in the rotated basis, sorted: the residual stream (rotated embeddings' and
    writers' outputs and the Adds they reach through Adds) and what the norms' readers read
    (looked through a Q/DQ pair to the quantized tensor)."""
    if plan.rotation is None:
        return []
    rotation = plan.rotation
    by_name = {node.name: node for node in model.graph}
    stream = [by_name[n].outputs[0] for n in (*rotation.embeddings, *rotation.writers, *rotation.biases) if n in by_name]
    out = set()
    while stream:
        value = stream.pop()
        if value.name in out:
            continue
        out.add(value.name)
        stream.extend(u.outputs[0] for u, _ in value.uses() if u.op_type == "Add")
    for norm in rotation.norms:
        for reader in (by_name[r] for r in norm.readers if r in by_name):
            out.add(_unquantized(reader.inputs[0]).name)
    if rotation.head is not None:
        out |= _head_rotated(by_name, rotation.head)
    return sorted(out)


def _head_rotated(by_name: dict[str, ir.Node], head) -> set[str]:
    """The tensors from each rotated value projection (or its bias) up to the output projection
    that reads them rotated head by head."""
    ends = {by_name[n] for n in head.outputs if n in by_name}
    starts = [by_name[n] for n in (*head.values, *head.value_biases) if n in by_name]
    out, todo = set(), [node.outputs[0] for node in starts]
    while todo:
        value = todo.pop()
        if value.name in out:
            continue
        out.add(value.name)
        todo.extend(o for use in value.uses() if use.node not in ends for o in use.node.outputs)
    return out


def _unquantized(value: ir.Value) -> ir.Value:
    """The tensor a Q→DQ pair quantizes, or ``value`` itself."""
    dq = value.producer()
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = dq.inputs[0].producer()
        if q is not None and q.op_type == "QuantizeLinear":
            return q.inputs[0]
    return value


def _rank(node: ir.Node) -> int:
    """The rank of a Conv's or Gemm's output: from its shape, else its (possibly quantized) weight's."""
    if node.outputs[0].shape is not None:
        return len(node.outputs[0].shape)
    if node.op_type != "Conv":
        return 2
    weight = node.inputs[1]
    producer = weight.producer()
    if weight.const_value is None and producer is not None and producer.op_type == "DequantizeLinear":
        weight = producer.inputs[0]
    return len(weight.const_value.shape) if weight.const_value is not None else 4
