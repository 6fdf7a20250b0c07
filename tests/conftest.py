import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("ONNXQ_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import synthetic  # noqa: E402


def _case(tmp_path, model, name, shape):
    """(model path, 16 calibration samples, 8 held-out samples) of random data for input ``x``."""
    path = synthetic.save(model, tmp_path / name)
    calib = synthetic.random_npz(tmp_path / "calib.npz", "x", shape, 16, seed=1)
    evald = synthetic.random_npz(tmp_path / "eval.npz", "x", shape, 8, seed=2)
    return path, calib, evald


@pytest.fixture
def cnn_case(tmp_path):
    return _case(tmp_path, synthetic.residual_cnn(opset=11), "cnn.onnx", (1, 16, 8, 8))


@pytest.fixture
def attention_case(tmp_path):
    return _case(tmp_path, synthetic.tiny_attention(), "att.onnx", (1, 16, 32))


@pytest.fixture
def decoder_case(tmp_path):
    return _case(tmp_path, synthetic.tiny_decoder_block(), "block.onnx", (1, 16, 32))
