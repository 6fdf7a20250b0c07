"""ONNX Runtime CPU policy: U8 activations, S8 weights, patterns ORT runs as integer kernels.

Rules:
- activations are asymmetric uint8 per tensor, weights symmetric int8 per channel (ORT's
  preferred form on x86 with VNNI); with ``precision="fp8"`` both are symmetric FP8 E4M3FN
  (ORT runs FP8 Q/DQ as float ops: accuracy studies only, no speed-up on CPU);
- the inputs of Conv / ConvTranspose / Gemm / MatMul are quantized; DQ→MatMul fuses to
  MatMulIntegerToFloat with no output Q; a ConvTranspose runs DQ + float ConvTranspose on the CPU
  provider, which still stores its weight in INT8 (a decoder's upsampling weights are most of it);
- a Conv's output is quantized too, after its single trailing Relu/Clip when there is one (ORT
  removes a Relu/Clip whose range the Q covers), so DQ→Conv→Q fuses into QLinearConv;
- an Add whose two inputs are quantized tensors anyway (conv outputs, quantized inputs of other
  nodes: a residual Add) gets its output quantized too and both inputs marked, so DQ→Add→Q fuses
  into QLinearAdd instead of running as DQ, float Add, Q around it;
- convs whose GEMM is tiny (reduction K = input channels per group × taps, or output channels,
  below 16) and GEMV-like products are kept in float as for TensorRT (a classifier head at
  batch 1 quantized with its float bias runs as DQ of the whole weight then float Gemm: measured
  slower; ORT's QGemm needs the bias as an int32 DQ input).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from onnxq.placement import rules
from onnxq.plan import NodeDecision, QuantPlan


def _conv_output_tensor(node: ir.Node) -> ir.Value:
    out = node.outputs[0]
    users = rules.consumers_of(out)
    if len(users) == 1 and users[0].op_type in ("Relu", "Clip") and not out.is_graph_output():
        return users[0].outputs[0]
    return out


def place(model: ir.Model, *, exclude: Sequence[str] = (), precision: str = "int8") -> QuantPlan:
    plan = QuantPlan(target="ort", precision=precision)
    by_name = {}
    for node in rules.nodes(model, ("Conv", "ConvTranspose", "Gemm", "MatMul")):
        plan.nodes[node.name] = rules.linear_decision(node, plan)
        by_name[node.name] = node
    rules.apply_exclusions(model, plan, exclude)
    for name, decision in plan.nodes.items():
        if decision.quantized and decision.op_type == "Conv":
            out = _conv_output_tensor(by_name[name])
            if rules.is_activation(out):
                plan.outputs.append(out.name)
    _quantize_residual_adds(model, plan)
    return plan


def _quantize_residual_adds(model: ir.Model, plan: QuantPlan) -> None:
    """Adds whose inputs are both quantized tensors: output quantized as well (QLinearAdd)."""
    quantized = set(plan.outputs) | {
        node.inputs[i].name
        for node in model.graph.all_nodes() if node.name in plan.nodes and plan.nodes[node.name].quantized
        for i, kind in plan.nodes[node.name].inputs.items() if kind == "activation"
    }
    for node in rules.nodes(model, ["Add"]):  # graph order: a chain of residual Adds is seen in order
        a, b = node.inputs[0], node.inputs[1]
        if not (rules.is_activation(a) and rules.is_activation(b) and a.name in quantized and b.name in quantized):
            continue
        if a.shape != b.shape or not rules.is_activation(node.outputs[0]):
            continue  # a broadcast Add (bias-like) is not a QLinearAdd of two feature maps
        plan.nodes[node.name] = NodeDecision("Add", plan.precision, {0: "activation", 1: "activation"}, "residual Add: inputs and output quantized so ORT fuses it into QLinearAdd")
        plan.outputs.append(node.outputs[0].name)
        quantized.add(node.outputs[0].name)
