"""Where FP16 high precision stops: the nodes an FP16 plan keeps in FP32, with the reason.

Decided on the graph with its Q/DQ in place (the last decision before the FP16 casts), written
into ``plan.fp32_nodes``, executed by :class:`~onnxq.passes.cast_fp16.CastFloat16Pass`.

Kept in FP32 (:func:`fp32_nodes`), because they overflow or lose accuracy in FP16 (measured with
ONNX Runtime on the zoo models, docs/precisions.md):

- normalisation reductions: ``LayerNormalization`` / ``GroupNormalization`` /
  ``InstanceNormalization``, and the RMSNorm pattern ``Pow → ReduceMean → Add(eps) → Sqrt →
  Reciprocal`` (the mean of squares of a residual stream overflows FP16's 65504 early);
- ``Softmax`` / ``LogSoftmax`` and the element-wise chain producing their input (scale, mask
  ``Add``/``Where``) back to the MatMul: masks use values like -3.4e38;
- ``Sin`` / ``Cos`` and every float node their argument depends on (rotary embeddings: an angle
  of position × frequency near 100 keeps only ~0.06 resolution in FP16);
- nodes reading a float constant with finite values beyond FP16's range;
- a QuantizeLinear/DequantizeLinear whose scale is not an FP16 normal number;
- where measured ranges are given (``ranges``: tensor -> largest |value| in FP32 on the
  calibration data), the producer and every reader of a tensor whose largest value exceeds
  half of FP16's 65504 (the margin covers data beyond the calibration set).

Ops whose float type comes from an attribute or a fixed-type input (``Cast``, ``Resize``, random
ops, ...) and nodes with subgraphs are never converted: that is what the pass can express, not a
decision (:func:`convertible`).
"""

from __future__ import annotations

__all__ = ["convertible", "float_tensor_names", "fp32_nodes", "OVERFLOW_LIMIT"]

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxq.patterns import norm_statistics

FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal
_DEFAULT = ("", "ai.onnx")
FP16_QDQ_MIN_OPSET = 19

# Ops whose float types are fixed by an attribute or an input that must stay FP32.
_NOT_CONVERTIBLE = {
    "Cast", "CastLike", "ConstantOfShape", "Range", "Resize", "Upsample", "RandomNormal",
    "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "EyeLike",
    "Constant", "If", "Loop", "Scan",
}
_NORM_OPS = {"LayerNormalization", "GroupNormalization", "InstanceNormalization"}
_SOFTMAX_OPS = {"Softmax", "LogSoftmax"}
_TRIG_OPS = {"Sin", "Cos"}
# Element-wise ops between an attention MatMul and its Softmax (scaling, masking).
_SCORE_CHAIN = {"Add", "Sub", "Mul", "Div", "Where", "Neg", "Max", "Min", "Clip", "Tanh"}


def _default(node: ir.Node) -> bool:
    return node.domain in _DEFAULT


def _float_values(node: ir.Node) -> list[ir.Value]:
    return [v for v in (*node.inputs, *node.outputs) if v is not None and v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)]


def convertible(node: ir.Node) -> bool:
    if not _default(node) or node.op_type in _NOT_CONVERTIBLE:
        return False
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
        return False
    floats = _float_values(node)
    return bool(floats) and all(v.dtype == ir.DataType.FLOAT for v in floats)


def _overflowing_constant(node: ir.Node) -> bool:
    for v in node.inputs:
        if v is None or v.const_value is None or v.dtype != ir.DataType.FLOAT:
            continue
        a = v.const_value.numpy()
        finite = a[np.isfinite(a)]
        if finite.size and float(np.abs(finite).max()) > FP16_MAX:
            return True
    return False


def _scale_fits(node: ir.Node) -> bool:
    """A Q/DQ's scale (input 1) is a constant of FP16 normal numbers."""
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    if scale is None or scale.const_value is None:
        return False
    s = np.abs(scale.const_value.numpy().astype(np.float64))
    return bool(((s >= FP16_TINY) & (s <= FP16_MAX)).all())


# A tensor whose measured largest |value| exceeds this stays FP32 (producer and readers).
OVERFLOW_LIMIT = FP16_MAX / 2


def float_tensor_names(graph: ir.Graph) -> list[str]:
    """Every FP32 tensor a node of the main graph produces: what ``ranges`` may cover."""
    return [o.name for n in graph for o in n.outputs if o.name and o.dtype == ir.DataType.FLOAT]


def fp32_nodes(graph: ir.Graph, ranges: Mapping[str, float] | None = None) -> dict[str, str]:
    """The nodes the rules keep in FP32, by name, with the reason (see the module docstring)."""
    keep: dict[str, str] = {}

    def add(node: ir.Node, reason: str) -> None:
        keep.setdefault(node.name, reason)

    for node in graph:
        for out in node.outputs:
            amax = (ranges or {}).get(out.name)
            if amax is not None and not amax <= OVERFLOW_LIMIT:
                reason = f"{out.name} reaches {amax:.4g} on the calibration data (FP16 max 65504)"
                add(node, reason)
                for use in out.uses():
                    add(use.node, reason)

    for stat in norm_statistics(graph):
        for node, reason in zip(stat.nodes, ("RMSNorm: square", "RMSNorm: mean of squares", "RMSNorm: after the mean of squares", "RMSNorm: after the mean of squares")):
            add(node, reason)
        if stat.reciprocal is not None:
            add(stat.reciprocal, "RMSNorm: after the mean of squares")
    for node in graph:
        op = node.op_type
        if not _default(node):
            continue
        if op in _NORM_OPS:
            add(node, "normalisation reduction")
        elif op in _SOFTMAX_OPS:
            add(node, "softmax")
            todo, seen = [node.inputs[0]], set()
            while todo:
                v = todo.pop()
                p = v.producer() if v is not None else None
                if p is None or p.op_type not in _SCORE_CHAIN or id(p) in seen:
                    continue
                seen.add(id(p))
                add(p, f"input chain of softmax {node.name}")
                todo.extend(p.inputs)
        elif op in _TRIG_OPS:
            add(node, "rotary angle")
            todo, seen = list(node.inputs), set()
            while todo:
                v = todo.pop()
                p = v.producer() if v is not None else None
                if p is None or id(p) in seen or not any(o.dtype == ir.DataType.FLOAT for o in p.outputs):
                    continue
                seen.add(id(p))
                add(p, f"argument of {op} {node.name}")
                todo.extend(p.inputs)
        if _overflowing_constant(node):
            add(node, "reads a constant beyond FP16's range")
        if op in ("QuantizeLinear", "DequantizeLinear") and not _scale_fits(node):
            add(node, "Q/DQ scale is not an FP16 normal number")
    return keep


