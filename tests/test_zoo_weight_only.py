"""Weight-only INT4 on the zoo's SmolLM2 (6 layers): AWQ at block 128 reaches the measured quality
bar and beats round-to-nearest on the same data (docs/weight-only.md)."""

import numpy as np
import pytest

import onnxq

pytestmark = pytest.mark.zoo
pytest.importorskip("torch", reason="the zoo exports PyTorch models: install the zoo extra")

from onnxq import zoo  # noqa: E402

# Measured with tools/bench/weight_only.py (16 calibration, 16 evaluation windows): RTN 0.76,
# AWQ 0.85 top-1 agreement; this test uses 4 calibration and 8 evaluation windows.
AWQ_MIN_AGREEMENT = 0.80
AWQ_MIN_GAIN = 0.04


def test_smollm2_w4a16_awq_beats_rtn(tmp_path):
    entry = zoo.get("smollm2-6l")
    calib = entry.calib_data(4)
    np.savez(tmp_path / "calib.npz", input_ids=calib["input_ids"][:, None, :])
    # head and table float (not the ort default): the thresholds below were measured so
    common = {"precision": "w4a16", "target": "ort", "block_size": 128, "quantize_head": False, "quantize_embedding": False, "report": False, "evaluate": False, "quiet": True}
    onnxq.quantize(entry.onnx_path(), tmp_path / "rtn.onnx", **common)
    result = onnxq.quantize(entry.onnx_path(), tmp_path / "awq.onnx", tmp_path / "calib.npz", weight_method="awq", **common)
    assert result.plan.smoothquant.active() and all(g.absorber["kind"] != "inserted_mul" for g in result.plan.smoothquant.active())
    rtn = entry.evaluate(str(tmp_path / "rtn.onnx"), str(entry.onnx_path()), n=8)
    awq = entry.evaluate(str(tmp_path / "awq.onnx"), str(entry.onnx_path()), n=8)
    assert awq["top1_agreement"] >= AWQ_MIN_AGREEMENT, (rtn, awq)
    assert awq["top1_agreement"] >= rtn["top1_agreement"] + AWQ_MIN_GAIN, (rtn, awq)
    assert awq["kl"] < rtn["kl"], (rtn, awq)
