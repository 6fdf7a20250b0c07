"""TensorRT explicit-quantization policy (strongly typed networks).

Rules, from TensorRT's Q/DQ placement guidance:
- symmetric INT8 (or FP8 E4M3FN with ``precision="fp8"``: same placement), zero points 0; weights per channel on the output-channel axis, activations per
  tensor;
- quantize the inputs of Conv / ConvTranspose / Gemm / MatMul, never their outputs, and place no
  Q/DQ that would simulate BN or ReLU folding (TensorRT fuses those itself);
- a Conv fed through a zero Pad gets its activation Q/DQ before the Pad, since Q/DQ between Pad and
  Conv breaks the fusion;
- residual Add: Q/DQ on the skip branch, none on the branch that comes from a quantized Conv, so
  the Add fuses into that Conv's epilogue;
- GEMV-like MatMul/Gemm (M or N = 1, K or N < 16) and convs whose GEMM is tiny (reduction K =
  input channels per group × kernel taps < 16, or < 16 output channels; depthwise convs by their
  channel count) stay in float: INT8 gains nothing there.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from onnxq.ops import LINEAR_OPS
from onnxq.placement import rules
from onnxq.plan import NodeDecision, QuantPlan


def _zero_pad_source(value: ir.Value | None) -> ir.Node | None:
    """The Pad node producing ``value`` if it pads with zeros in constant mode."""
    prod = value.producer() if value is not None else None
    if prod is None or prod.op_type != "Pad":
        return None
    if prod.attributes.get_string("mode", "constant") != "constant":
        return None
    if len(prod.inputs) > 2 and prod.inputs[2] is not None:
        const = prod.inputs[2].const_value
        if const is None or float(const.numpy().reshape(-1)[0]) != 0.0:
            return None
    return prod


def place(model: ir.Model, *, exclude: Sequence[str] = (), precision: str = "int8") -> QuantPlan:
    plan = QuantPlan(target="tensorrt", precision=precision)
    for node in rules.nodes(model, LINEAR_OPS):
        decision = rules.linear_decision(node, plan)
        plan.nodes[node.name] = decision
        if decision.quantized and node.op_type.startswith("Conv"):
            pad = _zero_pad_source(node.inputs[0])
            if pad is not None and rules.is_activation(pad.inputs[0]):
                del decision.inputs[0]
                decision.reason += "; activation Q/DQ placed before its Pad"
                plan.nodes[pad.name] = NodeDecision(
                    "Pad", precision, {0: "activation"}, f"Q/DQ before the Pad that feeds {node.name}"
                )

    quantized_convs = {
        name for name, d in plan.nodes.items() if d.quantized and d.op_type in ("Conv", "ConvTranspose")
    }
    for node in rules.nodes(model, ["Add"]):
        a, b = node.inputs[0], node.inputs[1]
        if not (rules.is_activation(a) and rules.is_activation(b)):
            continue
        from_conv = [
            v is not None and v.producer() is not None and v.producer().name in quantized_convs
            for v in (a, b)
        ]
        if not any(from_conv):
            continue
        skip = 1 if from_conv[0] else 0  # the other branch; the conv branch fuses as epilogue
        plan.nodes[node.name] = NodeDecision(
            "Add",
            precision,
            {skip: "activation"},
            "residual Add: Q/DQ on the skip branch only, so TensorRT fuses the Add into the Conv",
        )
    rules.apply_exclusions(model, plan, exclude)
    return plan


__all__ = ["place"]
