"""``onnxq inspect``: what a model is — opset, IR version, op histogram, Q/DQ by precision, parameters,
layers and MACs by precision, inputs and outputs with shapes."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping

import onnx_ir as ir

from onnxq.layers import graph_layers, load_model, shape_list


def _value(v: ir.Value) -> dict:
    return {"name": v.name, "dtype": v.dtype.name.lower() if v.dtype is not None else None, "shape": shape_list(v.shape)}


def inspect(model: str | os.PathLike | ir.Model, dims: Mapping[str, int] | None = None) -> dict:
    """A JSON-ready description of ``model`` (a path or an ir.Model; never modified on disk)."""
    model = load_model(model)
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
                  for n in ir.traversal.RecursiveGraphIterator(model.graph))
    params = count = 0
    by_dtype: Counter[str] = Counter()
    for init in model.graph.initializers.values():
        if init.const_value is None:
            continue
        n = init.const_value.size
        count += n
        params += init.const_value.nbytes
        by_dtype[init.const_value.dtype.name.lower()] += n
    inputs = [_value(v) for v in model.graph.inputs if v.name not in model.graph.initializers]
    outputs = [_value(v) for v in model.graph.outputs]
    layers = graph_layers(model, dims)
    return {
        "ir_version": model.ir_version,
        "opsets": dict(sorted((d or "ai.onnx", v) for d, v in model.opset_imports.items())),
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x),
        "nodes": sum(ops.values()),
        "op_histogram": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "qdq_by_precision": layers.qdq_nodes,
        "parameters": {"count": count, "bytes": params, "by_dtype": dict(sorted(by_dtype.items()))},
        "inputs": inputs,
        "outputs": outputs,
        "layers_by_precision": layers.layers_by_precision(),
        "macs_by_precision": layers.macs_by_precision(),
        "dims": {"given": dict(dims or {}), "other dynamic dims": 1},
    }


def _shape_text(v: dict) -> str:
    return f"{v['name']}: {v['dtype']}[{', '.join(map(str, v['shape'] or []))}]"


def format_text(info: dict) -> str:
    opsets = ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
    p = info["parameters"]
    lines = [
        f"IR version {info['ir_version']}; opsets: {opsets}" + (f"; producer {info['producer']}" if info["producer"] else ""),
        "inputs:  " + "; ".join(_shape_text(v) for v in info["inputs"]),
        "outputs: " + "; ".join(_shape_text(v) for v in info["outputs"]),
        f"parameters: {p['count']:,} ({p['bytes'] / 2**20:.2f} MiB; "
        + ", ".join(f"{k} {v:,}" for k, v in p["by_dtype"].items()) + ")",
        "Q/DQ/Cast nodes: " + (", ".join(f"{k}: {v}" for k, v in info["qdq_by_precision"].items()) or "none"),
        "MatMul/Gemm/Conv layers by precision: " + (", ".join(f"{k} {v}" for k, v in info["layers_by_precision"].items()) or "none"),
        "MACs by precision (dynamic dims = 1 unless given): "
        + (", ".join(f"{k} {v:,}" for k, v in info["macs_by_precision"].items()) or "none"),
        f"op histogram ({info['nodes']} nodes):",
    ]
    lines += [f"  {op:<28} {n}" for op, n in info["op_histogram"].items()]
    return "\n".join(lines)
