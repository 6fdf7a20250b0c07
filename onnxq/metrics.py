"""Accuracy metrics: the one home of cosine similarity, SNR, Spearman's rank correlation and the
per-output accuracy accumulator that ``check``, ``quantize``, the sensitivity sweep and the solver
report.

Per output (:class:`OutputAccuracy`): mean and minimum per-sample cosine similarity, SNR in dB over
all samples (10·log10(Σref² / Σ(ref−cand)²)), the maximum absolute error, the maximum relative
error (elementwise ``|cand−ref| / |ref|`` over elements with ``|ref| ≥ 1e-3·max|ref|``), a
fixed-bin histogram of log10 |cand−ref|, and, for classifier-shaped outputs (a float output whose
name says logits/probabilities/scores and whose last axis has ≥ 10 classes), top-1 agreement
(argmax equal) and top-5 agreement (the reference's argmax among the candidate's five largest), per
row of the last axis.

Two figures keep one scale from hiding an error: ``worst_slice_snr_db``, the lowest SNR among the
slices of each non-batch axis of at most 1024 entries (a YOLO output [1, 84, N] that concatenates
box coordinates in pixels with class scores in 0–1 has its scores on axis 1: their SNR shows even
when the boxes dominate the whole output's SNR), with ``worst_slice`` naming it; and a note for
outputs of one value per sample, whose per-sample cosine is 1 whenever the signs agree (read the
SNR and the maximum error there).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from onnxq.errors import OnnxqError

# log10 |error| histogram: fixed edges, so it merges across samples in any order
ERROR_HIST_EDGES = np.arange(-8.0, 3.01, 0.25)
_CLASSIFIER_NAME = re.compile(r"logit|prob|score|class", re.IGNORECASE)
_REL_FLOOR = 1e-3
MAX_SLICES = 1024  # axes longer than this are spatial or sequence axes, not a list of quantities
NONFINITE_NOTE = "samples with NaN or infinity in an output are counted (nonfinite_reference, nonfinite_candidate) and left out of every metric"
SINGLE_VALUE_NOTE = "one value per sample: per-sample cosine is 1 whenever the signs agree; judge by SNR and max abs error"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened, in float64: 1.0 when both are zero (or equal
    with a zero norm), 0.0 when only one is."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    if denom > 0:
        return float(a @ b) / denom
    return 1.0 if np.array_equal(a, b) else 0.0


def snr_db(signal: float, noise: float) -> float:
    """10·log10(signal / noise) from sums of squares: +inf without noise, -inf without signal."""
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def is_classifier_output(name: str, array: np.ndarray) -> bool:
    return (
        array.dtype.kind == "f" and array.ndim >= 1 and array.shape[-1] >= 10
        and bool(_CLASSIFIER_NAME.search(name))
    )


@dataclass
class OutputAccuracy:
    name: str
    samples: int = 0
    cosine_mean: float = 0.0
    cosine_min: float = 1.0
    snr_db: float = math.inf
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    worst_slice_snr_db: float | None = None
    worst_slice: str | None = None
    notes: list[str] = field(default_factory=list)
    # samples left out of every metric: the reference itself non-finite (the data's doing), or only
    # the candidate (the quantized model's doing: an accuracy threshold fails on it)
    nonfinite_reference: int = 0
    nonfinite_candidate: int = 0
    _signal: float = 0.0
    _slice_sums: dict = field(default_factory=dict)  # axis -> (signal per index, noise per index)
    _noise: float = 0.0
    _cos_sum: float = 0.0
    _rows: int = 0
    _top1: int = 0
    _top5: int = 0
    # counts per ERROR_HIST_EDGES bin, plus [exact zero, below the first edge, above the last]
    _hist: np.ndarray = field(default_factory=lambda: np.zeros(len(ERROR_HIST_EDGES) + 2, np.int64))

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref = np.asarray(ref)
        cand = np.asarray(cand)
        if ref.shape != cand.shape:
            raise OnnxqError(f"output {self.name!r}: the candidate's shape {list(cand.shape)} differs from the reference's {list(ref.shape)}")
        if self._skipped_nonfinite(ref, cand):
            return
        r = ref.astype(np.float64).ravel()
        c = cand.astype(np.float64).ravel()
        diff = r - c
        self._signal += float(r @ r)
        self._noise += float(diff @ diff)
        cos = cosine(r, c)
        self._cos_sum += cos
        self.samples += 1
        self.cosine_min = min(self.cosine_min, cos)
        self.cosine_mean = self._cos_sum / self.samples
        abs_err = np.abs(diff)
        if abs_err.size:
            self.max_abs_error = max(self.max_abs_error, float(abs_err.max()))
            mag = np.abs(r)
            keep = mag >= _REL_FLOOR * float(mag.max()) if mag.max() > 0 else np.zeros_like(mag, bool)
            if keep.any():
                self.max_rel_error = max(self.max_rel_error, float((abs_err[keep] / mag[keep]).max()))
            self._add_histogram(abs_err)
        self.snr_db = snr_db(self._signal, self._noise)
        self._update_slices(ref.astype(np.float64), diff.reshape(ref.shape))
        if ref.size == 1 and SINGLE_VALUE_NOTE not in self.notes:
            self.notes.append(SINGLE_VALUE_NOTE)
        if is_classifier_output(self.name, ref):
            self._update_topk(ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1]))

    def _skipped_nonfinite(self, ref: np.ndarray, cand: np.ndarray) -> bool:
        """A sample with a NaN or infinity in either output is counted, not measured: one NaN
        would make every mean and sum NaN."""
        if ref.dtype.kind not in "fc" or (np.isfinite(ref).all() and np.isfinite(cand).all()):
            return False
        if not np.isfinite(ref).all():
            self.nonfinite_reference += 1
        else:
            self.nonfinite_candidate += 1
        note = NONFINITE_NOTE
        if note not in self.notes:
            self.notes.append(note)
        return True

    def _update_slices(self, ref: np.ndarray, diff: np.ndarray) -> None:
        """Per-index sums of squares along every non-batch axis of 2..MAX_SLICES entries; the
        worst slice's SNR (slices without signal are skipped)."""
        worst = None
        for axis in range(1, ref.ndim):
            if not 2 <= ref.shape[axis] <= MAX_SLICES:
                continue
            others = tuple(a for a in range(ref.ndim) if a != axis)
            sig, noise = (ref * ref).sum(axis=others), (diff * diff).sum(axis=others)
            if axis in self._slice_sums and self._slice_sums[axis][0].shape == sig.shape:
                sig, noise = sig + self._slice_sums[axis][0], noise + self._slice_sums[axis][1]
            self._slice_sums[axis] = (sig, noise)
            live = np.flatnonzero(sig > 0)
            if not live.size:
                continue
            with np.errstate(divide="ignore"):
                ratios = sig[live] / noise[live]  # inf without noise
            index = int(live[np.argmin(ratios)])
            value = snr_db(float(sig[index]), float(noise[index]))
            if worst is None or value < worst[0]:
                worst = (value, f"axis {axis} index {index}")
        if worst is not None:
            self.worst_slice_snr_db, self.worst_slice = worst

    def _add_histogram(self, abs_err: np.ndarray) -> None:
        nz = abs_err[abs_err > 0]
        self._hist[-3] += abs_err.size - nz.size
        logs = np.log10(nz)
        self._hist[-2] += int((logs < ERROR_HIST_EDGES[0]).sum())
        self._hist[-1] += int((logs >= ERROR_HIST_EDGES[-1]).sum())
        counts, _ = np.histogram(logs, bins=ERROR_HIST_EDGES)
        self._hist[: len(counts)] += counts

    def _update_topk(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref_top = ref.argmax(-1)
        k = min(5, cand.shape[-1])
        cand_top5 = np.argpartition(-cand, k - 1, axis=-1)[:, :k]
        self._rows += ref.shape[0]
        self._top1 += int((cand.argmax(-1) == ref_top).sum())
        self._top5 += int((cand_top5 == ref_top[:, None]).any(-1).sum())
        self.top1_agreement = self._top1 / self._rows
        self.top5_agreement = self._top5 / self._rows

    def error_histogram(self) -> dict:
        """Counts of log10 |cand−ref| per bin (``edges`` has one more entry than ``counts``)."""
        h = self._hist
        return {
            "log10_edges": [round(float(e), 3) for e in ERROR_HIST_EDGES],
            "counts": [int(x) for x in h[: len(ERROR_HIST_EDGES) - 1]],
            "exact": int(h[-3]),
            "below": int(h[-2]),
            "above": int(h[-1]),
        }

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        for k, v in d.items():
            if isinstance(v, float) and math.isinf(v):
                d[k] = "inf" if v > 0 else "-inf"
            elif isinstance(v, float) and math.isnan(v):
                d[k] = None  # JSON has no NaN
        if self.samples == 0 and self.nonfinite_reference + self.nonfinite_candidate:
            for k in ("cosine_mean", "cosine_min", "snr_db", "max_abs_error", "max_rel_error"):
                d[k] = None  # no finite sample: nothing was measured
        if not self.nonfinite_reference + self.nonfinite_candidate:
            del d["nonfinite_reference"], d["nonfinite_candidate"]
        if d["top1_agreement"] is None:
            del d["top1_agreement"], d["top5_agreement"]
        if d["worst_slice_snr_db"] is None:
            del d["worst_slice_snr_db"], d["worst_slice"]
        if not d["notes"]:
            del d["notes"]
        return d



def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):  # ties share their mean rank
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get mean ranks); None for fewer than 3 pairs."""
    a = np.clip(np.asarray(x, dtype=np.float64), -1e9, 1e9)
    b = np.clip(np.asarray(y, dtype=np.float64), -1e9, 1e9)
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])
