"""Weights: where a linear node's weight comes from, and its symmetric integer quantization.

A weight is a float initializer, read directly or through a Transpose (exporters write a tied
LM head as ``MatMul(x, Transpose(embedding))``, and constant folding leaves a 28M-element
Transpose alone). Either way it is quantized per channel as a constant; a Transposed weight's
channel axis is mapped back through the permutation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

# Float types onnxq quantizes (weights and activations).
FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


@dataclass
class WeightSource:
    initializer: ir.Value
    transpose: ir.Node | None = None  # the Transpose between the initializer and the node

    def initializer_axis(self, axis: int | None, rank: int) -> int | None:
        """Map a channel axis of the weight as the node sees it onto the initializer."""
        if axis is None:
            return None
        axis %= rank
        if self.transpose is None:
            return axis
        perm = self.transpose.attributes.get_ints("perm", list(range(rank))[::-1])
        return perm[axis]


def weight_source(value: ir.Value | None) -> WeightSource | None:
    """The float initializer behind ``value`` (directly or via one Transpose), or None."""
    if value is None or value.dtype not in FLOAT_TYPES:
        return None
    if value.const_value is not None:
        return WeightSource(value)
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.domain in ("", "ai.onnx"):
        src = producer.inputs[0]
        if src is not None and src.const_value is not None and src.dtype in FLOAT_TYPES:
            return WeightSource(src, producer)
    return None


def quantize_weight(weight: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 quantization: (values in [-127, 127], scale per channel or scalar)."""
    w = weight.astype(np.float32)
    if axis is None:
        amax = np.asarray(np.abs(w).max(), dtype=np.float32)
    else:
        reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=reduce_axes).astype(np.float32)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale
