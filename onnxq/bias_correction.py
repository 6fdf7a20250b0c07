"""Empirical bias correction (Nagel et al., 2019, section 4.2, measured instead of derived from BN).

Per quantized Conv/Gemm and output channel ``c``: ``E[y_q,c − y_c]``, the mean error of the
node's quantized output ``y_q`` (its inputs through the plan's Q/DQ, its weight quantized as the
plan says) against its float output ``y``, both computed from the same float input, over the
calibration data. The correction ``−E[y_q − y]`` is added to the bias
(:class:`onnxq.passes.bias_correction.BiasCorrectionPass`), so the quantized node is unbiased on
that data.

How: one ORT session of the float model with a quantized *twin* of each corrected node (as the
local sweep builds them) and, per node, ``ReduceMean(twin − original)`` over every axis but the
channel axis as a graph output; one pass over the data sums those vectors in float64 (no sample
is kept). The twin reads the float model's input, so each correction removes the node's own
error and not, a second time, an error already corrected upstream.

It runs after every range is decided (the twins need the activation scales) and before Q/DQ
insertion, on the model as it will be quantized (after equalization and SmoothQuant).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from onnxq import emit, modelio
from onnxq.errors import OnnxqError
from onnxq.passes.opset import RequireOpsetPass
from onnxq.plan import WEIGHT_DTYPE, NodeDecision, QuantPlan, WeightQuant
from onnxq.progress import progress_bar
from onnxq.runtime import ort as ort_rt

CORRECTED_OPS = ("Conv", "Gemm")


def _corrected_nodes(model: ir.Model, plan: QuantPlan) -> list[ir.Node]:
    quantized = plan.quantized_nodes()
    return [n for n in model.graph if n.name in quantized and n.op_type in CORRECTED_OPS and 1 in quantized[n.name].inputs]


def _activation_source(node: ir.Node, decision: NodeDecision) -> dict[int, str]:
    """{input index: tensor whose parameters it uses}: a Q/DQ placed before a companion Pad
    (TensorRT) quantizes the Conv's input with the Pad input's parameters."""
    sources = {i: node.inputs[i].name for i, kind in decision.inputs.items() if kind == "activation"}
    pad = node.inputs[0].producer() if 0 not in decision.inputs else None
    if pad is not None and pad.op_type == "Pad":
        sources[0] = pad.inputs[0].name
    return sources


def _mean_over_all_but_channel(value: ir.Value, rank: int, name: str, opset: int) -> tuple[ir.Node, ir.Value | None]:
    """ReduceMean over every axis but 1 (and the axes initializer it needs from opset 18 on)."""
    axes = [a for a in range(rank) if a != 1]
    if opset >= 18:
        axes_value = ir.Value(name=f"{name}_axes", const_value=ir.tensor(np.asarray(axes, np.int64), name=f"{name}_axes"))
        node = ir.node("ReduceMean", [value, axes_value], attributes={"keepdims": 0}, name=name)
        return node, axes_value
    return ir.node("ReduceMean", [value], attributes={"keepdims": 0, "axes": axes}, name=name), None


def _add_twins(model: ir.Model, plan: QuantPlan, nodes: list[ir.Node]) -> tuple[QuantPlan, list[ir.Value]]:
    """Quantized twins and their per-channel mean errors as graph outputs (in ``model``)."""
    graph = model.graph
    opset = model.opset_imports.get("", 13)
    twin_plan = QuantPlan(target=plan.target, precision=plan.precision)
    outputs = []
    for node in nodes:
        decision = plan.nodes[node.name]
        twin = ir.Node(node.domain, node.op_type, list(node.inputs), attributes=list(node.attributes.values()), name=f"{node.name}/bias_twin")
        ref = node.outputs[0]
        twin.outputs[0].name, twin.outputs[0].dtype, twin.outputs[0].shape = f"{ref.name}/bias_twin", ref.dtype, ref.shape
        inputs = dict(decision.inputs)
        for index, tensor in _activation_source(node, decision).items():
            inputs[index] = "activation"
            twin_plan.set_activation(node.inputs[index].name, decision.precision, plan.activation(tensor, decision.precision))
        for index, kind in decision.inputs.items():
            if kind != "activation":
                entry = plan.weight(node.name, index, node.inputs[index].name)
                twin_plan.set_weight(twin.name, index, WeightQuant(WEIGHT_DTYPE[decision.precision], entry.axis if entry else None))
        twin_plan.nodes[twin.name] = NodeDecision(node.op_type, decision.precision, inputs, f"bias-correction twin of {node.name}")
        diff = ir.node("Sub", [twin.outputs[0], ref], name=f"{node.name}/bias_error")
        rank = len(node.inputs[1].const_value.shape) if node.op_type == "Conv" else 2
        mean, axes = _mean_over_all_but_channel(diff.outputs[0], rank, f"{node.name}/bias_mean_error", opset)
        if axes is not None:
            graph.register_initializer(axes)
        mean.outputs[0].name, mean.outputs[0].dtype = f"{node.name}/bias_mean_error", ref.dtype
        graph.insert_after(node, [twin, diff, mean])
        outputs.append(mean.outputs[0])
    return twin_plan, outputs


def measure_corrections(model: ir.Model, plan: QuantPlan, data: Iterable[Mapping[str, np.ndarray]]) -> dict[str, list[float]]:
    """{node: −mean error per output channel} of every quantized Conv/Gemm (``model`` is not modified)."""
    copy = ir.serde.deserialize_model(modelio.to_proto(model))
    if plan.min_opset:  # the reductions are written for the opset the twins run at
        RequireOpsetPass(plan.min_opset)(copy)
    nodes = _corrected_nodes(copy, plan)
    if not nodes:
        return {}
    twin_plan, outputs = _add_twins(copy, plan, nodes)
    copy.graph.outputs.extend(outputs)
    emit.emit(copy, twin_plan, ["quantize", "finish"])
    session = ort_rt.create_session(modelio.to_proto(copy))
    names = [v.name for v in outputs]
    sums = [None] * len(names)
    samples = 0
    with progress_bar(len(data) if hasattr(data, "__len__") else None, "bias correction") as bar:
        for feed in data:
            for k, value in enumerate(ort_rt.run(session, feed, names)):
                v = np.asarray(value, dtype=np.float64)
                sums[k] = v if sums[k] is None else sums[k] + v
            samples += 1
            bar.update(1)
    if samples == 0:
        raise OnnxqError("--bias-correction needs calibration data with at least one sample")
    return {node.name: [float(v) for v in (-s / samples).astype(np.float32)] for node, s in zip(nodes, sums)}
