"""Dynamic quantization placement (``--dynamic``, ort target): which MatMul/Gemm read their
activation through ``DynamicQuantizeLinear`` (scale and zero point computed at run time, as ONNX
Runtime's ``quantize_dynamic`` does), so no calibration data is needed.

Rules:
- a MatMul, or a Gemm with ``alpha = beta = 1`` and ``transA = 0``, whose weight is a 2-D float
  initializer (directly or through a Transpose) and whose other operand is a float activation:
  input 0 ``dynamic`` (UINT8, per tensor, at run time), input 1 ``weight`` (INT8 symmetric, per
  output column: MatMulInteger takes a zero point per column, and ORT's fused
  ``DynamicQuantizeMatMul`` a scale per column);
- everything else stays float (Convs: ORT's ConvInteger has no fused float-output kernel).
"""

from __future__ import annotations

import onnx_ir as ir

from onnxq.ops import MATMUL_OPS, weight_output_axis
from onnxq.placement import rules
from onnxq.plan import FLOAT, NodeDecision, QuantPlan, WeightQuant
from onnxq.weights import weight_source


def dynamic_decision(node: ir.Node, plan: QuantPlan) -> NodeDecision:
    source = weight_source(node.inputs[1]) if len(node.inputs) > 1 else None
    if source is None or source.initializer.shape is None or len(source.initializer.shape) != 2:
        return NodeDecision(node.op_type, FLOAT, {}, "second operand is not a 2-D constant weight: dynamic quantization leaves it float")
    if not rules.is_activation(node.inputs[0]) or weight_source(node.inputs[0]) is not None:
        return NodeDecision(node.op_type, FLOAT, {}, "first operand is not a float activation")
    if node.op_type == "Gemm" and (node.attributes.get_float("alpha", 1.0) != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0 or node.attributes.get_int("transA", 0)):
        return NodeDecision(node.op_type, FLOAT, {}, "Gemm with alpha/beta other than 1 or transA: MatMulInteger has no such form")
    plan.set_weight(node.name, 1, WeightQuant(dtype="int8", axis=weight_output_axis(node)))
    return NodeDecision(node.op_type, "int8", {0: "dynamic", 1: "weight"}, "dynamic: UINT8 activation quantized at run time (DynamicQuantizeLinear), INT8 weight per output column")


def place(model: ir.Model) -> QuantPlan:
    """The dynamic-quantization plan of ``model`` (ort target, INT8)."""
    plan = QuantPlan(target="ort", precision="int8")
    for node in rules.nodes(model, MATMUL_OPS):
        plan.nodes[node.name] = dynamic_decision(node, plan)
    return plan
