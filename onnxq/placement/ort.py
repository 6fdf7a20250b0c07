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
- a Gemm ORT can run as QGemm (alpha = beta = 1, transA = 0, constant weight, a constant 1-D bias
  or none) is quantized at INT8 even when GEMV-like (a classifier head at batch 1): its bias is
  marked ``bias`` (int32 at activation scale × weight scale, what QGemm reads; with a float bias
  ORT runs a DQ of the whole weight and a float Gemm, measured slower than float). QGemm reads
  INT8 weights instead of FP32 ones (EfficientNet-Lite0's 1280×1000 head: docs/benchmarks.md);
- other convs whose GEMM is tiny (reduction K = input channels per group × taps, or output
  channels, below 16) and GEMV-like products are kept in float as for TensorRT.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from onnxq.placement import rules
from onnxq.plan import NodeDecision, QuantPlan
from onnxq.weights import weight_source


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
        plan.nodes[node.name] = _qgemm_decision(node, plan) if _qgemm_form(node, plan) else rules.linear_decision(node, plan)
        by_name[node.name] = node
    rules.apply_exclusions(model, plan, exclude)
    for name, decision in plan.nodes.items():
        if decision.quantized and decision.op_type == "Conv":
            out = _conv_output_tensor(by_name[name])
            if rules.is_activation(out):
                plan.outputs.append(out.name)
    _quantize_residual_adds(model, plan)
    return plan


def _qgemm_form(node: ir.Node, plan: QuantPlan) -> bool:
    """A Gemm ORT's QDQ fusion turns into QGemm once its inputs (and bias, as int32) are DQs."""
    if node.op_type != "Gemm" or plan.precision != "int8":
        return False
    attrs = node.attributes
    if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0 or attrs.get_int("transA", 0):
        return False
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None:
        return True
    source = weight_source(bias)
    return source is not None and source.transpose is None and len(source.initializer.shape or ()) == 1


def _qgemm_decision(node: ir.Node, plan: QuantPlan) -> NodeDecision:
    decision = rules.linear_decision(node, plan, gemv_ok=True)
    if decision.quantized and decision.inputs.get(1) == "weight" and len(node.inputs) > 2 and node.inputs[2] is not None:
        decision.inputs[2] = "bias"
        decision.reason += "; bias int32 so ORT runs it as QGemm"
    return decision


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
