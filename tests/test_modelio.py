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


def _big_external_model(folder, rows=512):
    """A MatMul model whose 1 MB weight is in ``m.onnx.data``."""
    folder.mkdir()
    weight = np.random.default_rng(0).normal(size=(rows, 512)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, rows])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 512])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    path = folder / "m.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return path, weight


def test_external_weights_are_loaded_lazily_and_read_whole_on_use(tmp_path, monkeypatch):
    import tracemalloc

    path, weight = _big_external_model(tmp_path / "src")
    monkeypatch.chdir(tmp_path)  # reads do not depend on the working directory
    tracemalloc.start()
    model = modelio.load(path.relative_to(tmp_path))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < weight.nbytes / 4  # the load reads no weight
    tensor = model.graph.initializers["w"].const_value
    assert not isinstance(tensor, ir.ExternalTensor)  # no mapping of the input's file is kept
    np.testing.assert_array_equal(tensor.numpy(), weight)
    monkeypatch.chdir(tmp_path / "src")
    np.testing.assert_array_equal(tensor.numpy(), weight)


def test_a_short_external_data_file_fails_at_load(tmp_path):
    from onnxq.errors import ModelLoadError

    path, weight = _big_external_model(tmp_path / "src")
    data = tmp_path / "src" / "m.onnx.data"
    data.write_bytes(data.read_bytes()[: weight.nbytes // 2])
    with pytest.raises(ModelLoadError, match="'w'.*holds"):
        modelio.load(path)
    data.unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        modelio.load(path)


def test_a_large_output_is_all_or_nothing(tmp_path, cnn_case, monkeypatch):
    # above the threshold the model is a pair (.onnx + .data) staged with the report: a failure
    # after the model was written leaves neither, nor any temporary
    import onnxq
    from onnxq import pipeline

    model, calib, _ = cnn_case
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 1024)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def fail(_self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline.QuantizeResult, "to_json", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        onnxq.quantize(model, out_dir / "q.onnx", calib, evaluate=False, quiet=True)
    assert list(out_dir.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 1024)
    onnxq.quantize(model, out_dir / "q.onnx", calib, evaluate=False, quiet=True)
    assert sorted(p.name for p in out_dir.iterdir()) == ["q.onnx", "q.onnx.data", "q.report.json"]
    assert modelio.external_data_files(out_dir / "q.onnx") == [out_dir / "q.onnx.data"]
    onnx.checker.check_model(str(out_dir / "q.onnx"))


def test_external_data_outside_the_models_folder_is_refused(tmp_path):
    from onnxq.errors import ModelLoadError

    path, _ = _big_external_model(tmp_path / "src")
    (tmp_path / "src" / "m.onnx.data").rename(tmp_path / "elsewhere.data")
    proto = onnx.load(path, load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../elsewhere.data"
    onnx.save(proto, path)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        modelio.load(path)


def test_packed_int4_external_weights_are_read_lazily(tmp_path):
    import ml_dtypes

    folder = tmp_path / "src"
    folder.mkdir()
    values = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
    tensor = onnx.numpy_helper.from_array(values.astype(ml_dtypes.int4), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Cast", ["w"], ["y"], to=onnx.TensorProto.FLOAT)], "g", [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 4])], [tensor],
    )
    path = folder / "m.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)]), path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    loaded = modelio.load(path).graph.initializers["w"].const_value
    assert isinstance(loaded, ir.LazyTensor)
    np.testing.assert_array_equal(loaded.numpy().astype(np.int8), values)
