"""The local sweep: one ORT pass over the data measures every layer.

The float model is augmented with a quantized *twin* of each linear node per precision: a copy of
the node that reads the very float tensors the original reads, through Q/DQ (activation scales
from the calibration table, weights per channel), inserted by :class:`~onnxq.passes.qdq.InsertQDQPass`
from a plan that quantizes the twins only (one Q/DQ pair per tensor and precision), so a twin is
what the real pass would build. ``ReduceSumSquare`` of (twin − original) and of the original are
graph outputs: two scalars per layer per sample come back, summed in float64, so memory does not
grow with the data. SNR = 10·log10(Σref²/Σ(twin−ref)²) and MSE = Σ(twin−ref)²/elements per layer.
The twin sees the float model's input, so the error is the layer's own, not accumulated from
quantized layers before it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import modelio
from onnxq.metrics import snr_db
from onnxq.ops import LINEAR_OPS
from onnxq.plan import WEIGHT_DTYPE, ActivationQuant, NodeDecision, QuantPlan, WeightQuant, inputs_at
from onnxq.progress import progress_bar
from onnxq.runtime import ort as ort_rt

from .candidates import insert_qdq
from .groups import Layer
from .options import SweepError
from .ranges import Ranges


def _scalar_out(op: str, inputs: list[ir.Value], name: str, dtype=ir.DataType.FLOAT) -> tuple[list[ir.Node], ir.Value]:
    node = ir.node(op, inputs, attributes={"keepdims": 0} if op.startswith("Reduce") else {}, name=name)
    node.outputs[0].name = name
    node.outputs[0].dtype = dtype
    return [node], node.outputs[0]


class _TwinBuilder:
    """Adds quantized twins of linear nodes to a float model, plus their error reductions."""

    def __init__(self, model: ir.Model, base: QuantPlan, ranges: Ranges):
        self.model = model
        self.graph = model.graph
        self.base = base
        self.ranges = ranges
        self.twin_plan = QuantPlan(target=base.target, precision=base.precision)
        self.outputs: list[ir.Value] = []

    def add_layer(self, layer: Layer, precisions: Sequence[str]) -> dict:
        """Twins of the layer's linear nodes; returns the output names of its reductions."""
        by_name = {n.name: n for n in self.graph}
        names: dict = {"signal": [], "size": [], "noise": {p: [] for p in precisions}, "shapes": {}}
        for node_name in layer.nodes:
            node = by_name[node_name]
            if node.op_type not in LINEAR_OPS:
                continue  # companions (Pad, residual Add) move the linear node's quantizers
            inputs, scale_from = self._quantized_inputs(node, layer)
            tail: list[ir.Node] = []
            for p in precisions:
                self._plan_inputs(node, inputs, scale_from, p)
                nodes, noise = self._twin_noise(node, inputs, p)
                tail += nodes
                names["noise"][p].append(noise.name)
            tail += self._reference_stats(node, names)
            self.graph.insert_after(node, tail)
        return names

    def _quantized_inputs(self, node: ir.Node, layer: Layer) -> tuple[dict[int, str], dict[int, str]]:
        """The node's quantized inputs {index: kind} and the tensor each one's range comes from."""
        inputs = dict(self.base.nodes[node.name].inputs)
        scale_from = {i: node.inputs[i].name for i in inputs}
        if 0 not in inputs:  # activation Q/DQ placed before a companion Pad: same range + zeros
            pad = node.inputs[0].producer()
            if pad is not None and pad.name in layer.nodes:
                inputs[0] = "activation"
                scale_from[0] = pad.inputs[0].name
        return inputs, scale_from

    def _plan_inputs(self, node: ir.Node, inputs: dict[int, str], scale_from: dict[int, str], precision: str) -> None:
        """The twin plan's quantizers of the node's inputs at ``precision``."""
        for index, kind in inputs.items():
            if kind == "activation":
                params = self.ranges.params[precision][scale_from[index]]
                self.twin_plan.set_activation(node.inputs[index].name, precision, ActivationQuant(**vars(params)))
            elif kind == "weight":
                entry = self.base.weight(node.name, index)
                twin = f"{node.name}/twin_{precision}"
                self.twin_plan.set_weight(twin, index, WeightQuant(WEIGHT_DTYPE[precision], entry.axis if entry else None))

    def _twin_noise(self, node: ir.Node, inputs: dict[int, str], precision: str) -> tuple[list[ir.Node], ir.Value]:
        """The twin at ``precision`` and Σ(twin − original)² as a graph output."""
        ref = node.outputs[0]
        twin = ir.Node(node.domain, node.op_type, list(node.inputs), attributes=list(node.attributes.values()), name=f"{node.name}/twin_{precision}")
        twin.outputs[0].name = f"{ref.name}/twin_{precision}"
        twin.outputs[0].dtype, twin.outputs[0].shape = ref.dtype, ref.shape
        self.twin_plan.nodes[twin.name] = NodeDecision(node.op_type, precision, inputs_at(inputs, precision), f"sweep twin of {node.name}")
        diff = ir.node("Sub", [twin.outputs[0], ref], name=f"{node.name}/diff_{precision}")
        diff.outputs[0].name = f"{node.name}/diff_{precision}"
        nodes, noise = _scalar_out("ReduceSumSquare", [diff.outputs[0]], f"{node.name}/noise_{precision}")
        self.outputs.append(noise)
        return [twin, diff, *nodes], noise

    def _reference_stats(self, node: ir.Node, names: dict) -> list[ir.Node]:
        """Σoriginal², its size and the shapes of the node's inputs and output, as graph outputs."""
        ref = node.outputs[0]
        signal_nodes, signal = _scalar_out("ReduceSumSquare", [ref], f"{node.name}/signal")
        size_nodes, size = _scalar_out("Size", [ref], f"{node.name}/size", ir.DataType.INT64)
        names["signal"].append(signal.name)
        names["size"].append(size.name)
        self.outputs += [signal, size]
        tail = signal_nodes + size_nodes
        shape_names = []
        for v in (node.inputs[0], node.inputs[1], ref):
            s = ir.node("Shape", [v], name=f"{node.name}/shape_{len(shape_names)}")
            s.outputs[0].name = f"{node.name}/shape_{len(shape_names)}"
            s.outputs[0].dtype = ir.DataType.INT64
            tail.append(s)
            shape_names.append(s.outputs[0].name)
            self.outputs.append(s.outputs[0])
        names["shapes"][node.name] = shape_names
        return tail

    def finish(self) -> onnx.ModelProto:
        for v in self.outputs:
            self.graph.outputs.append(v)
        insert_qdq(self.model, self.twin_plan)
        return modelio.to_proto(self.model)


def _is_shape(name: str) -> bool:
    return name.split("/")[-1].startswith("shape_")


def _run_sums(session, names: Sequence[str], data: Iterable[Mapping[str, np.ndarray]]) -> tuple[dict[str, float], dict[str, list[int]], int]:
    """Each scalar output summed over ``data`` (float64), the shape outputs of the first sample,
    and the number of samples."""
    fetch = [n for n in names if not _is_shape(n)]
    shape_fetch = [n for n in names if _is_shape(n)]
    sums = dict.fromkeys(fetch, 0.0)
    shapes: dict[str, list[int]] = {}
    samples = 0
    total = len(data) if hasattr(data, "__len__") else None
    with progress_bar(total, "local sweep") as bar:
        for feed in data:
            wanted = fetch + (shape_fetch if samples == 0 else [])
            for n, v in zip(wanted, ort_rt.run(session, feed, wanted)):
                if n in sums:
                    sums[n] += float(np.asarray(v, dtype=np.float64))
                else:
                    shapes[n] = [int(d) for d in np.asarray(v).reshape(-1)]
            samples += 1
            bar.update(1)
    return sums, shapes, samples


def _layer_errors(layer: Layer, outputs: dict, sums: Mapping[str, float], precisions: Sequence[str]) -> dict[str, dict]:
    """{precision: {snr_db, mse, noise, signal}} of one layer from the summed reductions."""
    signal = sum(sums[n] for n in outputs["signal"])
    size = sum(sums[n] for n in outputs["size"])
    result = {}
    for p in precisions:
        noise = sum(sums[n] for n in outputs["noise"][p])
        result[p] = {"snr_db": snr_db(signal, noise), "mse": noise / size if size else 0.0, "noise": noise, "signal": signal}
    return result


def local_sweep(
    model: ir.Model,
    base: QuantPlan,
    layers: Sequence[Layer],
    ranges: Ranges,
    data: Iterable[Mapping[str, np.ndarray]],
    precisions: Sequence[str],
) -> tuple[dict[str, dict[str, dict]], float, int]:
    """{layer: {precision: {snr_db, mse, noise, signal}}}, the seconds of the pass, samples.

    ``model`` is modified (twins are added): pass a copy you do not need any more. Each layer's
    ``extra["shapes"]`` gets the shapes its linear nodes ran with (for :func:`.costs.fill_costs`).
    """
    builder = _TwinBuilder(model, base, ranges)
    outputs = {layer.name: builder.add_layer(layer, precisions) for layer in layers}
    proto = builder.finish()
    names = [v.name for v in builder.outputs]
    del model, builder
    session = ort_rt.create_session(proto)
    del proto
    t0 = time.perf_counter()
    sums, shapes, samples = _run_sums(session, names, data)
    seconds = time.perf_counter() - t0
    if samples == 0:
        raise SweepError("the sweep data has no samples; pass --eval DATA with at least one sample")
    results = {}
    for layer in layers:
        results[layer.name] = _layer_errors(layer, outputs[layer.name], sums, precisions)
        layer.extra["shapes"] = {node: [shapes.get(n) for n in s] for node, s in outputs[layer.name]["shapes"].items()}
    return results, seconds, samples
