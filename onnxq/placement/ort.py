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
- convs whose GEMM is tiny (reduction K = input channels per group × taps, or output channels,
  below 16) and GEMV-like products are kept in float as for TensorRT.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from onnxq.placement import rules
from onnxq.plan import QuantPlan


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
    return plan
