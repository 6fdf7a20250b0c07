"""Model I/O: external data above the protobuf limit, ORT-compatible IR versions, atomic writes."""

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import synthetic
from onnxq import modelio
from onnxq.errors import OutputPathError
from onnxq.runtime.ort import create_session


def test_large_models_are_saved_with_external_data(tmp_path, monkeypatch):
    # the real threshold is 1 GiB; lowering it exercises the same path on a small model
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 1024)
    src = tmp_path / "cnn.onnx"
    synthetic.save(synthetic.residual_cnn(), src)
    model = modelio.load(src)
    out = modelio.save(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size > 1024
    assert os.path.getsize(out) < os.path.getsize(src)
    x = np.random.default_rng(0).normal(size=(1, 16, 8, 8)).astype(np.float32)
    ref = create_session(src).run(None, {"x": x})[0]
    got = create_session(out).run(None, {"x": x})[0]
    np.testing.assert_array_equal(ref, got)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_ir_version_follows_the_opset(tmp_path):
    proto = synthetic.residual_cnn(opset=17)
    proto.ir_version = onnx.IR_VERSION  # what onnx's newest helpers write; ORT may refuse it
    model = ir.from_proto(proto)
    out = modelio.save(model, tmp_path / "m.onnx")
    assert onnx.load(out).ir_version == 8  # opset 17 needs IR 8
    create_session(out)


def test_refuses_to_overwrite_the_input(tmp_path):
    src = synthetic.save(synthetic.residual_cnn(), tmp_path / "m.onnx")
    with pytest.raises(OutputPathError):
        modelio.check_outputs([tmp_path / "." / "m.onnx"], [src])


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with modelio.atomic_path(dest) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
