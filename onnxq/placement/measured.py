"""Placement decided by measured error: depthwise convs whose own INT8 error is too large stay float.

On depthwise-separable CNNs a depthwise conv's per-tensor INT8 input and its 9-tap filters make
it the layer whose error INT8 placement rules cannot predict; its own error is measured instead
(:func:`onnxq.bias_correction.measure_local_snr`: the SNR of its quantized output against its
float output, both from the same float input, on the calibration data). Those below the
threshold are set to float in the plan, with the measured SNR as the reason; the measured values
are kept in ``QuantPlan.local_snr`` so a replayed plan measures nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir

from onnxq.placement import rules
from onnxq.plan import FLOAT, QuantPlan


def _depthwise(node: ir.Node) -> bool:
    weight = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
    group = node.attributes.get_int("group", 1)
    return node.op_type == "Conv" and weight is not None and group > 1 and weight.shape[1] == 1


def quantized_depthwise(model: ir.Model, plan: QuantPlan) -> list[str]:
    """Names of the depthwise Convs the plan quantizes."""
    quantized = plan.quantized_nodes()
    return [n.name for n in model.graph.all_nodes() if n.name in quantized and _depthwise(n)]


def keep_float_below(model: ir.Model, plan: QuantPlan, snr: Mapping[str, float], min_snr: float) -> list[str]:
    """Set every node whose measured ``snr`` is below ``min_snr`` dB to float (and the Pad whose
    Q/DQ was placed for it, TensorRT); returns their names."""
    by_name = {n.name: n for n in model.graph.all_nodes()}
    floated = []
    for name, db in snr.items():
        decision = plan.nodes.get(name)
        if db >= min_snr or decision is None or not decision.quantized:
            continue
        decision.precision, decision.inputs = FLOAT, {}
        decision.reason = f"measured: own INT8 output SNR {db:.1f} dB < --depthwise-min-snr {min_snr:g}"
        pad = by_name[name].inputs[0].producer()
        if pad is not None and pad.op_type == "Pad" and pad.name in plan.nodes:
            plan.nodes[pad.name].precision, plan.nodes[pad.name].inputs = FLOAT, {}
            plan.nodes[pad.name].reason = f"its conv {name} stays float (measured)"
        floated.append(name)
    rules.drop_unused_weights(model, plan)
    return floated
