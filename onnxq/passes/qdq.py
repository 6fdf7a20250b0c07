"""Insert QuantizeLinear/DequantizeLinear pairs as a QuantPlan says.

Rule: for every quantized node in the plan,
- each input marked ``activation`` is read through one Q→DQ pair per tensor (shared by every
  consumer the plan names, so a LayerNorm output feeding Q, K and V gets one pair), with the scale
  and zero point the plan holds for that tensor;
- each input marked ``weight`` is replaced by an integer initializer and a DequantizeLinear
  (symmetric, per channel on the plan's axis, zero point 0); the float initializer is removed when
  nothing else reads it;
- each tensor in ``plan.outputs`` gets the same Q→DQ pair for all of its consumers.
The pass executes the plan only: it makes no placement decision of its own.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.errors import PlanError
from onnxq.plan import ActivationQuant, QuantPlan, WeightQuant
from onnxq.weights import quantize_weight, weight_source

_INT_TYPES = {
    "int8": (ir.DataType.INT8, np.int8, -128, 127),
    "uint8": (ir.DataType.UINT8, np.uint8, 0, 255),
}
_NP_FLOAT = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


class InsertQDQPass(ir.passes.InPlacePass):
    def __init__(self, plan: QuantPlan):
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self._graph = graph
        self._activation_dq: dict[str, ir.Value] = {}
        self._weight_dq: dict[str, ir.Value] = {}
        self._qdq_nodes: set[int] = set()
        by_name = {node.name: node for node in graph}
        modified = False
        for name, decision in self.plan.nodes.items():
            if not decision.quantized:
                continue
            node = by_name.get(name)
            if node is None:
                raise PlanError(f"the plan names node {name!r}, which the model does not have; was the plan made for another model?")
            for index, kind in sorted(decision.inputs.items()):
                if index >= len(node.inputs) or node.inputs[index] is None:
                    raise PlanError(f"the plan quantizes input {index} of {name!r}, which has no such input")
                value = node.inputs[index]
                if kind == "activation":
                    node.replace_input_with(index, self._activation(value))
                elif kind == "weight":
                    node.replace_input_with(index, self._weight(value))
                else:
                    raise PlanError(f"input kind {kind!r} of node {name!r} is not one onnxq knows")
                modified = True
        values = {v.name: v for n in graph for v in n.outputs}
        values.update({v.name: v for v in graph.inputs})
        for tensor in self.plan.outputs:
            value = values.get(tensor)
            if value is None:
                raise PlanError(f"the plan quantizes tensor {tensor!r}, which the model does not produce")
            dq = self._activation(value)
            for use in list(value.uses()):
                if id(use.node) not in self._qdq_nodes:
                    use.node.replace_input_with(use.idx, dq)
            modified = True
        for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_input()]:
            graph.initializers.pop(name)
        return ir.passes.PassResult(model, modified)

    # ------------------------------------------------------------------------------------------
    def _constant(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.dtype = value.const_value.dtype
        value.shape = ir.Shape(array.shape)
        self._graph.register_initializer(value)
        return value

    def _insert(self, after: ir.Value, nodes: list[ir.Node]) -> None:
        producer = after.producer()
        if producer is not None:
            self._graph.insert_after(producer, nodes)
        else:  # a graph input or initializer: put the nodes first
            first = next(iter(self._graph), None)
            if first is None:
                self._graph.extend(nodes)
            else:
                self._graph.insert_before(first, nodes)
        self._qdq_nodes.update(id(n) for n in nodes)

    def _activation(self, value: ir.Value) -> ir.Value:
        if value.name in self._activation_dq:
            return self._activation_dq[value.name]
        params = self.plan.activations.get(value.name)
        if params is None or params.scale is None:
            raise PlanError(
                f"tensor {value.name!r} is quantized by the plan but has no calibrated scale; "
                "calibrate again (pass --calib)"
            )
        ir_int, np_int, _, _ = _INT_TYPES[params.dtype]
        np_float = _NP_FLOAT.get(value.dtype, np.float32)
        scale = self._constant(f"{value.name}_scale", np.array(params.scale, dtype=np_float))
        zero = self._constant(f"{value.name}_zero_point", np.array(params.zero_point, dtype=np_int))
        q = ir.node("QuantizeLinear", [value, scale, zero], name=f"{value.name}_QuantizeLinear")
        q.outputs[0].name = f"{value.name}_quantized"
        q.outputs[0].dtype = ir_int
        q.outputs[0].shape = value.shape
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=f"{value.name}_DequantizeLinear")
        dq.outputs[0].name = f"{value.name}_dequantized"
        dq.outputs[0].dtype = value.dtype
        dq.outputs[0].shape = value.shape
        self._insert(value, [q, dq])
        self._activation_dq[value.name] = dq.outputs[0]
        return dq.outputs[0]

    def _weight(self, value: ir.Value) -> ir.Value:
        """A dequantized copy of the weight behind ``value``.

        A weight read through a Transpose gets its transposed integer copy as an initializer, so
        no Transpose or dequantization of a large constant runs at inference time and ORT/TRT
        see the DQ→MatMul pattern they fuse; float readers of the original (a Gather) keep it.
        """
        if value.name in self._weight_dq:
            return self._weight_dq[value.name]
        source = weight_source(value)
        if source is None:
            raise PlanError(f"the plan quantizes {value.name!r} as a weight, but it is not a float initializer")
        init = source.initializer
        params = self.plan.weights.get(init.name, WeightQuant())
        if params.dtype != "int8":
            raise PlanError(f"weights quantize to int8 (symmetric); the plan asks for {params.dtype} for {init.name!r}")
        array = init.const_value.numpy()
        if params.axis is not None and not -array.ndim <= params.axis < array.ndim:
            raise PlanError(f"weight {init.name!r} has rank {array.ndim}; axis {params.axis} does not exist")
        axis = None if params.axis is None else params.axis % array.ndim
        q, scale = quantize_weight(array, axis)
        name = init.name
        if source.transpose is not None:
            perm = source.transpose.attributes.get_ints("perm", list(range(array.ndim))[::-1])
            q = np.ascontiguousarray(np.transpose(q, perm))
            axis = None if axis is None else list(perm).index(axis)
            name = value.name
        np_float = _NP_FLOAT.get(init.dtype, np.float32)
        q_value = self._constant(f"{name}_quantized", q)
        scale_value = self._constant(f"{name}_scale", scale.astype(np_float))
        zero_value = self._constant(f"{name}_zero_point", np.zeros(scale.shape, dtype=np.int8))
        attrs = {"axis": axis} if axis is not None else {}
        dq = ir.node(
            "DequantizeLinear", [q_value, scale_value, zero_value], attributes=attrs, name=f"{name}_DequantizeLinear"
        )
        dq.outputs[0].name = f"{name}_dequantized"
        dq.outputs[0].dtype = value.dtype
        dq.outputs[0].shape = value.shape
        self._insert(q_value, [dq])
        self._weight_dq[value.name] = dq.outputs[0]
        return dq.outputs[0]


def activation_params(lo: float, hi: float, dtype: str) -> ActivationQuant:
    """Scale and zero point for an activation range: int8 symmetric, uint8 asymmetric."""
    if dtype == "int8":
        amax = max(abs(lo), abs(hi))
        scale = amax / 127.0 if amax > 0 else 1.0
        return ActivationQuant(dtype="int8", symmetric=True, min=lo, max=hi, scale=float(np.float32(scale)), zero_point=0)
    if dtype == "uint8":
        rmin, rmax = min(lo, 0.0), max(hi, 0.0)
        scale = (rmax - rmin) / 255.0 if rmax > rmin else 1.0
        zero = int(np.clip(np.rint(-rmin / scale), 0, 255))
        return ActivationQuant(dtype="uint8", symmetric=False, min=lo, max=hi, scale=float(np.float32(scale)), zero_point=zero)
    raise PlanError(f"activation dtype {dtype!r} is not supported; use int8 or uint8")
