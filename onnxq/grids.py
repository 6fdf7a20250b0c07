"""Quantization grids: the one home of what INT8, UINT8 and FP8 E4M3FN values are and how a float
range maps onto them.

- INT8, symmetric: scale = amax/127, zero point 0; activations saturate to [-128, 127] as ONNX
  ``QuantizeLinear`` does, weights use the restricted range [-127, 127] (zero in the middle).
- UINT8, asymmetric: the range is widened to hold 0, scale = (max − min)/255, zero point
  ``round(−min/scale)`` in [0, 255].
- INT4 / UINT4 (weight-only, blocked): as INT8 / UINT8 with qmax 7 / 15, one scale (and zero
  point) per block of ``block`` consecutive values along the reduction axis
  (:func:`quantize_blocked`); ONNX packs two values per byte, low nibble first (onnx_ir does it).
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
# INT4 weights (weight-only): symmetric scale amax/7 (values in [-7, 7]; TensorRT's and ModelOpt's
# rule), or asymmetric UINT4 with a zero point (ORT's MatMulNBits form).
INT4 = Grid("int4", -8, 7, True, ml_dtypes.int4, ir.DataType.INT4)
UINT4 = Grid("uint4", 0, 15, False, ml_dtypes.uint4, ir.DataType.UINT4)
GRIDS = {g.name: g for g in (INT8, UINT8, FP8, INT4, UINT4)}
# Grids an activation can be quantized on (4-bit grids are for weight-only blocks).
ACTIVATION_GRIDS = {g.name: g for g in (INT8, UINT8, FP8)}
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


def quantize_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """A bias as int32 at ``scale`` (activation scale × weight scale per output channel: the grid
    of the integer accumulator it is added to, as ORT's QGemm/QLinearConv read it); a zero scale
    (an all-zero weight channel) gives 0."""
    b = np.asarray(bias, dtype=np.float64)
    s = np.broadcast_to(np.asarray(scale, dtype=np.float64), b.shape)
    q = np.divide(b, s, out=np.zeros_like(b), where=s > 0)
    info = np.iinfo(np.int32)
    return np.clip(np.rint(q), info.min, info.max).astype(np.int32)


def fake_quant_weight(weight: np.ndarray, axis: int | None, dtype: str = "int8") -> np.ndarray:
    """``weight`` quantized per channel of ``axis`` (as :func:`quantize_weight`) and dequantized."""
    q, scale = quantize_weight(weight, axis, dtype)
    shape = [1] * q.ndim
    if axis is not None:
        shape[axis] = -1
    return q.astype(np.float32) * scale.reshape(shape)


# --- blocked (weight-only) quantization --------------------------------------------------------

# Range factors a weight block may be clipped to (AWQ's clip search: 1 down to 0.55 in steps of
# 0.05, its reference's n_grid 20 and max_shrink 0.5); plans store indices into this tuple.
CLIP_RATIOS = tuple(1.0 - i / 20 for i in range(10))


def _blocks(w: np.ndarray, axis: int, block: int) -> np.ndarray:
    """``w`` (float32) as ``[blocks, block, rest]`` along ``axis``, zero-padded to whole blocks
    (zeros widen no symmetric range, and asymmetric ranges hold 0 anyway)."""
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    n_blocks = -(-moved.shape[0] // block)
    padded = np.zeros((n_blocks * block, moved.shape[1]), dtype=np.float32)
    padded[: moved.shape[0]] = moved
    return padded.reshape(n_blocks, block, -1)


def _unblock(params: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """``[blocks, rest]`` parameters back in the weight's layout, ``blocks`` on ``axis``."""
    moved_shape = (params.shape[0], *[d for i, d in enumerate(shape) if i != axis])
    return np.moveaxis(params.reshape(moved_shape), 0, axis)


def blocked_params(w: np.ndarray, axis: int, block: int, g: Grid, clip: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """float32 scales and zero points (``g``'s integers, as float) of ``w`` per block of ``block``
    values along ``axis``, laid out like ``w`` with ``ceil(K/block)`` on ``axis`` (what a blocked
    DequantizeLinear reads). ``clip``: a factor (scalar or ``[blocks, rest]``) on each block's
    range (AWQ's clip search); 1.0 is round-to-nearest on the full range."""
    blocks = _blocks(np.asarray(w, dtype=np.float32), axis, block)
    if g.symmetric:
        amax = np.abs(blocks).max(axis=1) * clip
        scale = np.where(amax > 0, amax / g.steps, 1.0).astype(np.float32)
        zero = np.zeros_like(scale)
    else:
        lo = np.minimum(blocks.min(axis=1), 0.0) * clip
        hi = np.maximum(blocks.max(axis=1), 0.0) * clip
        scale = np.where(hi > lo, (hi - lo) / g.steps, 1.0).astype(np.float32)
        zero = np.clip(np.rint(-lo / scale), g.qmin, g.qmax).astype(np.float32)
    return _unblock(scale, w.shape, axis), _unblock(zero, w.shape, axis)


def _expand(params: np.ndarray, axis: int, block: int, size: int) -> np.ndarray:
    return np.repeat(params, block, axis=axis).take(np.arange(size), axis=axis)


def quantize_blocked(w: np.ndarray, axis: int, block: int, g: Grid, clip: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values of ``g``'s numpy type, float32 scales, zero points of ``g``'s type) of ``w``
    quantized per block (:func:`blocked_params`); symmetric grids use [-qmax, qmax]."""
    w = np.asarray(w, dtype=np.float32)
    scale, zero = blocked_params(w, axis, block, g, clip)
    size = w.shape[axis]
    lowest = -g.qmax if g.symmetric else g.qmin
    q = np.clip(np.rint(w / _expand(scale, axis, block, size)) + _expand(zero, axis, block, size), lowest, g.qmax)
    return q.astype(g.numpy_type), scale, zero.astype(g.numpy_type)


def dequantize_blocked(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int, block: int) -> np.ndarray:
    """What a blocked DequantizeLinear computes: ``(q − zero) · scale`` in float32 per block."""
    size = q.shape[axis]
    centred = q.astype(np.int32) - _expand(zero.astype(np.int32), axis, block, size)
    return centred.astype(np.float32) * _expand(scale, axis, block, size)


def fake_quant_blocked(w: np.ndarray, axis: int, block: int, g: Grid, clip: np.ndarray | float = 1.0) -> np.ndarray:
    """``w`` quantized per block and dequantized, exactly as the emitted model computes it."""
    q, scale, zero = quantize_blocked(w, axis, block, g, clip)
    return dequantize_blocked(q, scale, zero, axis, block)
