"""Feed attention's P·V the unnormalized probabilities, as an :class:`onnxq.plan.AttentionPlan` says.

Rule: for every [Softmax, P·V] pair of ``plan.unnormalized`` (the Softmax over the last axis of
``s``, read by P·V's first input alone):

- the Softmax becomes ``E = Exp(Sub(s, ReduceMax(s, axis -1, keepdims)))``, under the Softmax's
  output name (so the plan's activation entry for P now describes E);
- P·V reads E; its output is renamed ``<name>_unnormalized`` and a
  ``Div(P·V, ReduceSum(E, axis -1, keepdims))`` takes over its name and its readers.

``softmax(s)·V = (E·V) / rowsum(E)``: the float model computes the same function. Every row of
E peaks at exactly 1, so a symmetric INT8 grid on E uses its whole range, where on P (rows
summing to 1) most probabilities round to zero. The row sums stay in float. ReduceMax takes its
axes as an input from opset 18 on, ReduceSum from 13 on; older models get the ``axes``
attribute. The pass decides nothing: the pairs come from the plan
(:func:`onnxq.placement.attention.unnormalized_pairs`).
"""

from __future__ import annotations

import onnx_ir as ir

from onnxq.errors import PlanError
from onnxq.ops import reduce_node
from onnxq.plan import AttentionPlan
from onnxq.progress import log


def _reduce_last_axis(graph: ir.Graph, op_type: str, value: ir.Value, name: str, opset: int) -> ir.Node:
    """``op_type`` (ReduceMax/ReduceSum) over the last axis with keepdims, axes as the opset wants."""
    node, axes = reduce_node(op_type, value, [-1], opset, name, keepdims=True)
    if axes is not None:
        graph.register_initializer(axes)
    node.outputs[0].name = name
    _same_type(node.outputs[0], value, shape=False)
    return node


def _same_type(value: ir.Value, like: ir.Value, shape: bool = True) -> None:
    """``value`` gets ``like``'s dtype (and shape) where they are known (shape inference ran)."""
    if like.dtype is not None:
        value.dtype = like.dtype
    if shape and like.shape is not None:
        value.shape = like.shape


class UnnormalizedSoftmaxPass(ir.passes.InPlacePass):
    def __init__(self, plan: AttentionPlan):
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))
        by_name = {node.name: node for node in graph}
        for softmax_name, pv_name in self.plan.unnormalized:
            softmax, pv = by_name.get(softmax_name), by_name.get(pv_name)
            if softmax is None or pv is None or softmax.op_type != "Softmax" or pv.inputs[0] is not softmax.outputs[0]:
                raise PlanError(f"the attention plan names Softmax {softmax_name!r} read by P·V {pv_name!r}, which the model does not have; was the plan made for another model?")
            self._rewrite(graph, softmax, pv, opset)
        if self.plan.unnormalized:
            log(f"onnxq: attention probabilities: {len(self.plan.unnormalized)} Softmax(es) feed P·V exp(s - rowmax) (unnormalized), P·V divided by the row sums")
        return ir.passes.PassResult(model, bool(self.plan.unnormalized))

    @staticmethod
    def _rewrite(graph: ir.Graph, softmax: ir.Node, pv: ir.Node, opset: int) -> None:
        scores, probs = softmax.inputs[0], softmax.outputs[0]
        prefix = softmax.name
        rowmax = _reduce_last_axis(graph, "ReduceMax", scores, f"{prefix}/rowmax", opset)
        shifted = ir.node("Sub", [scores, rowmax.outputs[0]], name=f"{prefix}/shifted")
        exp = ir.node("Exp", [shifted.outputs[0]], name=f"{prefix}/exp")
        for node in (shifted, exp):
            node.outputs[0].name = node.name
            _same_type(node.outputs[0], probs)
        rowsum = _reduce_last_axis(graph, "ReduceSum", exp.outputs[0], f"{prefix}/rowsum", opset)
        graph.insert_before(softmax, [rowmax, shifted, exp, rowsum])
        probs.replace_all_uses_with(exp.outputs[0])
        graph.remove(softmax, safe=True)
        exp.outputs[0].name = probs.name if probs.name is not None else exp.name

        product = pv.outputs[0]
        divide = ir.node("Div", [product, rowsum.outputs[0]], name=f"{pv.name}/normalize")
        _same_type(divide.outputs[0], product)
        graph.insert_after(pv, divide)
        product.replace_all_uses_with(divide.outputs[0], replace_graph_outputs=True)
        divide.replace_input_with(0, product)
        name = product.name
        product.name = f"{name}_unnormalized"
        divide.outputs[0].name = name


__all__ = ["UnnormalizedSoftmaxPass"]
