"""Per-output metrics that one scale cannot dominate (fast tier)."""

import numpy as np

from onnxq.check import format_table
from onnxq.metrics import SINGLE_VALUE_NOTE, OutputAccuracy


def test_a_bad_part_of_a_concatenated_output_shows_in_the_worst_slice_snr():
    """A YOLO-like output [1, 6, N]: 4 box rows in pixels (0–320) and 2 score rows (0–1); noise
    that is small for the boxes but large for the scores."""
    rng = np.random.default_rng(0)
    acc = OutputAccuracy("output0")
    for _ in range(4):
        ref = np.concatenate([rng.uniform(0, 320, (1, 4, 500)), rng.uniform(0, 1, (1, 2, 500))], axis=1).astype(np.float32)
        cand = ref + rng.normal(0, 0.3, ref.shape).astype(np.float32)
        acc.update(ref, cand)
    assert acc.snr_db > 45 and acc.cosine_mean > 0.999  # the boxes dominate the whole
    scores_snr = 10 * np.log10(1 / 3 / 0.09)  # E[u²] for u~U(0,1) over the noise power
    assert abs(acc.worst_slice_snr_db - scores_snr) < 1.0
    assert acc.worst_slice in ("axis 1 index 4", "axis 1 index 5")
    assert "worst_slice_snr_db" in acc.to_json()
    assert "axis 1 index" in format_table([acc], "t")


def test_a_one_value_output_carries_a_note_instead_of_a_silent_cosine_of_one():
    acc = OutputAccuracy("prob")
    for ref, cand in [(0.9, 0.5), (0.2, 0.6)]:
        acc.update(np.array([[ref]], np.float32), np.array([[cand]], np.float32))
    assert acc.cosine_mean == 1.0  # what per-sample cosine says about a scalar
    assert acc.snr_db < 5 and acc.notes == [SINGLE_VALUE_NOTE]
    assert acc.to_json()["notes"] == [SINGLE_VALUE_NOTE]
    assert "note: prob: one value per sample" in format_table([acc], "t")


def test_outputs_without_short_axes_report_no_slices():
    acc = OutputAccuracy("hidden")
    x = np.random.default_rng(1).normal(size=(1, 2000)).astype(np.float32)
    acc.update(x, x * 1.01)
    assert acc.worst_slice_snr_db is None and "worst_slice" not in acc.to_json() and "notes" not in acc.to_json()
