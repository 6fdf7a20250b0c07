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
from onnxq.ops import reduce_node
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


def _add_twins(model: ir.Model, plan: QuantPlan, nodes: list[ir.Node]) -> tuple[QuantPlan, list[tuple[ir.Node, ir.Value]]]:
    """Quantized twins and ``twin − original`` per node (inserted in ``model``); the plan that
    quantizes the twins, and (node, error tensor) pairs."""
    graph = model.graph
    twin_plan = QuantPlan(target=plan.target, precision=plan.precision)
    errors = []
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
            if kind == "weight":
                entry = plan.weight(node.name, index, node.inputs[index].name)
                # GPTQ's offsets too: the correction is of the error the emitted weight makes
                twin_plan.set_weight(twin.name, index, WeightQuant(WEIGHT_DTYPE[decision.precision], entry.axis if entry else None, offsets=entry.offsets if entry else None))
        twin_plan.nodes[twin.name] = NodeDecision(node.op_type, decision.precision, inputs, f"bias-correction twin of {node.name}")
        diff = ir.node("Sub", [twin.outputs[0], ref], name=f"{node.name}/bias_error")
        diff.outputs[0].name, diff.outputs[0].dtype = f"{node.name}/bias_error", ref.dtype
        graph.insert_after(node, [twin, diff])
        errors.append((node, diff.outputs[0]))
    return twin_plan, errors


def _channel_means(model: ir.Model, errors: list[tuple[ir.Node, ir.Value]]) -> list[ir.Value]:
    """Per (node, error), the error's mean over every axis but the channel (new graph outputs)."""
    opset = model.opset_imports.get("", 13)
    outputs = []
    for node, error in errors:
        rank = len(node.inputs[1].const_value.shape) if node.op_type == "Conv" else 2
        over = [a for a in range(rank) if a != 1]
        mean, axes = reduce_node("ReduceMean", error, over, opset, f"{node.name}/bias_mean_error", keepdims=False)
        if axes is not None:
            model.graph.register_initializer(axes)
        mean.outputs[0].name, mean.outputs[0].dtype = f"{node.name}/bias_mean_error", error.dtype
        model.graph.insert_after(error.producer(), [mean])
        outputs.append(mean.outputs[0])
    return outputs


def _energies(model: ir.Model, errors: list[tuple[ir.Node, ir.Value]]) -> list[ir.Value]:
    """Per (node, error): sum of the squared error, then sum of the squared float output."""
    outputs = []
    for node, error in errors:
        for value, what in ((error, "error"), (node.outputs[0], "signal")):
            total = ir.node("ReduceSumSquare", [value], attributes={"keepdims": 0}, name=f"{node.name}/local_{what}_energy")
            total.outputs[0].name, total.outputs[0].dtype = f"{node.name}/local_{what}_energy", error.dtype
            model.graph.insert_after(error.producer(), [total])
            outputs.append(total.outputs[0])
    return outputs


def _sum_outputs(model: ir.Model, twin_plan: QuantPlan, outputs: list[ir.Value], data, label: str) -> list[np.ndarray]:
    """Run ``model`` (twins quantized) over ``data``: per output, its sum over the samples
    (float64; no sample kept), divided by the number of samples."""
    model.graph.outputs.extend(outputs)
    emit.emit(model, twin_plan, ["quantize", "finish"])
    session = ort_rt.create_session(modelio.to_proto(model))
    names = [v.name for v in outputs]
    sums = [None] * len(names)
    samples = 0
    with progress_bar(len(data) if hasattr(data, "__len__") else None, label) as bar:
        for feed in data:
            for k, value in enumerate(ort_rt.run(session, feed, names)):
                v = np.asarray(value, dtype=np.float64)
                sums[k] = v if sums[k] is None else sums[k] + v
            samples += 1
            bar.update(1)
    if samples == 0:
        raise OnnxqError(f"{label} needs calibration data with at least one sample")
    return [s / samples for s in sums]


def _working_copy(model: ir.Model, plan: QuantPlan) -> ir.Model:
    copy = ir.serde.deserialize_model(modelio.to_proto(model))
    if plan.min_opset:  # the reductions are written for the opset the twins run at
        RequireOpsetPass(plan.min_opset)(copy)
    return copy


def measure_corrections(model: ir.Model, plan: QuantPlan, data: Iterable[Mapping[str, np.ndarray]]) -> dict[str, list[float]]:
    """{node: −mean error per output channel} of every quantized Conv/Gemm (``model`` is not modified)."""
    copy = _working_copy(model, plan)
    nodes = _corrected_nodes(copy, plan)
    if not nodes:
        return {}
    twin_plan, errors = _add_twins(copy, plan, nodes)
    means = _sum_outputs(copy, twin_plan, _channel_means(copy, errors), data, "bias correction")
    return {node.name: [float(v) for v in (-m).astype(np.float32)] for node, m in zip(nodes, means)}


def measure_local_snr(model: ir.Model, plan: QuantPlan, data: Iterable[Mapping[str, np.ndarray]], names: Iterable[str]) -> dict[str, float]:
    """{node: SNR in dB of its own quantized output against its float output} for the named
    quantized Conv/Gemm nodes, twins on float inputs as for the bias correction (one pass)."""
    copy = _working_copy(model, plan)
    wanted = set(names)
    nodes = [n for n in _corrected_nodes(copy, plan) if n.name in wanted]
    if not nodes:
        return {}
    twin_plan, errors = _add_twins(copy, plan, nodes)
    energies = _sum_outputs(copy, twin_plan, _energies(copy, errors), data, "local error")
    return {
        node.name: float(10 * np.log10(max(float(signal), 1e-30) / max(float(error), 1e-30)))
        for node, error, signal in zip(nodes, energies[0::2], energies[1::2])
    }
