"""Weights: where a linear node's weight comes from, and its symmetric integer quantization.

A weight is a float initializer, read directly or through a Transpose (exporters write a tied
LM head as ``MatMul(x, Transpose(embedding))``, and constant folding leaves a 28M-element
Transpose alone). Either way it is quantized per channel as a constant; a Transposed weight's
channel axis is mapped back through the permutation.

Two grids: symmetric INT8 (scale = amax/127, values rounded to integers in [-127, 127]) and FP8
E4M3FN (scale = amax/448, values rounded to the nearest E4M3FN number, ties to even, saturating
at ±448), the latter exactly as ONNX ``QuantizeLinear`` to ``float8e4m3fn`` with ``saturate=1``
computes it (tested against ``onnx.reference`` and ONNX Runtime).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
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


# Largest finite FP8 E4M3FN value; the FP8 grid's "127".
FP8_MAX = 448.0
# Grid maximum per quantized weight dtype.
GRID_MAX = {"int8": 127.0, "float8e4m3fn": FP8_MAX}


def to_fp8(x: np.ndarray) -> np.ndarray:
    """Round float32 values to FP8 E4M3FN as ONNX QuantizeLinear (saturate=1) does.

    Round to nearest, ties to even (ml_dtypes' cast); values beyond ±448 saturate to ±448 (the
    cast alone would make them NaN: E4M3FN has no infinity); NaN stays NaN.
    """
    x = np.asarray(x, dtype=np.float32)
    return np.clip(x, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def quantize_weight(weight: np.ndarray, axis: int | None, dtype: str = "int8") -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization of a weight: (quantized values, float32 scale per channel or scalar).

    ``dtype`` "int8": integers in [-127, 127], scale = amax/127; "float8e4m3fn": E4M3FN values
    in [-448, 448], scale = amax/448.
    """
    if dtype not in GRID_MAX:
        raise ValueError(f"weight dtype {dtype!r} is not one of {list(GRID_MAX)}")
    w = weight.astype(np.float32)
    if axis is None:
        amax = np.asarray(np.abs(w).max(), dtype=np.float32)
    else:
        reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=reduce_axes).astype(np.float32)
    scale = np.where(amax > 0, amax / GRID_MAX[dtype], 1.0).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    scaled = w / scale.reshape(shape)
    if dtype == "float8e4m3fn":
        return to_fp8(scaled), scale
    q = np.clip(np.rint(scaled), -127, 127).astype(np.int8)
    return q, scale
