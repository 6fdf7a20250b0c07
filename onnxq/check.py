"""Accuracy of a candidate model against a reference, both run by ONNX Runtime on the same data.

Per output: mean and minimum per-sample cosine similarity, SNR in dB over all samples
(10·log10(Σref² / Σ(ref−cand)²)), and the maximum absolute error. Statistics are accumulated
sample by sample, so memory does not grow with the data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from onnxq.progress import progress_bar
from onnxq.runtime import ort as ort_rt


@dataclass
class OutputAccuracy:
    name: str
    samples: int = 0
    cosine_mean: float = 0.0
    cosine_min: float = 1.0
    snr_db: float = math.inf
    max_abs_error: float = 0.0
    _signal: float = 0.0
    _noise: float = 0.0
    _cos_sum: float = 0.0

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        r = ref.astype(np.float64).ravel()
        c = cand.astype(np.float64).ravel()
        diff = r - c
        self._signal += float(r @ r)
        self._noise += float(diff @ diff)
        denom = float(np.linalg.norm(r) * np.linalg.norm(c))
        cos = float(r @ c) / denom if denom > 0 else (1.0 if not diff.any() else 0.0)
        self._cos_sum += cos
        self.samples += 1
        self.cosine_min = min(self.cosine_min, cos)
        self.cosine_mean = self._cos_sum / self.samples
        self.max_abs_error = max(self.max_abs_error, float(np.abs(diff).max()) if diff.size else 0.0)
        if self._noise == 0:
            self.snr_db = math.inf
        elif self._signal == 0:
            self.snr_db = -math.inf
        else:
            self.snr_db = 10 * math.log10(self._signal / self._noise)

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        for k, v in d.items():
            if isinstance(v, float) and math.isinf(v):
                d[k] = "inf" if v > 0 else "-inf"
        return d


def compare(reference, candidate, data: Iterable[dict[str, np.ndarray]], *, progress: bool = True) -> list[OutputAccuracy]:
    """Run reference and candidate (paths, ir.Models or sessions) on every feed of ``data``."""
    ref = reference if hasattr(reference, "run") else ort_rt.create_session(reference)
    cand = candidate if hasattr(candidate, "run") else ort_rt.create_session(candidate)
    names = [o.name for o in ref.get_outputs()]
    cand_names = [o.name for o in cand.get_outputs()]
    if cand_names != names:
        from onnxq.errors import OnnxqError

        raise OnnxqError(f"the candidate's outputs {cand_names} differ from the reference's {names}")
    results = [OutputAccuracy(n) for n in names]
    total = len(data) if hasattr(data, "__len__") and len(data) else None
    bar = progress_bar(total, "evaluating", enabled=progress)
    with bar:
        for feed in data:
            for acc, r, c in zip(results, ort_rt.run(ref, feed), ort_rt.run(cand, feed)):
                acc.update(r, c)
            bar.update(1)
    return results


def format_table(results: list[OutputAccuracy], title: str) -> str:
    lines = [title, f"  {'output':<24} {'cosine(mean)':>12} {'cosine(min)':>12} {'SNR dB':>8} {'max|err|':>10}"]
    for r in results:
        lines.append(
            f"  {r.name[:24]:<24} {r.cosine_mean:>12.6f} {r.cosine_min:>12.6f} {r.snr_db:>8.2f} {r.max_abs_error:>10.4g}"
        )
    return "\n".join(lines)
