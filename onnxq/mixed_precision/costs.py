"""What a layer costs: MACs and element counts from the shapes the model runs with, and a cost
per precision, measured (``--latency-json``) or on a nominal roofline.

The roofline, per layer and sample: time = max(MACs / peak, bytes / bandwidth), the 8-bit peak
twice the 16-bit one, 8-bit tensors one byte an element and high precision two (FP16, what
TensorRT runs outside Q/DQ), outputs written in 16 bits either way; a layer's float side MACs
(split outlier channels, online rotations) run at the float peak whatever its precision. Measured costs come as
``{layer or node name: {precision: cost}}`` (e.g. from a TensorRT profile); node costs are summed
per layer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import modelio
from onnxq.ops import LINEAR_OPS, MATMUL_OPS, static_macs
from onnxq.plan import FLOAT, QuantPlan
from onnxq.runtime import ort as ort_rt

from .groups import Layer
from .options import SolverError, read_json

# Nominal roofline (an A100-like device; only ratios matter): MAC/s by precision, bytes/s.
PEAK_MACS = {"float": 156e12, "int8": 312e12, "fp8": 312e12}
BANDWIDTH = 2.0e12
ELEMENT_BYTES = {"float": 2, "int8": 1, "fp8": 1}


def fill_costs(model: ir.Model, base: QuantPlan, layers: Sequence[Layer], feed: Mapping[str, np.ndarray] | None = None, split: Mapping[str, float] | None = None) -> None:
    """MACs and element counts per layer for one sample, from the shapes the model runs with.

    Uses the shapes a local sweep recorded; otherwise runs ``feed`` once through a copy of the
    model with Shape outputs. The layer's ``float_side_macs``: ``split`` ({node: share of its
    input channels in a float side product}, SmoothQuant's split outliers) of its MatMul MACs,
    and the MatMuls the plan's online rotation inserts before its nodes.
    """
    online = base.rotation.online_macs() if base.rotation is not None else {}
    by_name = {n.name: n for n in model.graph}
    if any("shapes" not in layer.extra for layer in layers) and feed is not None:
        _record_shapes(model, layers, feed)
    for layer in layers:
        recorded = layer.extra.get("shapes", {})
        layer.macs = layer.matmul_macs = layer.float_side_macs = layer.weight_elements = layer.activation_elements = layer.output_elements = 0
        for name in layer.nodes:
            node = by_name[name]
            if node.op_type not in LINEAR_OPS:
                continue
            sa, sb, so = recorded.get(name, [None, None, None])
            shapes = {v.name: s for v, s in zip((node.inputs[0], node.inputs[1], node.outputs[0]), (sa, sb, so)) if s is not None}
            macs = static_macs(node, shapes)
            layer.macs += macs
            if node.op_type in MATMUL_OPS:
                layer.matmul_macs += macs
                layer.float_side_macs += round(macs * (split or {}).get(name, 0.0))
            if name in online:
                sizes = (_elements(v, shapes) for v in node.inputs[:2])
                layer.float_side_macs += sum(size * per for size, per in zip(sizes, online[name]))
            for index, kind in base.nodes[name].inputs.items():
                count = _elements(node.inputs[index], shapes)
                if kind == "weight":
                    layer.weight_elements += count
                elif kind == "activation":
                    layer.activation_elements += count
            if 0 not in base.nodes[name].inputs and sa:  # quantized before a companion Pad
                layer.activation_elements += int(np.prod(sa))
            if so:
                layer.output_elements += int(np.prod(so))


def _elements(value: ir.Value, shapes: Mapping[str, list[int]]) -> int:
    """Elements of ``value`` for one sample: its recorded shape, else its static one, else 0."""
    shape = shapes.get(value.name) or ([d for d in value.shape] if value.shape is not None and all(isinstance(d, int) for d in value.shape) else None)
    return int(np.prod(shape)) if shape else 0


def _record_shapes(model: ir.Model, layers: Sequence[Layer], feed: Mapping[str, np.ndarray]) -> None:
    proto = modelio.to_proto(model)
    by_name = {n.name: n for n in model.graph}
    wanted: dict[str, list[str]] = {}
    extra_nodes, extra_outputs = [], []
    for layer in layers:
        for name in layer.nodes:
            node = by_name[name]
            if node.op_type not in LINEAR_OPS:
                continue
            names = []
            for i, v in enumerate((node.inputs[0], node.inputs[1], node.outputs[0])):
                out = f"{name}/shape_{i}"
                extra_nodes.append(onnx.helper.make_node("Shape", [v.name], [out], name=out))
                extra_outputs.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.INT64, None))
                names.append(out)
            wanted[name] = names
    proto.graph.node.extend(extra_nodes)
    proto.graph.output.extend(extra_outputs)
    session = ort_rt.create_session(proto)
    flat = [n for names in wanted.values() for n in names]
    values = dict(zip(flat, ort_rt.run(session, feed, flat)))
    for layer in layers:
        layer.extra["shapes"] = {
            name: [[int(d) for d in values[n]] for n in wanted[name]] for name in layer.nodes if name in wanted
        }


def roofline_cost(layer: Layer, precision: str) -> float:
    """Microseconds per sample on the nominal roofline."""
    size = ELEMENT_BYTES.get(precision, 1)
    moved = (layer.weight_elements + layer.activation_elements) * size + layer.output_elements * ELEMENT_BYTES["float"]
    compute = layer.macs / PEAK_MACS.get(precision, PEAK_MACS["int8"]) + layer.float_side_macs / PEAK_MACS["float"]
    return 1e6 * max(compute, moved / BANDWIDTH)


def load_latency(path: str | os.PathLike, layers: list[Layer], precisions: list[str]) -> dict[str, dict[str, float]]:
    """Per-layer costs from ``{layer or node name: {precision: cost}}``; every layer must be covered."""
    path = Path(path)
    data = read_json(path, "latency", SolverError, "give {layer or node name: {precision: cost}}")
    if not isinstance(data, dict):
        raise SolverError(f"{path} must map layer or node names to {{precision: cost}}")
    out = {}
    for layer in layers:
        keys = [layer.name] if layer.name in data else [n for n in layer.nodes if n in data]
        if not keys:
            raise SolverError(f"{path} has no cost for layer {layer.name!r} (nodes {layer.nodes}); give each layer or its nodes {{precision: cost}}")
        out[layer.name] = {}
        for p in [*precisions, FLOAT]:
            try:
                out[layer.name][p] = float(sum(float(data[k][p]) for k in keys if p in data[k]))
            except (TypeError, ValueError):
                raise SolverError(f"{path}: the cost of {keys} at {p!r} is not a number") from None
            if not any(p in data[k] for k in keys):
                raise SolverError(f"{path}: no {p!r} cost for layer {layer.name!r}")
    return out


def layer_costs(layers: Sequence[Layer], precisions: Sequence[str], latency_json: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """{layer: {precision or float: cost}}: measured from ``latency_json``, else the roofline."""
    if latency_json:
        return load_latency(latency_json, list(layers), list(precisions))
    return {la.name: {p: roofline_cost(la, p) for p in [*precisions, FLOAT]} for la in layers}
