import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("ONNXQ_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import synthetic  # noqa: E402


@pytest.fixture
def cnn_case(tmp_path):
    model = synthetic.save(synthetic.residual_cnn(opset=11), tmp_path / "cnn.onnx")
    calib = synthetic.random_npz(tmp_path / "calib.npz", "x", (1, 16, 8, 8), 16, seed=1)
    evald = synthetic.random_npz(tmp_path / "eval.npz", "x", (1, 16, 8, 8), 8, seed=2)
    return model, calib, evald


@pytest.fixture
def attention_case(tmp_path):
    model = synthetic.save(synthetic.tiny_attention(), tmp_path / "att.onnx")
    calib = synthetic.random_npz(tmp_path / "calib.npz", "x", (1, 16, 32), 16, seed=1)
    evald = synthetic.random_npz(tmp_path / "eval.npz", "x", (1, 16, 32), 8, seed=2)
    return model, calib, evald


@pytest.fixture
def decoder_case(tmp_path):
    model = synthetic.save(synthetic.tiny_decoder_block(), tmp_path / "block.onnx")
    calib = synthetic.random_npz(tmp_path / "calib.npz", "x", (1, 16, 32), 16, seed=1)
    evald = synthetic.random_npz(tmp_path / "eval.npz", "x", (1, 16, 32), 8, seed=2)
    return model, calib, evald
