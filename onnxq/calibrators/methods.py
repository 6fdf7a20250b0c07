"""Range methods: turn one tensor's statistics (min, max, histogram) into a quantization range.

Every method returns ``(lo, hi)`` with ``min <= lo <= hi <= max`` (clipping never widens a range);
Q/DQ parameters follow from it (:func:`onnxq.grids.scale_zero_point`): the symmetric INT8
grid of the ``tensorrt`` target uses ``max(|lo|, |hi|)``, the asymmetric UINT8 grid of the ``ort``
target uses ``[min(lo, 0), max(hi, 0)]``.

- ``minmax``: ``(min, max)``.
- ``percentile`` (``p``, default 99.99): symmetric: clip ``|x|`` at its ``p``-th percentile (the
  upper edge of the histogram bin where the cumulative share reaches ``p``%). Asymmetric: cut
  ``(100 - p) / 2`` % from each tail of ``x``; a tensor of one sign (e.g. after ReLU or Softmax)
  has all ``(100 - p)`` % cut from its far tail.
- ``entropy``: TensorRT's KL-divergence threshold search (Migacz, GTC 2017; pytorch-quantization's
  ``_compute_amax_entropy``) over the zero-centred windows ONNX Runtime uses
  (``HistogramCollector.get_entropy_threshold``): for each window, p is the window with the
  counts outside it folded into its end bins, q is the window merged into the target grid's
  levels and spread back over the non-zero bins of p, and the window with the smallest KL(p||q)
  wins. onnxq runs it on its 4096-bin signed histogram (2048 bins per side) with 256 quantized
  bins (128 levels per side: the INT8 grid), every candidate at once with prefix sums.
  ORT builds q differently (``L // n`` bins per level with the ``L % n`` left-over bins given
  q = 0, q spread over empty bins and truncated to integers, then both smoothed); that moves
  its threshold on a Gaussian with a few outliers from 4.3 sigma to 6-10 sigma.
  :func:`entropy_window` with ``ort_exact=True`` reproduces ORT's computation step by step and
  returns ORT's threshold on the same histogram (tested at 2048 bins / 128 quantized bins), so
  the two differ only in how q is built. The asymmetric target gets the window clipped to
  ``[min, max]``, as in ORT.
- ``mse``: the range minimising the squared quantization error of the histogram (bin centres
  fake-quantized on the target grid, weighted by their counts). Symmetric: a search over the
  clip value ``T`` (every bin edge from 128 bins up). Asymmetric: a search over one shrink factor
  ``a`` in ``[1/8, 1]`` applied to both ends, range ``[a min(min,0), a max(max,0)]``. Both
  searches go coarse to fine (every 8th candidate, then around the 8 best), which finds the
  exhaustive search's minimum, or one of equal error, at a fifth of its cost.

FP8 (``grid="fp8"``, E4M3FN, symmetric, scale = T/448): ``minmax`` and ``percentile`` give the
clip value as above; ``mse`` searches the clip value ``T`` with the bin centres fake-quantized on
the FP8 grid itself (rounded to the nearest E4M3FN value after scaling, saturating at 448), so
its range is FP8's own optimum, not an INT8 range rescaled; ``entropy`` is defined by the INT8
grid's 128 levels per side and is refused for FP8.

A tensor whose values are all zero (zero range) gets ``(0, 0)`` from every method; Q/DQ then uses
scale 1.0.
"""

from __future__ import annotations

import numpy as np

from onnxq import grids
from onnxq.calibrators.histogram import BINS, HALF, Histogram
from onnxq.errors import OnnxqError

METHODS = ("minmax", "percentile", "entropy", "mse")
# Default range method per target, chosen from the zoo accuracy numbers (README, "Calibration methods").
DEFAULT_METHOD = {"tensorrt": "mse", "ort": "mse"}
HISTOGRAM_METHODS = ("percentile", "entropy", "mse")
DEFAULT_PERCENTILE = 99.99
# Quantized bins for the entropy search.
ENTROPY_QUANTIZED_BINS = 256
MSE_START_BIN = 128
# The mse search: every MSE_COARSE_STEP-th clip value, then the neighbourhoods of the MSE_REFINE
# best (1: exhaustive).
MSE_COARSE_STEP = 8
MSE_REFINE = 8
ENTROPY_ORT_EXACT = False
# MSE on the FP8 grid: points per histogram bin, and clip values tried.
FP8_BIN_POINTS = 4
FP8_CANDIDATES = 256


class CalibrationMethodError(OnnxqError):
    """An unknown method name or a bad method parameter."""


def check_method(method: str) -> str:
    if method not in METHODS:
        raise CalibrationMethodError(f"unknown calibration method {method!r}; choose one of {list(METHODS)}")
    return method


def check_percentile(percentile: float) -> float:
    try:
        p = float(percentile)
    except (TypeError, ValueError):
        raise CalibrationMethodError(f"percentile must be a number in (0, 100], got {percentile!r}") from None
    if not 0.0 < p <= 100.0:
        raise CalibrationMethodError(f"percentile must be in (0, 100], got {p}; e.g. 99.99")
    return p


# --------------------------------------------------------------------------------------------
# entropy: ORT's get_entropy_threshold, step by step, without Python loops over bins
# --------------------------------------------------------------------------------------------
def _smooth_distribution(p: np.ndarray, eps: float = 0.0001) -> np.ndarray | None:
    # onnxruntime.quantization.quant_utils.smooth_distribution, same operations and dtypes
    is_zeros = (p == 0).astype(np.float32)
    is_nonzeros = (p != 0).astype(np.float32)
    n_zeros = is_zeros.sum()
    n_nonzeros = p.size - n_zeros
    if not n_nonzeros:
        return None
    eps1 = eps * float(n_zeros) / float(n_nonzeros)
    hist = p.astype(np.float32)
    hist += eps * is_zeros + (-eps1) * is_nonzeros
    return hist


def _kl(pk: np.ndarray, qk: np.ndarray) -> np.float32:
    # onnxruntime.quantization.calibrate.entropy (rel_entr summed), same operations and dtypes
    pk = np.asarray(pk).astype(np.float32)
    pk = 1.0 * pk / np.sum(pk, axis=0, keepdims=True)
    qk = np.asarray(qk).astype(np.float32)
    qk = 1.0 * qk / np.sum(qk, axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        res = pk * np.log(pk / qk)
    res[(pk == 0) & (qk >= 0)] = 0
    res[~((pk > 0) & (qk > 0))] = np.inf
    return np.sum(res, axis=0).astype(np.float32)


def _xlogx(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def _entropy_window_tensorrt(hist: np.ndarray, n: int) -> tuple[int, int]:
    """TensorRT's KL search over ORT's zero-centred windows, every candidate at once.

    For window ``[s, e)`` of ``L`` bins: p is the window with the counts outside it added to its
    end bins; bin ``j`` belongs to level ``j * n // L``; q spreads each level's in-window count
    evenly over the level's bins where p is non-zero; KL(p || q) of the normalised
    distributions, without smoothing (a candidate with q = 0 where p > 0 is rejected), as
    pytorch-quantization's ``_compute_amax_entropy``. With prefix sums (of counts, of non-zero
    bins and of ``h log h``) each candidate costs O(n), not O(L).
    """
    hist = np.asarray(hist, dtype=np.int64)
    num_bins = hist.size
    zero, half = num_bins // 2, n // 2
    i = np.arange(half, zero + 1)
    s = zero - i
    e = np.minimum(zero + i + 1, num_bins)
    size = e - s
    h = hist.astype(np.float64)
    csum = np.concatenate([[0.0], np.cumsum(h)])
    nzsum = np.concatenate([[0], np.cumsum(hist > 0)])
    xlsum = np.concatenate([[0.0], np.cumsum(_xlogx(h))])
    total = csum[-1]
    left, right = csum[s], total - csum[e]
    k = np.arange(n + 1)
    first = s[:, None] + (k[None, :] * size[:, None] + n - 1) // n  # level k starts at ceil(k L / n)
    q_sum = csum[first[:, 1:]] - csum[first[:, :-1]]
    nz = (nzsum[first[:, 1:]] - nzsum[first[:, :-1]]).astype(np.float64)
    h0, h1 = h[s], h[e - 1]
    p0, p1 = h0 + left, h1 + right
    nz[:, 0] += (h0 == 0) & (p0 > 0)
    nz[:, -1] += (h1 == 0) & (p1 > 0)
    p_sum = q_sum.copy()
    p_sum[:, 0] += left
    p_sum[:, -1] += right
    plogp = xlsum[e] - xlsum[s] - _xlogx(h0) - _xlogx(h1) + _xlogx(p0) + _xlogx(p1)
    ok = (q_sum > 0) & (nz > 0)
    cross = np.where(ok, p_sum * np.log(np.where(ok, q_sum / np.where(nz > 0, nz, 1.0), 1.0)), 0.0).sum(axis=1)
    rejected = ((p_sum > 0) & ~ok).any(axis=1)
    in_window = csum[e] - csum[s]
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = (plogp - cross) / total - np.log(total) + np.log(in_window)
    kl[rejected | ~(in_window > 0)] = np.inf
    best = int(np.argmin(kl))
    return int(s[best]), int(e[best])


def entropy_window(hist: np.ndarray, num_quantized_bins: int, *, ort_exact: bool = True) -> tuple[int, int]:
    """Bin indices ``(start, end)`` of the window with the smallest KL divergence.

    ``hist`` is a signed histogram whose centre bin ``len(hist) // 2`` starts at zero; the
    candidate windows are ``[c - i, c + i + 1)`` for ``i`` from ``num_quantized_bins // 2`` to
    ``c`` — ORT's ``get_entropy_threshold``. With ``ort_exact`` the KL is computed exactly as
    ORT computes it, defects included: ``L // n`` bins per level with the ``L % n`` left-over
    bins given q = 0, q spread over empty bins too and truncated to integers, then both smoothed.
    Without it, the KL is TensorRT's (:func:`_entropy_window_tensorrt`).
    """
    if not ort_exact:
        return _entropy_window_tensorrt(hist, num_quantized_bins)
    hist = np.asarray(hist, dtype=np.int64)
    num_bins = hist.size
    zero = num_bins // 2
    half_q = num_quantized_bins // 2
    if zero < half_q:
        raise CalibrationMethodError(f"the entropy search needs at least {num_quantized_bins} bins, the histogram has {num_bins}")
    csum = np.concatenate([[0], np.cumsum(hist)])
    total = int(csum[-1])
    best = (np.inf, zero - half_q, min(zero + half_q + 1, num_bins))
    for i in range(half_q, zero + 1):
        start = zero - i
        end = min(zero + i + 1, num_bins)
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += csum[start]
        p[-1] += total - csum[end]
        nonzeros = p != 0
        merged = sliced.size // num_quantized_bins
        cut = num_quantized_bins * merged
        quantized = sliced[:cut].reshape(num_quantized_bins, merged).sum(axis=1)
        quantized[-1] += sliced[cut:].sum()
        norm = nonzeros[:cut].reshape(num_quantized_bins, merged).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            per_bin = np.where(norm != 0, quantized / np.maximum(norm, 1), 0.0).astype(np.int64)
        q = np.zeros(p.size, dtype=np.int64)
        q[:cut] = np.repeat(per_bin, merged)
        ps, qs = _smooth_distribution(p), _smooth_distribution(q)
        div = np.float32(np.inf) if ps is None or qs is None else _kl(ps, qs)
        if div < best[0]:
            best = (div, start, end)
    return best[1], best[2]


def entropy_threshold(
    hist: np.ndarray, edges: np.ndarray, lo: float, hi: float, num_quantized_bins: int, *, ort_exact: bool = True
) -> tuple[float, float]:
    """The entropy threshold for a signed histogram (``edges``: its bin edges), clipped to [lo, hi]."""
    start, end = entropy_window(hist, num_quantized_bins, ort_exact=ort_exact)
    return max(float(edges[start]), lo), min(float(edges[end]), hi)


# --------------------------------------------------------------------------------------------
def _zero_range(lo: float, hi: float) -> bool:
    return not (hi > lo) and max(abs(lo), abs(hi)) == 0.0


def _clip(lo: float, hi: float, t_lo: float, t_hi: float) -> tuple[float, float]:
    a, b = max(lo, t_lo), min(hi, t_hi)
    if b < a:  # a constant tensor: keep its value
        a = b = hi if abs(hi) >= abs(lo) else lo
    return float(a), float(b)


def _percentile(h: Histogram, lo: float, hi: float, symmetric: bool, p: float) -> tuple[float, float]:
    if symmetric:
        counts = h.abs_counts()
        cdf = np.cumsum(counts) / counts.sum()
        idx = int(np.searchsorted(cdf, p / 100.0))
        t = min(idx + 1, HALF) * h.width
        return _clip(lo, hi, -t, t)
    counts = h.counts.copy()
    counts[HALF] += h.zeros
    cdf = np.cumsum(counts) / counts.sum()
    edges = h.edges()
    tail = (100.0 - p) / 100.0
    if lo >= 0:
        left, right = 0.0, tail
    elif hi <= 0:
        left, right = tail, 0.0
    else:
        left = right = tail / 2
    t_lo = float(edges[int(np.searchsorted(cdf, left, side="right"))]) if left > 0 else lo
    t_hi = float(edges[min(int(np.searchsorted(cdf, 1.0 - right)) + 1, BINS)]) if right > 0 else hi
    return _clip(lo, hi, t_lo, t_hi)


def _trimmed(h: Histogram) -> tuple[np.ndarray, np.ndarray]:
    """The signed histogram cut to the smallest zero-centred window holding every count."""
    counts = h.counts.copy()
    counts[HALF] += h.zeros
    nz = np.flatnonzero(counts)
    half = max(HALF - int(nz[0]), int(nz[-1]) + 1 - HALF, ENTROPY_QUANTIZED_BINS // 2)
    edges = h.edges()
    return counts[HALF - half : HALF + half], edges[HALF - half : HALF + half + 1]


def _entropy(h: Histogram, lo: float, hi: float) -> tuple[float, float]:
    counts, edges = _trimmed(h)
    t_lo, t_hi = entropy_threshold(counts, edges, lo, hi, ENTROPY_QUANTIZED_BINS, ort_exact=ENTROPY_ORT_EXACT)
    return _clip(lo, hi, t_lo, t_hi)


def _fake_quant(centres: np.ndarray, thresholds: np.ndarray, grid: str) -> np.ndarray:
    """``centres`` fake-quantized at each clip value (rows) on the symmetric INT8 or FP8 grid."""
    g = grids.FP8 if grid == "fp8" else grids.INT8
    return grids.fake_quant(centres[None, :], thresholds[:, None] / g.steps, 0, g, restricted=True)


def _chunked_errors(centres: np.ndarray, counts: np.ndarray, candidates: np.ndarray, fake_quant) -> np.ndarray:
    """The count-weighted squared error of ``centres`` under ``fake_quant(centres, chunk)`` for
    each candidate, in chunks of at most ~2M evaluations."""
    chunk_size = max(1, (1 << 21) // max(1, centres.size))
    errs = [((centres[None, :] - fake_quant(centres, chunk)) ** 2) @ counts for chunk in np.array_split(candidates, max(1, -(-candidates.size // chunk_size)))]
    return np.concatenate(errs) if errs else np.zeros(0)


def _argmin_coarse_to_fine(candidates: np.ndarray, errors) -> int:
    """Index of the candidate with the smallest ``errors(candidates)`` (first of equals), looked
    for coarse to fine: every ``MSE_COARSE_STEP``-th candidate first, then every candidate within
    one coarse step of the ``MSE_REFINE`` best coarse ones. The error is smooth in the clip value
    up to rounding ripples a few bins wide, so the refined minimum is the exhaustive one or one of
    equal error (tests/test_calibrators.py compares with the exhaustive search)."""
    n, step = candidates.size, MSE_COARSE_STEP
    if n <= 4 * step:
        return int(np.argmin(errors(candidates)))
    coarse = np.unique(np.append(np.arange(0, n, step), n - 1))
    coarse_err = errors(candidates[coarse])
    best = coarse[np.argsort(coarse_err, kind="stable")[:MSE_REFINE]]
    fine = np.unique(np.concatenate([np.arange(max(0, b - step + 1), min(n, b + step)) for b in best]))
    return int(fine[int(np.argmin(errors(candidates[fine])))])


def _mse(h: Histogram, lo: float, hi: float, symmetric: bool, grid: str = "int8") -> tuple[float, float]:
    w = h.width
    if symmetric:
        counts = h.abs_counts().astype(np.float64)
        last = int(np.flatnonzero(counts)[-1]) + 1
        amax = max(abs(lo), abs(hi))
        cands = np.arange(min(MSE_START_BIN, last), last + 1) * w
        cands = np.unique(np.minimum(cands, amax))
        nz = np.flatnonzero(counts[:last])  # empty bins add no error
        if grid == "fp8":
            # FP8's steps near zero are finer than a bin: one centre per bin misjudges the
            # rounding error there, so each non-empty bin is spread over FP8_BIN_POINTS points.
            # Its error is smooth in T away from saturation: FP8_CANDIDATES clip values suffice.
            offsets = (np.arange(FP8_BIN_POINTS) + 0.5) / FP8_BIN_POINTS
            centres = ((nz[:, None] + offsets[None, :]) * w).ravel()
            counts = np.repeat(counts[nz] / FP8_BIN_POINTS, FP8_BIN_POINTS)
            if cands.size > FP8_CANDIDATES:
                cands = cands[np.unique(np.linspace(0, cands.size - 1, FP8_CANDIDATES).round().astype(int))]
        else:
            centres, counts = (nz + 0.5) * w, counts[nz]
        best = _argmin_coarse_to_fine(cands, lambda c: _chunked_errors(centres, counts, c, lambda x, t: _fake_quant(x, t, grid)))
        best_t = float(cands[best])
        return _clip(lo, hi, -best_t, best_t)
    counts = h.counts.astype(np.float64)
    counts[HALF] += h.zeros
    nz = np.flatnonzero(counts)
    centres, counts = (nz - HALF + 0.5) * w, counts[nz]
    rmin, rmax = min(lo, 0.0), max(hi, 0.0)
    alphas = np.arange(64, 513) / 512.0

    def fake_quant(x, chunk):
        s = (chunk * (rmax - rmin) / grids.UINT8.steps)[:, None]
        zp = grids.zero_point(chunk[:, None] * rmin, s, grids.UINT8)
        return grids.fake_quant(x[None, :], s, zp, grids.UINT8)

    best_a = float(alphas[_argmin_coarse_to_fine(alphas, lambda c: _chunked_errors(centres, counts, c, fake_quant))])
    return _clip(lo, hi, best_a * rmin, best_a * rmax)


def compute_range(
    lo: float,
    hi: float,
    histogram: Histogram | None,
    method: str,
    *,
    symmetric: bool,
    percentile: float = DEFAULT_PERCENTILE,
    name: str = "tensor",
    grid: str = "int8",
) -> tuple[float, float]:
    """The quantization range of one tensor (see the module docstring).

    ``grid``: "int8" (symmetric INT8 or asymmetric UINT8, per ``symmetric``) or "fp8" (E4M3FN,
    symmetric only).
    """
    check_method(method)
    if grid not in ("int8", "fp8"):
        raise CalibrationMethodError(f"grid {grid!r} is not one of ['int8', 'fp8']")
    if grid == "fp8":
        if not symmetric:
            raise CalibrationMethodError("the FP8 grid is symmetric only (zero point 0)")
        if method == "entropy":
            raise CalibrationMethodError(
                f"method 'entropy' is defined on the INT8 grid; for FP8 tensors ({name!r}) use mse (FP8's own grid) or minmax"
            )
    lo, hi = float(lo), float(hi)
    if method == "minmax" or _zero_range(lo, hi):
        return (0.0, 0.0) if _zero_range(lo, hi) else (lo, hi)
    if histogram is None or histogram.total == 0:
        raise CalibrationMethodError(
            f"method {method!r} needs a histogram of {name!r}, which this calibration did not collect; "
            "recalibrate (onnxq calibrate, or quantize --calib) with this method"
        )
    if histogram.range == 0.0:
        return (0.0, 0.0)
    if method == "percentile":
        return _percentile(histogram, lo, hi, symmetric, check_percentile(percentile))
    if method == "entropy":
        return _entropy(histogram, lo, hi)
    return _mse(histogram, lo, hi, symmetric, grid)
