"""Weights are not held twice: a removed weight is freed (onnx_ir's input/output lists keep every
value that ever was an input or output), and sessions of in-memory models read a file instead of
a proto's bytes."""

import gc
import weakref

import numpy as np
import onnx_ir as ir
import synthetic

from onnxq import modelio
from onnxq.runtime import ort as ort_rt


class _Array(np.ndarray):
    """An ndarray subclass: instances take weak references."""


def test_a_removed_weight_that_was_a_graph_input_is_freed():
    weight = np.ones((64, 64), dtype=np.float32).view(_Array)
    alive = weakref.ref(weight)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 64]))
    w = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([64, 64]), const_value=ir.tensor(weight, name="w"))
    node = ir.node("MatMul", [x, w])
    graph = ir.Graph([x, w], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    graph.inputs.remove(w)  # an initializer exposed as an input, then not (as preprocessing does)
    graph.initializers.pop("w")
    node.replace_input_with(1, ir.Value(name="w_q", const_value=ir.tensor(np.zeros((64, 64), np.float32), name="w_q")))
    del w, weight
    modelio.release_detached_values(model)
    gc.collect()
    assert alive() is None


def test_session_of_an_ir_model_matches_the_proto_session(tmp_path):
    path = synthetic.save(synthetic.residual_cnn(), tmp_path / "m.onnx")
    model = modelio.load(path)
    version = model.ir_version
    feed = {"x": np.random.default_rng(0).normal(0, 1, (1, 16, 8, 8)).astype(np.float32)}
    from_ir = ort_rt.create_session(model).run(None, feed)
    from_proto = ort_rt.create_session(modelio.to_proto(model)).run(None, feed)
    np.testing.assert_array_equal(from_ir[0], from_proto[0])
    assert model.ir_version == version  # the model is left as it was


def test_quantize_frees_each_float_weight_once_its_quantized_copy_exists(tmp_path, monkeypatch):
    """While Q/DQ is inserted, a float weight whose readers all read its quantized copy is gone
    (not held until the pass ends next to every quantized weight)."""
    import onnxq
    from onnxq.passes import qdq

    seen, alive_at_each_weight = [], []
    real_source, real_quantize = qdq.weight_source, qdq.quantize_weight

    def source(value):
        found = real_source(value)
        if found is not None:
            seen.append((found.initializer.name, weakref.ref(found.initializer.const_value)))
        return found

    def quantize(array, *args, **kwargs):
        gc.collect()
        current = seen[-1][0]
        alive_at_each_weight.append(sorted({name for name, ref in seen if name != current and ref() is not None}))
        return real_quantize(array, *args, **kwargs)

    monkeypatch.setattr(qdq, "weight_source", source)
    monkeypatch.setattr(qdq, "quantize_weight", quantize)
    model = synthetic.save(synthetic.tiny_attention(), tmp_path / "m.onnx")
    calib = synthetic.random_npz(tmp_path / "c.npz", "x", (1, 16, 32), 4)
    onnxq.quantize(model, tmp_path / "q.onnx", calib, evaluate=False, report=False)
    assert len(alive_at_each_weight) == 4  # wq, wk, wv, wo
    assert alive_at_each_weight == [[]] * 4


def test_streamed_save_writes_the_bytes_of_ir_save(tmp_path):
    """modelio.save writes a model under the external-data threshold tensor by tensor; the file
    is the one ir.save writes (quantized outputs with metadata, subgraphs with initializers)."""
    import onnxq

    model = synthetic.save(synthetic.tiny_attention(), tmp_path / "m.onnx")
    calib = synthetic.random_npz(tmp_path / "c.npz", "x", (1, 16, 32), 4)
    onnxq.quantize(model, tmp_path / "q.onnx", calib, evaluate=False, report=False)
    cases = [tmp_path / "q.onnx", *(synthetic.save(make(), tmp_path / f"{make.__name__}.onnx") for make in (synthetic.loop_matmul, synthetic.vad_like_if, synthetic.residual_cnn))]
    for path in cases:
        loaded = modelio.load(path)
        modelio.save(loaded, tmp_path / "streamed.onnx")  # sets the IR version ORT needs
        ir.save(loaded, tmp_path / "reference.onnx")
        assert (tmp_path / "streamed.onnx").read_bytes() == (tmp_path / "reference.onnx").read_bytes(), path.name


def test_the_final_check_reads_a_file_and_reports_a_broken_output():
    """emit.check_model checks the model from a scratch file (no proto of the weights in memory)
    and still names a broken output as onnxq's problem."""
    import pytest

    from onnxq import emit
    from onnxq.errors import UnsupportedModelError

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 4]))
    w = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4, 4]), const_value=ir.tensor(np.eye(4, dtype=np.float32), name="w"))
    first = ir.node("MatMul", [x, w], name="a")
    second = ir.node("Relu", [first.outputs[0]], name="b")
    for out in (*first.outputs, *second.outputs):
        out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape([1, 4])
    first.outputs[0].name = second.outputs[0].name = "y"  # two producers of one name: not SSA
    graph = ir.Graph([x], second.outputs, nodes=[first, second], initializers=[w], opset_imports={"": 18}, name="g")
    model = ir.Model(graph, ir_version=10)
    with pytest.raises(UnsupportedModelError, match="does not pass onnx.checker.*(SSA|static single)"):
        emit.check_model(model)
    first.outputs[0].name = "h"
    emit.check_model(model)  # a valid model passes
    assert model.ir_version == 10  # and is left as it was
