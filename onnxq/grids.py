"""Quantization grids: the one home of what INT8, UINT8 and FP8 E4M3FN values are and how a float
range maps onto them.

- INT8, symmetric: scale = amax/127, zero point 0; activations saturate to [-128, 127] as ONNX
  ``QuantizeLinear`` does, weights use the restricted range [-127, 127] (zero in the middle).
- UINT8, asymmetric: the range is widened to hold 0, scale = (max − min)/255, zero point
  ``round(−min/scale)`` in [0, 255].
- FP8 E4M3FN, symmetric: scale = amax/448; values round to the nearest E4M3FN number, ties to
  even, saturating at ±448, exactly as ONNX ``QuantizeLinear`` to ``float8e4m3fn`` with
  ``saturate=1`` computes it (tested against ``onnx.reference`` and ONNX Runtime).

A zero range (all-zero tensor or weight channel) gets scale 1.0. Every function here is what the
Q/DQ pass writes into the model and what the calibrators' and SmoothQuant's simulations compute,
so their arithmetic (operation order, dtypes) is kept exactly as it was in each of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class Grid:
    """One quantized type: its name (as in a plan), value range, and numpy / ONNX types."""

    name: str
    qmin: int | float
    qmax: int | float
    symmetric: bool
    numpy_type: type
    ir_type: ir.DataType
    # the grid value amax maps to (default qmax); values still saturate at qmin/qmax. A benchmark
    # emulating another tool's scale rule (ModelOpt's FP8: amax/36) swaps in a grid with it set.
    scale_max: float | None = None

    @property
    def steps(self) -> int | float:
        """What a range's span is divided by for the scale: amax/qmax (symmetric) or
        (max − min)/(qmax − qmin) (asymmetric)."""
        if self.symmetric:
            return self.qmax if self.scale_max is None else self.scale_max
        return self.qmax - self.qmin

    @property
    def is_float(self) -> bool:
        return self.numpy_type is ml_dtypes.float8_e4m3fn


# Largest finite FP8 E4M3FN value: the FP8 grid's "127".
FP8_MAX = 448.0

INT8 = Grid("int8", -128, 127, True, np.int8, ir.DataType.INT8)
UINT8 = Grid("uint8", 0, 255, False, np.uint8, ir.DataType.UINT8)
FP8 = Grid("float8e4m3fn", -FP8_MAX, FP8_MAX, True, ml_dtypes.float8_e4m3fn, ir.DataType.FLOAT8E4M3FN)
# INT4 (-8..7, ml_dtypes.int4) joins this table when weight-only quantization needs it.
GRIDS = {g.name: g for g in (INT8, UINT8, FP8)}
# Grids a weight can be quantized on (symmetric only: zero point 0).
WEIGHT_GRIDS = {g.name: g for g in (INT8, FP8)}


def to_fp8(x: np.ndarray) -> np.ndarray:
    """Round float32 values to FP8 E4M3FN as ONNX QuantizeLinear (saturate=1) does.

    Round to nearest, ties to even (ml_dtypes' cast); values beyond ±448 saturate to ±448 (the
    cast alone would make them NaN: E4M3FN has no infinity); NaN stays NaN.
    """
    x = np.asarray(x, dtype=np.float32)
    return np.clip(x, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def zero_point(rmin, scale, g: Grid):
    """``round(−rmin/scale)`` clipped to the grid (elementwise for arrays of candidates)."""
    return np.clip(np.rint(-rmin / scale), g.qmin, g.qmax)


def scale_zero_point(lo: float, hi: float, g: Grid) -> tuple[float, int]:
    """(scale, zero point) of the range ``[lo, hi]`` on grid ``g``; the scale unrounded (a plan
    stores it as float32, the simulations use it as it is)."""
    if g.symmetric:
        amax = max(abs(lo), abs(hi))
        return (amax / g.steps if amax > 0 else 1.0), 0
    rmin, rmax = min(lo, 0.0), max(hi, 0.0)
    scale = (rmax - rmin) / g.steps if rmax > rmin else 1.0
    return scale, int(zero_point(rmin, scale, g))


def fake_quant(x: np.ndarray, scale, zero: float, g: Grid, *, restricted: bool = False) -> np.ndarray:
    """``x`` quantized on ``g`` and dequantized (scale and zero point broadcast against ``x``).

    ``restricted``: symmetric integer values in [-qmax, qmax], as weights are quantized.
    """
    if g.is_float:
        return to_fp8(x / scale).astype(np.float32) * scale
    if g.symmetric:
        return np.clip(np.rint(x / scale), -g.qmax if restricted else g.qmin, g.qmax) * scale
    # a float64 zero point keeps the arithmetic in float64 whatever the dtype of x
    zero = np.asarray(zero, dtype=np.float64)
    return (np.clip(np.rint(x / scale) + zero, g.qmin, g.qmax) - zero) * scale


def fake_quant_range(x: np.ndarray, lo: float, hi: float, g: Grid) -> np.ndarray:
    """``x`` fake-quantized per tensor with the scale and zero point of the range ``[lo, hi]``."""
    scale, zero = scale_zero_point(lo, hi, g)
    return fake_quant(x, scale, zero, g)


def channel_scales(w: np.ndarray, axis: int | None, g: Grid) -> np.ndarray:
    """float32 symmetric scales of ``w`` (float32) per index of ``axis`` (a scalar for None):
    amax/qmax, 1.0 for an all-zero channel."""
    if axis is None:
        amax = np.asarray(np.abs(w).max(), dtype=np.float32)
    else:
        reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=reduce_axes).astype(np.float32)
    return np.where(amax > 0, amax / g.steps, 1.0).astype(np.float32)


def quantize_weight(weight: np.ndarray, axis: int | None, dtype: str = "int8") -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization of a weight: (quantized values, float32 scale per channel or scalar).

    ``dtype`` "int8": integers in [-127, 127], scale = amax/127; "float8e4m3fn": E4M3FN values
    in [-448, 448], scale = amax/448.
    """
    if dtype not in WEIGHT_GRIDS:
        raise ValueError(f"weight dtype {dtype!r} is not one of {list(WEIGHT_GRIDS)}")
    g = WEIGHT_GRIDS[dtype]
    w = weight.astype(np.float32)
    scale = channel_scales(w, axis, g)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    scaled = w / scale.reshape(shape)
    if g.is_float:
        return to_fp8(scaled), scale
    return np.clip(np.rint(scaled), -g.qmax, g.qmax).astype(g.numpy_type), scale


def fake_quant_weight(weight: np.ndarray, axis: int | None, dtype: str = "int8") -> np.ndarray:
    """``weight`` quantized per channel of ``axis`` (as :func:`quantize_weight`) and dequantized."""
    q, scale = quantize_weight(weight, axis, dtype)
    shape = [1] * q.ndim
    if axis is not None:
        shape[axis] = -1
    return q.astype(np.float32) * scale.reshape(shape)
