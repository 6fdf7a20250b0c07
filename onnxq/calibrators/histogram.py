"""A fixed-size, mergeable histogram of one tensor's values.

The histogram is signed and symmetric: ``BINS`` (4096) equal bins over ``[-R, R]``, where ``R`` is
the smallest power of two not below the largest ``|x|`` seen so far. Zero is a bin edge (index
``BINS // 2``), so the ``|x|`` histogram (2048 bins over ``[0, R]``) is exactly
``hist[2048:] + hist[:2048][::-1]``; since ``R < 2 * amax``, that is between 1024 and 2048 bins
over ``[0, amax]``.

When a batch brings a larger ``|x|``, ``R`` grows by a power-of-two factor ``2**k`` and every
``2**k`` neighbouring bins merge into one. Merging is exact (no count moves to a wrong bin), no
sample is kept, and because ``R`` depends only on the largest ``|x|``, the final histogram does
not depend on how the data was split into batches or in which order they came.

Large tensors are histogrammed on a subsample (:meth:`Histogram.update_sampled`): of each sample,
every element at least ``TAIL_FRACTION`` of that sample's largest ``|x|`` is counted (rare large
values, a transformer's outlier channels and attention-sink tokens, decide the clipping methods'
ranges: counted on a stride alone, MiniLM's FP8 mse ranges clipped a LayerNorm output from 28.5
to 10.3 and its embedding cosine fell from 0.997 to 0.961), and of the rest every ``s``-th element
(:func:`sample_elements`, at most ``SAMPLE_ELEMENTS`` positions, a prime stride that depends only
on the sample's size) counted ``s`` times. Both depend only on the sample, so the histogram still
does not depend on the batch split. The range (the largest ``|x|``) stays exact.
"""

from __future__ import annotations

import functools
import math

import numpy as np

BINS = 4096
HALF = BINS // 2
# Elements of one sample a histogram counts at most: counting (~5-10 ns per element) was the
# largest cost of calibration on CNNs. 32768 evenly spread elements per sample put a bin holding
# 1% of a tensor within ~0.06% (binomial error) of its share in that sample, and samples add up.
SAMPLE_ELEMENTS = 1 << 15
# Elements at least this fraction of their sample's largest |x| are always counted, one by one.
TAIL_FRACTION = 0.25


@functools.lru_cache(maxsize=256)
def _stride(per_sample: int, cap: int) -> int:
    """The smallest prime ``s`` with ``ceil(per_sample / s) <= cap`` that does not divide
    ``per_sample``: coprime to every axis length, so ``x.flat[::s]`` walks through every row,
    column and channel position evenly instead of aliasing with the layout."""
    s = max(2, -(-per_sample // cap))
    while per_sample % s == 0 or any(s % d == 0 for d in range(2, math.isqrt(s) + 1)):
        s += 1
    return s


def _strided(x: np.ndarray, samples: int, cap: int) -> tuple[np.ndarray, int]:
    """(every ``s``-th element of each sample of ``x``, ``s``); (``x``, 1) when ``x`` is counted
    whole (:func:`sample_elements`)."""
    if x.ndim == 0 or samples < 1 or x.shape[0] % samples or x.size // samples <= cap:
        return x, 1
    rows = x.reshape(samples, -1)
    stride = _stride(rows.shape[1], cap)
    return rows[:, ::stride], stride


def sample_elements(x: np.ndarray, samples: int, cap: int | None = None) -> np.ndarray:
    """The elements of ``x`` (a batch of ``samples`` samples along axis 0) a histogram counts:
    all of them when a sample has at most ``cap`` elements, else every ``s``-th element of each
    sample (:func:`_stride`; a view, no copy). The positions depend only on the sample's size, so
    the histogram does not depend on the batch split. A tensor whose leading axis is not a
    multiple of ``samples`` is counted whole."""
    return _strided(np.asarray(x), samples, SAMPLE_ELEMENTS if cap is None else cap)[0]


def range_for(amax: float) -> float:
    """The histogram half-range for a largest ``|x|`` of ``amax``: a power of two ≥ amax (0 for 0)."""
    if not amax > 0 or not math.isfinite(amax):
        return 0.0
    m, e = math.frexp(amax)  # amax = m * 2**e, 0.5 <= m < 1
    return math.ldexp(1.0, e - 1) if m == 0.5 else math.ldexp(1.0, e)


def _tail(rows: np.ndarray) -> np.ndarray:
    """Where ``|x| >= TAIL_FRACTION`` times the largest ``|x|`` of its row (a sample): two
    comparisons per element against the row's threshold, no ``abs`` copy of the batch (row by row
    with a scalar threshold: twice as fast as broadcasting a column of thresholds)."""
    largest = np.maximum(rows.max(axis=1), -rows.min(axis=1))
    tail = np.empty(rows.shape, dtype=bool)
    below = np.empty(rows.shape[1], dtype=bool)
    for row, out, threshold in zip(rows, tail, TAIL_FRACTION * largest):
        np.greater_equal(row, threshold, out=out)
        out |= np.less_equal(row, -threshold, out=below)
    return tail


class Histogram:
    """Counts of one tensor's values in ``BINS`` bins over ``[-range, range]``.

    While every value seen is exactly zero, ``range`` is 0 and the zeros are counted in
    ``zeros``; they move into the bin starting at 0 once a non-zero value arrives.
    """

    __slots__ = ("counts", "range", "zeros")

    def __init__(self) -> None:
        self.counts = np.zeros(BINS, dtype=np.int64)
        self.range = 0.0
        self.zeros = 0

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self.zeros

    @property
    def width(self) -> float:
        return 2.0 * self.range / BINS

    def edges(self) -> np.ndarray:
        return np.linspace(-self.range, self.range, BINS + 1)

    def _grow(self, new_range: float) -> None:
        if self.range == 0.0:
            self.range = new_range
            if self.zeros:
                self.counts[HALF] += self.zeros
                self.zeros = 0
            return
        k = round(math.log2(new_range / self.range))
        if k <= 0:
            return
        if k >= 12:  # every old bin lands in one of the two bins around zero
            neg = int(self.counts[:HALF].sum())
            pos = int(self.counts[HALF:].sum())
            self.counts[:] = 0
            self.counts[HALF - 1] = neg
            self.counts[HALF] = pos
        else:
            # old bin j covers [-R + j w, ...); in new bins of width w 2**k it is bin
            # (j + HALF (2**k - 1)) >> k, exactly.
            index = (np.arange(BINS) + HALF * ((1 << k) - 1)) >> k
            self.counts = np.bincount(index, weights=self.counts, minlength=BINS).astype(np.int64)
        self.range = new_range

    def update_sampled(self, x: np.ndarray, samples: int, amax: float) -> None:
        """Add ``x`` (a batch of ``samples`` samples along axis 0, largest ``|x|`` ``amax``) as
        its subsample: every element of a sample at least ``TAIL_FRACTION`` of the sample's
        largest ``|x|``, and every ``s``-th of the others counted ``s`` times (module docstring)."""
        x = np.asarray(x)
        sampled, stride = _strided(x, samples, SAMPLE_ELEMENTS)
        if stride == 1 or range_for(amax) == 0.0:
            self.update(x, amax)
            return
        rows = x.reshape(samples, -1)
        tail = _tail(rows)
        self.update(rows[tail], amax)
        self.update(sampled[~tail[:, ::stride]], amax, weight=stride)

    def update(self, x: np.ndarray, amax: float | None = None, weight: int = 1) -> None:
        """Add every element of ``x`` (``amax``: its largest ``|x|`` if already known), each
        counted ``weight`` times."""
        x = np.asarray(x)
        if x.size == 0:
            return
        if amax is None:
            amax = float(np.max(np.abs(x)))
        new_range = range_for(amax)
        if new_range == 0.0:
            if self.range == 0.0:
                self.zeros += x.size * weight
            else:
                self.counts[HALF] += x.size * weight
            return
        if new_range > self.range:
            self._grow(new_range)
        flat = x.reshape(-1)
        if flat.dtype != np.float32 and flat.dtype != np.float64:
            flat = flat.astype(np.float32)
        # bins of width R/HALF: index = floor(x * HALF / R) + HALF; HALF / R is a power of two,
        # so the product is exact and the floor lands on the right side of every edge.
        scaled = flat * np.array(HALF / self.range, dtype=flat.dtype)
        np.floor(scaled, out=scaled)
        scaled += np.array(HALF, dtype=flat.dtype)  # integers below 2**24: exact
        # in [0, BINS]: no clip pass; x == R lands in bin BINS, folded into the last bin
        counts = np.bincount(scaled.astype(np.intp), minlength=BINS + 1)
        counts[BINS - 1] += counts[BINS]
        self.counts += counts[:BINS] * weight

    def merge(self, other: Histogram) -> None:
        """Add another histogram's counts (exact)."""
        other_copy = Histogram()
        other_copy.counts, other_copy.range, other_copy.zeros = other.counts.copy(), other.range, other.zeros
        target = max(self.range, other_copy.range)
        if target > 0:
            if self.range < target:
                self._grow(target)
            if other_copy.range < target:
                other_copy._grow(target)
        self.counts += other_copy.counts
        self.zeros += other_copy.zeros

    def abs_counts(self) -> np.ndarray:
        """The histogram of ``|x|``: ``HALF`` bins over ``[0, range]``."""
        out = self.counts[HALF:] + self.counts[:HALF][::-1]
        out = out.copy()
        out[0] += self.zeros
        return out

    # --- JSON: counts between the first and last non-zero bin -----------------------------------
    def to_json(self) -> dict:
        nz = np.flatnonzero(self.counts)
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)
        return {"range": self.range, "zeros": self.zeros, "offset": lo, "counts": self.counts[lo:hi].tolist()}

    @classmethod
    def from_json(cls, data: dict) -> Histogram:
        h = cls()
        h.range = float(data["range"])
        h.zeros = int(data.get("zeros", 0))
        counts = np.asarray(data["counts"], dtype=np.int64)
        offset = int(data["offset"])
        if counts.ndim != 1 or offset < 0 or offset + counts.size > BINS or (counts < 0).any():
            raise ValueError("histogram counts do not fit its bins")
        if h.range < 0 or not math.isfinite(h.range) or (h.range > 0 and range_for(h.range) != h.range):
            raise ValueError(f"histogram range {h.range} is not a power of two")
        h.counts[offset : offset + counts.size] = counts
        return h
