"""Run the non-quantized (high-precision) regions of a model in FP16, with explicit Casts.

Rule: every node of the main graph whose float tensors are FP32 runs in FP16, except the nodes
the plan keeps in FP32 (``plan.fp32_nodes``, decided by :mod:`onnxq.placement.fp16`) and those
whose type FP16 cannot express (:func:`~onnxq.placement.fp16.convertible`); wherever an FP32
value meets an FP16 node (or the reverse) one ``Cast`` is inserted per value and direction, so
the graph states every tensor's precision — a strongly typed TensorRT build takes its precision
from the graph alone. Float initializers read by FP16 nodes get an FP16 copy. Graph inputs and
outputs keep their FP32 type (Casts at the border). Q/DQ nodes follow their site: a
``QuantizeLinear`` reading an FP16 tensor takes an FP16 scale, a ``DequantizeLinear`` feeding FP16
nodes outputs FP16 (opset 19 allows FP16 scales); a scale that both an FP16 and an FP32 Q/DQ read
is rounded to FP16 in both, so a Q and its DQ always use the same scale.

Only the main graph is converted. The pass decides nothing.
"""

from __future__ import annotations

__all__ = ["CastFloat16Pass"]

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from onnxq.passes.initializers import add_initializer
from onnxq.placement.fp16 import convertible

FP16_QDQ_MIN_OPSET = 19


class CastFloat16Pass(ir.passes.InPlacePass):
    """Convert the FP32 regions of the main graph to FP16 with explicit Casts at their borders.

    ``keep_fp32``: the nodes to keep in FP32 (``plan.fp32_nodes``: name -> reason, or names).
    """

    def __init__(self, keep_fp32: Mapping[str, str] | Iterable[str] = ()) -> None:
        super().__init__()
        self.kept = dict(keep_fp32) if isinstance(keep_fp32, Mapping) else dict.fromkeys(keep_fp32, "asked")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        upgraded = False
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph):
            from onnxq.passes.opset import require_opset

            upgraded = require_opset(model, FP16_QDQ_MIN_OPSET)  # FP16 scales arrive in opset 19
        graph = model.graph
        nodes = list(graph)
        fp16 = {id(n) for n in nodes if convertible(n) and n.name not in self.kept}
        # A DequantizeLinear runs in FP16 only if every reader does: its output is one tensor.
        for n in nodes:
            if n.op_type == "DequantizeLinear" and id(n) in fp16:
                readers = [u.node for u in n.outputs[0].uses()]
                if n.outputs[0].is_graph_output() or any(id(r) not in fp16 for r in readers):
                    fp16.discard(id(n))
        if not fp16:
            return ir.passes.PassResult(model, modified=upgraded)

        converted: set[int] = set()  # values that now hold FP16
        for n in nodes:
            if id(n) in fp16:
                for out in n.outputs:
                    if out.dtype == ir.DataType.FLOAT:
                        out.dtype = ir.DataType.FLOAT16
                        converted.add(id(out))
        self._to16: dict[int, ir.Value] = {}
        self._to32: dict[int, ir.Value] = {}
        self._graph = graph
        self._shared_scales(nodes, fp16)
        for n in nodes:
            for i, v in enumerate(n.inputs):
                if v is None:
                    continue
                if id(n) in fp16 and v.dtype == ir.DataType.FLOAT and id(v) not in converted:
                    n.replace_input_with(i, self._as16(v))
                elif id(n) not in fp16 and id(v) in converted:
                    n.replace_input_with(i, self._as32(v))
        for i, out in enumerate(list(graph.outputs)):
            if id(out) in converted:
                name = out.name
                out.name = f"{name}_fp16"
                cast = self._as32(out)
                cast.name = name
                graph.outputs[i] = cast
        return ir.passes.PassResult(model, modified=True)

    def _shared_scales(self, nodes: list[ir.Node], fp16: set[int]) -> None:
        """Round every Q/DQ scale that an FP16 Q/DQ reads to FP16 precision in place, so the FP32
        readers of the same scale (the other half of a pair) use the identical value."""
        for n in nodes:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and id(n) in fp16:
                scale = n.inputs[1]
                if scale.dtype == ir.DataType.FLOAT and scale.const_value is not None:
                    rounded = scale.const_value.numpy().astype(np.float16).astype(np.float32)
                    scale.const_value = ir.tensor(rounded, name=scale.name)

    def _insert(self, after: ir.Value, node: ir.Node) -> None:
        producer = after.producer()
        if producer is not None:
            self._graph.insert_after(producer, node)
        else:
            first = next(iter(self._graph), None)
            if first is None:
                self._graph.append(node)
            else:
                self._graph.insert_before(first, node)

    def _cast(self, value: ir.Value, dtype: ir.DataType, suffix: str) -> ir.Value:
        cast = ir.node("Cast", [value], {"to": dtype}, name=f"{value.name}_to_{suffix}")
        new = cast.outputs[0]
        new.name, new.dtype, new.shape = f"{value.name}_{suffix}", dtype, value.shape
        self._insert(value, cast)
        return new

    def _as16(self, value: ir.Value) -> ir.Value:
        if id(value) in self._to16:
            return self._to16[id(value)]
        if value.const_value is not None and value.producer() is None and not value.is_graph_input():
            with np.errstate(over="ignore"):  # only with rules off: beyond 65504 becomes ±inf, as a Cast does
                array = value.const_value.numpy().astype(np.float16)
            new = add_initializer(self._graph, f"{value.name}_fp16", array)
        else:
            new = self._cast(value, ir.DataType.FLOAT16, "fp16")
        self._to16[id(value)] = new
        return new

    def _as32(self, value: ir.Value) -> ir.Value:
        if id(value) not in self._to32:
            self._to32[id(value)] = self._cast(value, ir.DataType.FLOAT, "fp32")
        return self._to32[id(value)]
