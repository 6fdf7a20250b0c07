"""Block-by-block calibration on the zoo's SmolLM2 (6 layers, dynamo export): the cutter finds
every decoder layer's residual boundaries, and the table (every tensor either target may quantize,
with histograms, and min/max of every other FP32 tensor) is the whole-model table up to float
rounding."""

import logging

import numpy as np
import pytest

import onnxq

pytestmark = pytest.mark.zoo
pytest.importorskip("torch", reason="the zoo exports PyTorch models: install the zoo extra")

from onnxq import zoo  # noqa: E402


def test_smollm2_block_table_equals_whole_model_table(tmp_path, caplog):
    entry = zoo.get("smollm2-6l")
    calib = entry.calib_data(4)
    np.savez(tmp_path / "calib.npz", input_ids=calib["input_ids"][:, None, :])
    whole = onnxq.calibrate(entry.onnx_path(), tmp_path / "calib.npz", quiet=True)
    with caplog.at_level(logging.INFO, logger="onnxq"):
        by_blocks = onnxq.calibrate(entry.onnx_path(), tmp_path / "calib.npz", calib_blocks="auto")
    blocks = int(caplog.text.split("calibrating in ")[1].split(" blocks")[0])
    assert blocks >= 2 * 6  # an attention and an MLP block per layer at least
    assert whole.num_samples == by_blocks.num_samples == 4
    assert whole.tensors.keys() == by_blocks.tensors.keys() and len(whole.tensors) > 100
    for name, a in whole.tensors.items():
        b = by_blocks.tensors[name]
        np.testing.assert_allclose([b.min, b.max], [a.min, a.max], rtol=1e-4, atol=1e-5, err_msg=name)
        if a.histogram is not None:
            assert b.histogram.total == a.histogram.total, name
            assert np.abs(a.histogram.counts - b.histogram.counts).sum() <= 1e-3 * a.histogram.total, name
        if a.channel_amax is not None:
            np.testing.assert_allclose(b.channel_amax, a.channel_amax, rtol=1e-4, atol=1e-5, err_msg=name)
