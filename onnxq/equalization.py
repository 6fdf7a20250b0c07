"""Cross-layer equalization decisions (Nagel et al., 2019, "Data-Free Quantization").

A pair is two linear nodes ``first → [through…] → second`` (Conv, depthwise Conv or Gemm) where
``first``'s output reaches only ``second``, through activations ``f`` with ``f(x/s) = f(x)/s`` for
``s > 0`` per channel: Relu, LeakyRelu, Identity. A Clip (ReLU6) is skipped by default
(``clips="skip"``); ``clips="rescale"`` gives it per-channel bounds (``Clip(x/s, lo/s, hi/s) =
Clip(x, lo, hi)/s``), exact in float but measured worse on EfficientNet-Lite0 (docs/equalization.md):
the per-tensor activation grid then spans the largest ``hi/s``. HardSwish, HardSigmoid, Sigmoid and
SiLU are not positive-homogeneous: no pair through them.

Dividing ``first``'s output channel ``i`` (its weight rows and bias) by ``s_i`` and multiplying
``second``'s input channel ``i`` by ``s_i`` leaves the function unchanged; ``s_i = sqrt(r1_i / r2_i)``
(``r1``: ``first``'s per-output-channel weight range, ``r2``: ``second``'s per-input-channel range)
makes both ranges ``sqrt(r1_i r2_i)``. A node in two pairs (a depthwise conv between an expand and a
project conv) moves when either pair is equalized, so the pairs are swept until no scale changes
by more than ``tolerance`` (relative); the plan keeps each pair's product of scales.

Data-free: only weights are read. The pass is :mod:`onnxq.passes.equalize`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.ops import weight_input_axis, weight_output_axis
from onnxq.plan import EqualizationPlan, EqualizedPair
from onnxq.weights import FLOAT_TYPES

HOMOGENEOUS = ("Relu", "LeakyRelu", "Identity")
CLIP_MODES = ("rescale", "skip")


@dataclass
class _Pair:
    first: ir.Node
    second: ir.Node
    through: list[ir.Node] = field(default_factory=list)


def _private_constant(value: ir.Value | None) -> bool:
    """A float initializer read by one node only (so rescaling it changes nothing else)."""
    return (
        value is not None and value.const_value is not None and value.dtype in FLOAT_TYPES
        and len(value.uses()) == 1 and not value.is_graph_input() and not value.is_graph_output()
    )


def _depthwise(node: ir.Node) -> bool:
    weight = node.inputs[1].const_value
    group = node.attributes.get_int("group", 1)
    return node.op_type == "Conv" and group > 1 and weight.shape[1] == 1 and weight.shape[0] == group


def _eligible(node: ir.Node) -> bool:
    """A Conv (ungrouped or depthwise) or Gemm with a private weight and a private 1-D bias."""
    if node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 2 or not _private_constant(node.inputs[1]):
        return False
    if node.op_type == "Conv" and node.attributes.get_int("group", 1) != 1 and not _depthwise(node):
        return False
    if node.op_type == "Gemm" and (node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0):
        return False
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and not (_private_constant(bias) and len(bias.const_value.shape) == 1):
        return False
    return node.op_type != "Gemm" or bias is None or node.attributes.get_float("beta", 1.0) == 1.0


def out_axis(node: ir.Node) -> int:
    """The weight axis of ``node``'s output channels."""
    return weight_output_axis(node)


def in_axis(node: ir.Node) -> int:
    """The weight axis of ``node``'s input channels (a depthwise conv's are its output channels)."""
    return 0 if _depthwise(node) else weight_input_axis(node)


def channel_range(array: np.ndarray, axis: int) -> np.ndarray:
    """max |w| per index of ``axis``."""
    return np.abs(np.moveaxis(array, axis, 0)).reshape(array.shape[axis], -1).max(axis=1)


def _only_consumer(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if value.is_graph_output() or len(uses) != 1:
        return None
    node, index = uses[0]
    return node if index == 0 else None


def _clip_ok(node: ir.Node) -> bool:
    bounds = [v for v in node.inputs[1:] if v is not None]
    return all(v.const_value is not None for v in bounds) and not node.attributes


def _pair_from(first: ir.Node, clips: str) -> _Pair | None:
    """The pair ``first`` starts, if its output reaches one eligible linear node."""
    through: list[ir.Node] = []
    node = _only_consumer(first.outputs[0])
    while node is not None and node.op_type in (*HOMOGENEOUS, "Clip") and node.domain in ("", "ai.onnx"):
        if node.op_type == "Clip" and (clips == "skip" or not _clip_ok(node)):
            return None
        through.append(node)
        node = _only_consumer(node.outputs[0])
    if node is None or not _eligible(node) or node.op_type == "Gemm" and len(node.inputs[0].shape or []) != 2:
        return None
    w1, w2 = first.inputs[1].const_value, node.inputs[1].const_value
    if w1.shape[out_axis(first)] != w2.shape[in_axis(node)]:
        return None
    return _Pair(first, node, through)


def find_pairs(model: ir.Model, clips: str = "skip") -> list[_Pair]:
    """Every equalizable pair, in graph order (float ones too: the rewrite is exact, and a node
    kept in float still moves its partner's ranges)."""
    pairs = []
    for node in model.graph:
        if _eligible(node):
            pair = _pair_from(node, clips)
            if pair is not None:
                pairs.append(pair)
    return pairs


def _scale_axis(array: np.ndarray, axis: int, factor: np.ndarray) -> np.ndarray:
    shape = [1] * array.ndim
    shape[axis] = -1
    return array * factor.reshape(shape)


def equalize_weights(pairs: list[_Pair], max_iterations: int = 100, tolerance: float = 1e-4) -> tuple[list[np.ndarray], int]:
    """Each pair's product of scales, swept until convergence, and the number of sweeps."""
    weights = {}
    for p in pairs:
        for node in (p.first, p.second):
            weights.setdefault(node.name, node.inputs[1].const_value.numpy().astype(np.float64))
    scales = [np.ones(weights[p.first.name].shape[out_axis(p.first)]) for p in pairs]
    for sweep in range(1, max_iterations + 1):
        change = 0.0
        for k, p in enumerate(pairs):
            w1, w2 = weights[p.first.name], weights[p.second.name]
            r1, r2 = channel_range(w1, out_axis(p.first)), channel_range(w2, in_axis(p.second))
            alive = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[alive] = np.sqrt(r1[alive] / r2[alive])
            weights[p.first.name] = _scale_axis(w1, out_axis(p.first), 1.0 / s)
            weights[p.second.name] = _scale_axis(weights[p.second.name], in_axis(p.second), s)
            scales[k] *= s
            change = max(change, float(np.abs(np.log(s)).max(initial=0.0)))
        if change < tolerance:
            return scales, sweep
    return scales, max_iterations


def plan_equalization(model: ir.Model, clips: str = "skip", max_iterations: int = 100) -> EqualizationPlan:
    """The equalization decisions for ``model`` (data-free): pairs and their scales."""
    pairs = find_pairs(model, clips)
    scales, sweeps = equalize_weights(pairs, max_iterations) if pairs else ([], 0)
    return EqualizationPlan(
        iterations=sweeps,
        clips=clips,
        pairs=[
            EqualizedPair(p.first.name, p.second.name, [t.name for t in p.through], [float(v) for v in s.astype(np.float32)])
            for p, s in zip(pairs, scales)
        ],
    )
