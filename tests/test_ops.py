"""Op facts (onnxq.ops) on one-node graphs: each axis is checked by what it means in a numpy
product (scaling the weight along its output axis scales the output's channels; scaling it along
its input axis equals scaling the activation along its channel axis), and MACs against the
multiplications of a numpy einsum of the same product. No model file."""

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

from onnxq import ops

RNG = np.random.default_rng(0)


def _node(op: str, a_shape, w_shape, out_shape, **attrs) -> ir.Node:
    """The single node of a graph ``op(x, w)`` with the given static shapes."""
    g = helper.make_graph(
        [helper.make_node(op, ["x", "w"], ["y"], name="n", **attrs)], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, a_shape),
         helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, w_shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, out_shape)],
    )
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    return next(iter(model.graph))


# --- numpy references: (output, multiplications performed) ----------------------------------------


def _matmul(x, w):
    return x @ w, math.prod(np.einsum("...k,kn->...kn", x, w).shape) if w.ndim == 2 else None


def _gemm(a, b, trans_a=0, trans_b=0):
    a2, b2 = (a.T if trans_a else a), (b.T if trans_b else b)
    return a2 @ b2, math.prod(np.einsum("mk,kn->mkn", a2, b2).shape)


def _conv(x, w):
    """Valid 2-D convolution, stride 1, one group: y[n,o,h,w] = Σ_c,i,j x[n,c,h+i,w+j] W[o,c,i,j]."""
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # n c h w i j
    products = np.einsum("nchwij,ocij->nohwcij", win, w)
    return products.sum(axis=(4, 5, 6)), products.size


def _conv_transpose(x, w):
    """Stride 1, no padding, one group: each x[n,c,h,w] adds x·W[c,o,:,:] at y[n,o,h:h+kh,w:w+kw]."""
    n, _, h, wd = x.shape
    _, cout, kh, kw = w.shape
    products = np.einsum("nchw,coij->nchwoij", x, w)
    y = np.zeros((n, cout, h + kh - 1, wd + kw - 1), np.float64)
    for i in range(kh):
        for j in range(kw):
            y[:, :, i:i + h, j:j + wd] += products[..., i, j].sum(axis=1).transpose(0, 3, 1, 2)
    return y, products.size


def _scaled(a, axis, s):
    shape = [1] * a.ndim
    shape[axis] = -1
    return a * s.reshape(shape)


CASES = {
    # name: (op, x shape, w shape, attributes, reference, channel axis of the output)
    "matmul": ("MatMul", (2, 5, 8), (8, 7), {}, _matmul, -1),
    "gemm": ("Gemm", (5, 8), (8, 7), {}, _gemm, 1),
    "gemm_transB": ("Gemm", (5, 8), (7, 8), {"transB": 1}, lambda a, b: _gemm(a, b, trans_b=1), 1),
    "gemm_transA": ("Gemm", (8, 5), (8, 7), {"transA": 1}, lambda a, b: _gemm(a, b, trans_a=1), 1),
    "conv": ("Conv", (1, 4, 6, 6), (6, 4, 3, 3), {}, _conv, 1),
    "conv_transpose": ("ConvTranspose", (1, 4, 5, 5), (4, 3, 2, 2), {}, _conv_transpose, 1),
}


def _case(name):
    op, a_shape, w_shape, attrs, ref, out_axis = CASES[name]
    x = RNG.normal(size=a_shape)
    w = RNG.normal(size=w_shape)
    y, mults = ref(x, w)
    return _node(op, list(a_shape), list(w_shape), list(y.shape), **attrs), x, w, y, mults, ref, out_axis


@pytest.mark.parametrize("name", list(CASES))
def test_weight_output_axis_scales_the_output_channels(name):
    node, x, w, y, _, ref, out_axis = _case(name)
    axis = ops.weight_output_axis(node)
    s = RNG.uniform(0.5, 2.0, size=w.shape[axis])
    np.testing.assert_allclose(ref(x, _scaled(w, axis, s))[0], _scaled(y, out_axis, s), rtol=1e-10)
    assert ops.weight_axis(node) == (1, axis)


@pytest.mark.parametrize("name", list(CASES))
def test_weight_input_axis_pairs_with_the_activation_channel_axis(name):
    node, x, w, _, _, ref, _ = _case(name)
    w_axis = ops.weight_input_axis(node)
    x_axis = ops.activation_channel_axis(node.op_type, 0, node.attributes)
    assert x.shape[x_axis] == w.shape[w_axis]
    s = RNG.uniform(0.5, 2.0, size=w.shape[w_axis])
    np.testing.assert_allclose(ref(_scaled(x, x_axis, s), w)[0], ref(x, _scaled(w, w_axis, s))[0], rtol=1e-10)


@pytest.mark.parametrize("name", list(CASES))
def test_macs_count_the_multiplications(name):
    node, x, w, y, mults, _, _ = _case(name)
    assert ops.linear_macs(node, list(x.shape), list(w.shape), list(y.shape)) == mults
    assert ops.static_macs(node, {"x": list(x.shape), "w": list(w.shape), "y": list(y.shape)}) == mults


@pytest.mark.parametrize("name", ["matmul", "gemm", "gemm_transA", "gemm_transB"])
def test_gemm_dims_and_macs_from_static_shapes(name):
    node, x, w, y, mults, _, _ = _case(name)
    m, k, n = ops.gemm_dims(node)
    assert m * k * n == mults and n == y.shape[-1]
    assert ops.static_macs(node, {}) == mults  # no recorded shapes: the graph's static dims


@pytest.mark.parametrize("name", ["matmul", "gemm", "gemm_transB"])
def test_weight_matrix_is_input_by_output_channels(name):
    node, x, w, y, _, _, _ = _case(name)
    np.testing.assert_allclose(x @ ops.weight_matrix(node, w), y, rtol=1e-10)


def test_weight_matrix_of_a_1x1_conv():
    x, w = RNG.normal(size=(1, 4, 3, 3)), RNG.normal(size=(6, 4, 1, 1))
    y, _ = _conv(x, w)
    node = _node("Conv", list(x.shape), list(w.shape), list(y.shape))
    matrix = ops.weight_matrix(node, w)
    assert matrix.shape == (4, 6)
    np.testing.assert_allclose(np.einsum("nchw,co->nohw", x, matrix), y, rtol=1e-10)


def test_grouped_conv_transpose_has_no_per_channel_axis():
    node = _node("ConvTranspose", [1, 4, 5, 5], [4, 3, 2, 2], [1, 6, 6, 6], group=2)
    assert ops.weight_output_axis(node) == 1  # the layout still puts C_out/group on axis 1
    assert ops.weight_axis(node) == (1, None)


def test_matmul_second_activation_reduces_over_its_rows_and_unknown_weights_have_no_axis():
    assert ops.activation_channel_axis("MatMul", 1) == -2  # Q·Kᵀ: Kᵀ is [.., K, N]
    assert ops.activation_channel_axis("Gemm", 1) is None
    assert ops.activation_channel_axis("Relu", 0) is None
    node = _node("MatMul", [2, 8], [8], [2])
    assert ops.weight_axis(node) == (1, None)
    assert ops.weight_axis(_node("Add", [2], [2], [2])) is None


@pytest.mark.parametrize("op_type, opset", [
    ("ReduceSum", 12), ("ReduceSum", 13), ("ReduceMax", 17), ("ReduceMax", 18),
    ("ReduceMin", 17), ("ReduceMin", 18), ("ReduceMean", 17), ("ReduceMean", 18),
])
@pytest.mark.parametrize("keepdims", [False, True])
def test_reduce_node_runs_in_ort_at_its_opset_and_equals_numpy(op_type, opset, keepdims):
    """ORT checks the node against the op's schema at ``opset`` (an ``axes`` attribute where the
    opset wants an input fails to load, and the other way round); the result equals numpy's."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3, 4, 5]))
    node, axes = ops.reduce_node(op_type, x, [0, 2, 3], opset, "r", keepdims=keepdims)
    node.outputs[0].name, node.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[axes] if axes is not None else [], opset_imports={"": opset})
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=8))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    data = RNG.normal(size=(2, 3, 4, 5)).astype(np.float32)
    reference = {"ReduceSum": np.sum, "ReduceMax": np.max, "ReduceMin": np.min, "ReduceMean": np.mean}[op_type]
    expected = reference(data, axis=(0, 2, 3), keepdims=keepdims)
    np.testing.assert_allclose(session.run(None, {"x": data})[0], expected, rtol=1e-5, atol=1e-6)
