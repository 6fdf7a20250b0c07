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
