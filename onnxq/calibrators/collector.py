"""Streaming statistics collection through ONNX Runtime.

The model is augmented with one ReduceMin and one ReduceMax per observed tensor, so ORT returns
two scalars per tensor per batch instead of the activation itself. Statistics are merged batch by
batch; no activation outlives its batch, and memory does not grow with the number of samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import modelio
from onnxq.calibrators.table import CalibrationTable, TensorStats
from onnxq.errors import DataError
from onnxq.progress import progress_bar
from onnxq.runtime import ort as ort_rt

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    for node in graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values


def augment_with_reductions(model: ir.Model, tensors: Sequence[str]) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` as a proto whose outputs are (min, max) of each float tensor in ``tensors``.

    The reductions are added to ``model`` only while it is serialized and removed again, so the
    weights are never held twice as ``ir`` objects. Returns the proto and the tensors observed
    (non-float ones are skipped).
    """
    graph = model.graph
    values = _values_by_name(graph)
    observed, new_nodes, new_outputs = [], [], []
    for name in tensors:
        value = values.get(name)
        if value is None:
            raise DataError(f"tensor {name!r} is not produced by the model; it cannot be calibrated")
        if value.dtype not in _FLOAT_TYPES:
            continue
        for op in ("ReduceMin", "ReduceMax"):
            node = ir.node(op, [value], attributes={"keepdims": 0}, name=f"onnxq_calib/{op}/{name}")
            out = node.outputs[0]
            out.name = f"{name}::onnxq_{op[6:].lower()}"
            out.dtype = value.dtype
            out.shape = ir.Shape([])
            new_nodes.append(node)
            new_outputs.append(out)
        observed.append(name)
    original_outputs = list(graph.outputs)
    graph.extend(new_nodes)
    graph.outputs[:] = new_outputs
    try:
        proto = modelio.to_proto(model)
    finally:
        graph.outputs[:] = original_outputs
        graph.remove(new_nodes, safe=True)
    return proto, observed


def collect(
    model: ir.Model,
    tensors: Sequence[str],
    data: Iterable[dict[str, np.ndarray]],
    *,
    progress: bool = True,
    session_threads: int | None = None,
) -> CalibrationTable:
    """Run ``data`` through ``model`` once, returning min/max of every tensor in ``tensors``."""
    augmented, observed = augment_with_reductions(model, tensors)
    table = CalibrationTable(method="minmax", tensors={name: TensorStats() for name in observed})
    if not observed:
        return table
    session = ort_rt.create_session(augmented, threads=session_threads)
    del augmented
    total = len(data) if hasattr(data, "__len__") and len(data) else None
    bar = progress_bar(total, f"calibrating {len(observed)} tensors", enabled=progress)
    with bar:
        for feed in data:
            results = ort_rt.run(session, feed)
            for i, name in enumerate(observed):
                lo, hi = results[2 * i], results[2 * i + 1]
                table.tensors[name].update(lo, hi)
            table.num_samples += 1
            bar.update(1)
    if table.num_samples == 0:
        raise DataError("the calibration data holds no samples; give at least one")
    return table
