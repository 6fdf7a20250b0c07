"""Fold SmoothQuant scales into the graph, as a :class:`onnxq.smoothquant.SmoothPlan` says.

Rule: for every smoothed group (activation X, per-channel scale s > 0, consumers C_i):

- each consumer's weight is multiplied by s along its input-channel axis (MatMul ``[K, N]``:
  rows; Gemm: rows of B, columns with ``transB=1``; 1×1 Conv: axis 1) — ``diag(s) · W``;
- X's channels are divided by s where the plan says (its ``folds``: a norm's scale and bias,
  a per-channel weight ``Mul``, a producer's output channels and bias), so the graph computes
  ``X · diag(s)⁻¹`` with no new node; or, for a group whose plan says ``inserted_mul``, one
  ``Mul(X, 1/s)`` is inserted and every consumer of the group reads its output
  ``<X>_smoothed``.

A group with split channels c (outliers kept in float) always goes through the inserted ``Mul``,
by ``m/s`` with m 0 on c; the rows c of each consumer's weight become 0, and each consumer's
output becomes ``Add(<Y>_split_main, MatMul(Gather(X, c), W[c, :]))`` under the name ``<Y>``.

``(X · diag(s)⁻¹) · (diag(s) · W) = X · W``: the float model computes the same function. A
constant read by another node too (a shared initializer, a tied embedding read through a
Transpose) is not changed in place: the scaled copy becomes a new initializer of the node that
needs it, so every other reader keeps the original. The pass decides nothing: groups, scales and
where each scale goes come from the plan (:func:`onnxq.smoothquant.plan_smoothing`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.errors import PlanError
from onnxq.passes.initializers import add_initializer, constant_as_read, drop_unused_initializers, replace_constant
from onnxq.plan import Fold, SmoothPlan
from onnxq.smoothquant import weight_matrix


class SmoothQuantPass(ir.passes.InPlacePass):
    def __init__(self, plan: SmoothPlan):
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self._graph = graph
        by_name = {node.name: node for node in graph}
        values = {v.name: v for v in graph.inputs}
        values.update({o.name: o for n in graph for o in n.outputs})
        modified = False
        for group in self.plan.active():
            s = np.asarray(group.scale, dtype=np.float32)
            for name in [f.node for f in (*group.folds, *group.weight_folds)]:
                if name not in by_name:
                    raise PlanError(f"the SmoothQuant plan names node {name!r}, which the model does not have")
            x = values.get(group.activation)
            if group.inserts_mul and x is None:
                raise PlanError(f"the SmoothQuant plan smooths {group.activation!r}, which the model does not produce")
            if group.split:  # the side products read the original weight rows: before the folds
                for c in group.consumers:
                    self._split_off(x, by_name[c], group.split)
            for fold in group.folds:
                self._fold(by_name[fold.node], fold, s)
            for fold in group.weight_folds:
                self._fold(by_name[fold.node], fold, group.weight_scale())
            if group.inserts_mul:
                self._insert_mul(x, [by_name[c] for c in group.consumers], group.inverse_scale(), group.trailing, group.output)
            modified = True
        drop_unused_initializers(graph)
        return ir.passes.PassResult(model, modified)

    def _fold(self, node: ir.Node, fold: Fold, s: np.ndarray) -> None:
        array = constant_as_read(node, fold.input, "SmoothQuant")
        factor = s.reshape((-1,) + (1,) * fold.trailing).astype(array.dtype)
        scaled = array / factor if fold.op == "div" else array * factor
        replace_constant(self._graph, node, fold.input, np.ascontiguousarray(scaled.astype(array.dtype)), "smoothed")

    def _split_off(self, x: ir.Value, consumer: ir.Node, channels: list[int]) -> None:
        """``Y`` → ``Add(Y_split_main, MatMul(Gather(X, channels, axis=-1), W[channels, :]))``."""
        dtype = np.float16 if x.dtype == ir.DataType.FLOAT16 else np.float32
        rows = np.ascontiguousarray(weight_matrix(consumer)[channels].astype(dtype))
        y = consumer.outputs[0]
        name = y.name
        index = self._constant(f"{name}_split_channels", np.asarray(channels, dtype=np.int64))
        weight = self._constant(f"{name}_split_weight", rows)
        gather = ir.node("Gather", [x, index], attributes={"axis": -1}, name=f"{name}_SplitGather")
        gather.outputs[0].name = f"{name}_split_input"
        gather.outputs[0].dtype = x.dtype
        matmul = ir.node("MatMul", [gather.outputs[0], weight], name=f"{name}_SplitMatMul")
        matmul.outputs[0].name = f"{name}_split_side"
        matmul.outputs[0].dtype = y.dtype
        add = ir.node("Add", [y, matmul.outputs[0]], name=f"{name}_SplitAdd")
        add.outputs[0].dtype = y.dtype
        add.outputs[0].shape = y.shape
        ir.convenience.replace_all_uses_with(y, add.outputs[0], replace_graph_outputs=True)
        add.replace_input_with(0, y)
        y.name = f"{name}_split_main"
        add.outputs[0].name = name
        self._graph.insert_after(consumer, [gather, matmul, add])

    def _constant(self, name: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self._graph, name, array)

    def _insert_mul(self, x: ir.Value, consumers: list[ir.Node], inv: np.ndarray, trailing: int, output: str) -> None:
        dtype = np.float16 if x.dtype == ir.DataType.FLOAT16 else np.float32
        inv = inv.reshape((-1,) + (1,) * trailing).astype(dtype)
        const = self._constant(f"{x.name}_smooth_scale", inv)
        mul = ir.node("Mul", [x, const], name=f"{x.name}_SmoothQuantMul")
        mul.outputs[0].name = output
        mul.outputs[0].dtype = x.dtype
        mul.outputs[0].shape = x.shape
        producer = x.producer()
        if producer is not None:
            self._graph.insert_after(producer, [mul])
        else:
            first = next(iter(self._graph), None)
            if first is None:
                self._graph.append(mul)
            else:
                self._graph.insert_before(first, [mul])
        for node in consumers:
            for i, inp in enumerate(node.inputs):
                if inp is x:
                    node.replace_input_with(i, mul.outputs[0])
