"""The precision of attention's P·V products (``--attention-probs``).

P, the Softmax output that P·V reads, lies in [0, 1] and is mostly tiny: a symmetric INT8 grid
(TensorRT's only INT8 grid) leaves half its levels unused and rounds every probability under
1/254 of the largest to zero. FP8 E4M3's relative grid keeps them (a step of 1/8 of a power
of two); float keeps them exactly. "unnormalized" keeps P·V at INT8 but feeds it
``E = exp(s - rowmax(s))`` instead of P (every row of E peaks at 1, so the grid is used whole)
and divides P·V's output by E's row sums afterwards: the same function in float. The decision is
the P·V nodes' precision (and, for "unnormalized", the rewritten Softmax/P·V pairs in
``plan.attention``) in the plan, so a replayed plan carries it.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxq.placement.rules import nodes
from onnxq.plan import FLOAT, AttentionPlan, QuantPlan
from onnxq.progress import log

# ops that only move or retype the probabilities on their way from the Softmax to P·V
_DATA_MOVES = ("Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Expand", "Identity")


def reads_softmax(value: ir.Value | None) -> bool:
    """Whether ``value`` is a Softmax output, directly or through data moves alone."""
    node = value.producer() if value is not None else None
    while node is not None and node.op_type in _DATA_MOVES:
        node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    return node is not None and node.op_type == "Softmax"

def probability_products(model: ir.Model) -> list[str]:
    """The MatMuls whose first input is attention's probabilities (P·V)."""
    return [node.name for node in nodes(model, ["MatMul"]) if reads_softmax(node.inputs[0])]

def _softmax_on_last_axis(softmax: ir.Node, opset: int) -> bool:
    """Whether ``softmax`` normalizes over its input's last axis (the axis P·V contracts)."""
    rank = len(softmax.inputs[0].shape) if softmax.inputs[0] is not None and softmax.inputs[0].shape is not None else None
    axis = softmax.attributes.get_int("axis", -1 if opset >= 13 else 1)
    return axis == -1 or (rank is not None and axis == rank - 1)


def unnormalized_pairs(model: ir.Model) -> list[list[str]]:
    """The [Softmax, P·V] pairs that can be rewritten exactly: the Softmax's output is read by
    the P·V MatMul's first input alone (no data move between them, no other reader, not a graph
    output) and it normalizes over the last axis. The others are logged with the reason."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))
    pairs = []
    for pv in nodes(model, ["MatMul"]):
        if not reads_softmax(pv.inputs[0]):
            continue
        softmax = pv.inputs[0].producer()
        if softmax.op_type != "Softmax":
            log(f"onnxq: attention probabilities: {pv.name} reads its Softmax through {softmax.op_type}; kept normalized (the division after P·V needs P·V to read the Softmax directly)")
        elif len(softmax.outputs[0].uses()) != 1 or softmax.outputs[0].is_graph_output():
            log(f"onnxq: attention probabilities: {softmax.name}'s output has readers other than {pv.name}; kept normalized (they need P)")
        elif not _softmax_on_last_axis(softmax, opset):
            log(f"onnxq: attention probabilities: {softmax.name} does not normalize over the last axis; kept normalized (P·V contracts the last axis)")
        else:
            pairs.append([softmax.name, pv.name])
    return pairs


def set_attention_probs(model: ir.Model, plan: QuantPlan, precision: str) -> list[str]:
    """Set every quantized P·V node of ``plan`` to ``precision`` ("fp8": both operands FP8;
    "float": the product in float; "unnormalized": INT8 on exp(s - rowmax), the pairs recorded
    in ``plan.attention``); returns their names. "int8" leaves the plan as it is."""
    changed = []
    if precision == "int8":
        return changed
    if precision == "unnormalized":
        pairs = [pair for pair in unnormalized_pairs(model) if pair[1] in plan.quantized_nodes()]
        plan.attention = AttentionPlan(unnormalized=pairs)
        for _, pv in pairs:
            plan.nodes[pv].reason = "attention probabilities P·V: int8 on exp(s - rowmax), divided by the row sums after (--attention-probs unnormalized)"
        return [pv for _, pv in pairs]
    for name in probability_products(model):
        decision = plan.nodes.get(name)
        if decision is None or not decision.quantized:
            continue
        decision.precision = precision
        if precision == FLOAT:
            decision.inputs = {}
        decision.reason = f"attention probabilities P·V: {precision} (--attention-probs)"
        changed.append(name)
    return changed

__all__ = ["probability_products", "reads_softmax", "set_attention_probs", "unnormalized_pairs"]
