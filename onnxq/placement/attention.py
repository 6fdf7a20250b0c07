"""The precision of attention's P·V products (``--attention-probs``).

P, the Softmax output that P·V reads, lies in [0, 1] and is mostly tiny: a symmetric INT8 grid
(TensorRT's only INT8 grid) leaves half its levels unused and rounds every probability under
1/254 of the largest to zero. FP8 E4M3's relative grid keeps them (a step of 1/8 of a power
of two); float keeps them exactly. The decision is the P·V nodes' precision in the plan, so a
replayed plan carries it.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxq.placement.rules import nodes
from onnxq.plan import FLOAT, QuantPlan

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

def set_attention_probs(model: ir.Model, plan: QuantPlan, precision: str) -> list[str]:
    """Set every quantized P·V node of ``plan`` to ``precision`` ("fp8": both operands FP8;
    "float": the product in float); returns their names. "int8" leaves the plan as it is."""
    changed = []
    if precision == "int8":
        return changed
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

__all__ = ["probability_products", "reads_softmax", "set_attention_probs"]
