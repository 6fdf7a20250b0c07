"""Fold cross-layer equalization scales into the graph, as an :class:`onnxq.plan.EqualizationPlan` says.

Rule: for every pair (``first``, ``through``, ``second``, per-channel ``s > 0``):

- ``first``'s weight is divided by ``s`` along its output-channel axis, its bias by ``s``;
- ``second``'s weight is multiplied by ``s`` along its input-channel axis (a depthwise conv's
  axis 0);
- a ``Clip(x, lo, hi)`` in ``through`` becomes ``Min(Max(x, lo/s), hi/s)`` with per-channel
  bounds, under the Clip's output name (Relu, LeakyRelu and Identity commute with ``s``).

The float model computes the same function. The pass decides nothing: pairs and scales come from
the plan (:func:`onnxq.equalization.plan_equalization`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.equalization import in_axis, out_axis
from onnxq.errors import PlanError
from onnxq.passes.initializers import add_initializer
from onnxq.plan import EqualizationPlan, EqualizedPair


def _rescale(value: ir.Value, axis: int, factor: np.ndarray) -> None:
    array = value.const_value.numpy()
    shape = [1] * array.ndim
    shape[axis] = -1
    scaled = np.ascontiguousarray((array * factor.reshape(shape).astype(array.dtype)).astype(array.dtype))
    value.const_value = ir.tensor(scaled, name=value.name)


class EqualizePass(ir.passes.InPlacePass):
    def __init__(self, plan: EqualizationPlan):
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._graph = model.graph
        by_name = {node.name: node for node in model.graph}
        for pair in self.plan.pairs:
            missing = [n for n in (pair.first, pair.second, *pair.through) if n not in by_name]
            if missing:
                raise PlanError(f"the equalization plan names node {missing[0]!r}, which the model does not have")
            self._fold(pair, by_name)
        for name in [n for n, v in self._graph.initializers.items() if not v.uses() and not v.is_graph_input() and not v.is_graph_output()]:
            self._graph.initializers.pop(name)  # bounds of removed Clips
        return ir.passes.PassResult(model, bool(self.plan.pairs))

    def _fold(self, pair: EqualizedPair, by_name: dict[str, ir.Node]) -> None:
        s = np.asarray(pair.scale, dtype=np.float32)
        first, second = by_name[pair.first], by_name[pair.second]
        _rescale(first.inputs[1], out_axis(first), 1.0 / s)
        if len(first.inputs) > 2 and first.inputs[2] is not None:
            _rescale(first.inputs[2], 0, 1.0 / s)
        _rescale(second.inputs[1], in_axis(second), s)
        rank = len(first.inputs[1].const_value.shape) if first.op_type == "Conv" else 2
        for name in pair.through:
            if by_name[name].op_type == "Clip":
                self._per_channel_clip(by_name[name], s, rank)

    def _per_channel_clip(self, clip: ir.Node, s: np.ndarray, rank: int) -> None:
        """``Clip(x, lo, hi)`` → ``Min(Max(x, lo/s), hi/s)``, channels on axis 1 of a rank-``rank`` tensor."""
        x, out = clip.inputs[0], clip.outputs[0]
        dtype = np.float16 if out.dtype == ir.DataType.FLOAT16 else np.float32
        current, nodes = x, []
        for op, bound in (("Max", clip.inputs[1] if len(clip.inputs) > 1 else None), ("Min", clip.inputs[2] if len(clip.inputs) > 2 else None)):
            if bound is None:
                continue
            per_channel = (float(bound.const_value.numpy().reshape(())) / s).astype(dtype).reshape((-1,) + (1,) * (rank - 2))
            const = add_initializer(self._graph, f"{clip.name}_{op.lower()}_per_channel", per_channel)
            node = ir.node(op, [current, const], name=f"{clip.name}_{op}")
            node.outputs[0].name = f"{clip.name}_{op.lower()}_out"
            node.outputs[0].dtype, node.outputs[0].shape = out.dtype, out.shape
            nodes.append(node)
            current = node.outputs[0]
        if not nodes:
            return
        self._graph.insert_after(clip, nodes)
        ir.convenience.replace_all_uses_with(out, current, replace_graph_outputs=True)
        name = out.name
        out.name = f"{name}_clipped_before_equalization"
        current.name = name
        self._graph.remove(clip, safe=True)
