"""Rotate a decoder's residual stream, as a :class:`onnxq.plan.RotationPlan` says.

Rule, for the orthogonal ``Q`` the plan regenerates (:func:`onnxq.rotation.rotation_matrix`):

- each embedding Gather's table ``E`` becomes ``E·Q``;
- each writer MatMul's weight ``W`` (``[K, hidden]`` as the node reads it) becomes ``W·Q``, its
  bias ``b·Q``;
- each norm's per-channel weight γ goes into its readers, whose weights ``W`` (``[hidden, N]``)
  become ``Qᵀ·diag(γ)·W``, and γ becomes 1.

The residual stream then carries ``r·Q``; RMSNorm over the full hidden axis has the same
statistic (``‖r·Q‖ = ‖r‖``), so every reader's output and the logits are unchanged in float.
Products are computed in float64 and stored in the weight's own dtype. A constant read by another
node too (a tied embedding and LM head) is not changed in place: the node gets a rotated copy, as
the node reads it (no Transpose). With ``online`` writers (the MLP down projections), each one's
input goes through ``Reshape → MatMul(H_b/√b) → Reshape`` (a block-diagonal Hadamard, blocks of
``online_block``) and its weight rows are rotated by the transpose. With a per-head rotation
``H`` (``plan.head``), each value projection's output columns are rotated head by head
(``W·blockdiag(H)``, its bias too) and each output projection's input rows by the transpose
(``blockdiag(H)ᵀ·W``): attention's ``P·(V·H) = (P·V)·H`` and the head moves between carry the
rotated heads whole, so ``o_proj``'s output is unchanged. The pass decides nothing.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.errors import PlanError
from onnxq.passes.initializers import add_initializer, constant_as_read, drop_unused_initializers, replace_constant
from onnxq.plan import HeadRotation, RotationPlan
from onnxq.rotation import block_hadamard, rotation_matrix


class RotatePass(ir.passes.InPlacePass):
    def __init__(self, plan: RotationPlan):
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._graph = model.graph
        by_name = {node.name: node for node in model.graph}
        q = rotation_matrix(self.plan)

        def node(name: str) -> ir.Node:
            if name not in by_name:
                raise PlanError(f"the rotation plan names node {name!r}, which the model does not have; was the plan made for another model?")
            return by_name[name]

        for name in self.plan.embeddings:
            self._rewrite(node(name), 0, lambda table: table @ q)
        for name in self.plan.writers:
            self._rewrite(node(name), 1, lambda w: w @ q)
        for name in self.plan.biases:
            add = node(name)
            index = 0 if add.inputs[0] is not None and add.inputs[0].const_value is not None else 1
            self._rewrite(add, index, lambda b: (b.reshape(-1) @ q).reshape(b.shape))
        for norm in self.plan.norms:
            gamma = np.ones(self.plan.size)
            if norm.scale_node is not None:
                scale = node(norm.scale_node)
                gamma = constant_as_read(scale, norm.scale_input, "the rotation").reshape(-1).astype(np.float64)
                self._rewrite(scale, norm.scale_input, np.ones_like)
            for reader in norm.readers:
                self._rewrite(node(reader), 1, lambda w, gamma=gamma: q.T @ (gamma[:, None] * w))
        for name in self.plan.online:
            self._rotate_online(node(name))
        if self.plan.head is not None:
            self._rotate_heads(self.plan.head, node)
        drop_unused_initializers(self._graph)
        return ir.passes.PassResult(model, True)

    def _rotate_online(self, node: ir.Node) -> None:
        """``x → Reshape(.., W/b, b) → MatMul(H_b/√b) → Reshape(.., W)`` before ``node``, whose
        weight becomes ``blockdiag(H_b/√b)ᵀ·W``: ``x·blockdiag·blockdiagᵀ·W = x·W``."""
        block = self.plan.online_block
        h = block_hadamard(block)
        self._rewrite(node, 1, lambda w: np.einsum("ji,kjn->kin", h, w.reshape(-1, block, w.shape[-1])).reshape(w.shape))
        x = node.inputs[0]
        width = constant_as_read(node, 1, "the rotation").shape[0]
        keep = [0] * (len(x.shape) - 1)  # Reshape's 0: the dimension as it is
        dtype = np.float16 if x.dtype == ir.DataType.FLOAT16 else np.float32
        prefix = f"{node.name}_online_rotation"
        split = ir.node("Reshape", [x, add_initializer(self._graph, f"{prefix}_blocks", np.array([*keep, width // block, block], dtype=np.int64))], name=f"{prefix}_split")
        matmul = ir.node("MatMul", [split.outputs[0], add_initializer(self._graph, f"{prefix}_hadamard", h.astype(dtype))], name=f"{prefix}_matmul")
        merge = ir.node("Reshape", [matmul.outputs[0], add_initializer(self._graph, f"{prefix}_width", np.array([*keep, width], dtype=np.int64))], name=f"{prefix}_merge")
        for new, suffix in ((split, "blocks"), (matmul, "rotated_blocks"), (merge, "rotated")):
            new.outputs[0].name = f"{x.name}_{suffix}"
            new.outputs[0].dtype = x.dtype
        merge.outputs[0].shape = x.shape
        self._graph.insert_before(node, [split, matmul, merge])
        node.replace_input_with(0, merge.outputs[0])

    def _rotate_heads(self, head: HeadRotation, node) -> None:
        """Values' columns ``·blockdiag(H)``, output projections' rows ``blockdiag(H)ᵀ·``."""
        h, d = rotation_matrix(head), head.size

        def columns(w: np.ndarray) -> np.ndarray:
            return np.einsum("...kj,ji->...ki", w.reshape(*w.shape[:-1], -1, d), h).reshape(w.shape)

        for name in head.values:
            self._rewrite(node(name), 1, columns, d)
        for name in head.value_biases:
            add = node(name)
            self._rewrite(add, 0 if add.inputs[0] is not None and add.inputs[0].const_value is not None else 1, columns, d)
        for name in head.outputs:
            self._rewrite(node(name), 1, lambda w: np.einsum("ji,kjn->kin", h, w.reshape(-1, d, w.shape[-1])).reshape(w.shape), d)
        for name in head.scores:
            self._rotate_scores(node(name), h)

    def _rotate_scores(self, scores: ir.Node, h: np.ndarray) -> None:
        """``Q·Kᵀ → (Q·H)·(Hᵀ·Kᵀ)``: an inserted MatMul on each input (float, not quantized)."""
        q, k = scores.inputs[0], scores.inputs[1]
        dtype = np.float16 if q.dtype == ir.DataType.FLOAT16 else np.float32
        prefix = f"{scores.name}_online_rotation"
        rotate_q = ir.node("MatMul", [q, add_initializer(self._graph, f"{prefix}_query", h.astype(dtype))], name=f"{prefix}_query")
        rotate_k = ir.node("MatMul", [add_initializer(self._graph, f"{prefix}_key", np.ascontiguousarray(h.T).astype(dtype)), k], name=f"{prefix}_key")
        for new, value in ((rotate_q, q), (rotate_k, k)):
            new.outputs[0].name, new.outputs[0].dtype, new.outputs[0].shape = f"{value.name}_rotated", value.dtype, value.shape
        self._graph.insert_before(scores, [rotate_q, rotate_k])
        scores.replace_input_with(0, rotate_q.outputs[0])
        scores.replace_input_with(1, rotate_k.outputs[0])

    def _rewrite(self, node: ir.Node, index: int, rotate, block: int | None = None) -> None:
        """Input ``index`` of ``node`` becomes ``rotate(it)`` (float64 math, its own dtype); its
        first or last dimension is the rotation's size (or, with ``block``, a multiple of it)."""
        array = constant_as_read(node, index, "the rotation")
        fits = (array.shape[0] % block == 0 or array.shape[-1] % block == 0) if block else self.plan.size in (array.shape[0], array.shape[-1])
        if not fits:
            raise PlanError(f"input {index} of {node.name!r} has shape {list(array.shape)}, which does not fit a rotation of size {block or self.plan.size}")
        rotated = np.ascontiguousarray(rotate(array.astype(np.float64)).astype(array.dtype))
        replace_constant(self._graph, node, index, rotated, "rotated")
