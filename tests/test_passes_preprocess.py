"""Preprocessing passes: structural effect and unchanged float outputs (checked in onnxruntime)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq import modelio
from onnxq.errors import UnsupportedModelError
from onnxq.passes import (
    FoldBatchNormPass,
    FoldConstantsPass,
    InferShapesPass,
    LiftConstantsPass,
    PreprocessPass,
    UpgradeOpsetPass,
    preprocess,
)
from onnxq.passes.shape_inference import values_without_type
from onnxq.runtime.ort import create_session

F = TensorProto.FLOAT
RTOL = ATOL = 1e-5
BN_TOL = 1e-4


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _bn_params(prefix: str, channels: int, rng: np.random.Generator) -> list[onnx.TensorProto]:
    """Non-trivial statistics, so a wrong fold changes the outputs."""
    return [
        _init(f"{prefix}_scale", rng.uniform(0.5, 2.0, channels).astype(np.float32)),
        _init(f"{prefix}_bias", rng.standard_normal(channels).astype(np.float32)),
        _init(f"{prefix}_mean", rng.standard_normal(channels).astype(np.float32)),
        _init(f"{prefix}_var", rng.uniform(0.2, 3.0, channels).astype(np.float32)),
    ]


def _bn_inputs(prefix: str) -> list[str]:
    return [f"{prefix}_{p}" for p in ("scale", "bias", "mean", "var")]


def _model(
    nodes, inputs, outputs, initializers=(), opset: int = 13, ir_version: int = 8
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )
    return model


def _feeds(proto: onnx.ModelProto, seed: int = 1, n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = _rng(seed)
    session = create_session(proto)
    feeds = []
    for _ in range(n):
        feed = {}
        for arg in session.get_inputs():
            shape = [d if isinstance(d, int) else 2 for d in arg.shape]
            feed[arg.name] = rng.standard_normal(shape).astype(np.float32)
        feeds.append(feed)
    return feeds


def _run(model: onnx.ModelProto | ir.Model, feeds) -> list[list[np.ndarray]]:
    session = create_session(model)
    return [session.run(None, feed) for feed in feeds]


def _assert_same_outputs(proto: onnx.ModelProto, model: ir.Model, tol: float = RTOL, feeds=None):
    feeds = feeds or _feeds(proto)
    expected = _run(proto, feeds)
    actual = _run(model, feeds)
    for exp, act in zip(expected, actual):
        assert len(exp) == len(act)
        for e, a in zip(exp, act):
            np.testing.assert_allclose(a, e, rtol=tol, atol=tol)


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def _apply(pass_, proto: onnx.ModelProto) -> tuple[ir.Model, bool]:
    model = ir.from_proto(proto)
    result = pass_(model)
    assert result.model is model
    return model, result.modified


# ---------------------------------------------------------------------------------------------
# model builders


def conv_bn_relu(opset: int = 11, seed: int = 0, bias: bool = True) -> onnx.ModelProto:
    """Conv(3->16, 3x3) + BN + Relu, then Unsqueeze with axes as an attribute (input from 13)."""
    rng = _rng(seed)
    # 16*3*3*3 = 432 elements, 1728 bytes: above the 1 KB the C-API helpers strip
    inits = [_init("W", rng.standard_normal((16, 3, 3, 3)).astype(np.float32))]
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(_init("B", rng.standard_normal(16).astype(np.float32)))
        conv_inputs.append("B")
    inits += _bn_params("bn", 16, rng)
    unsqueeze = (
        helper.make_node("Unsqueeze", ["r"], ["y"], axes=[0])
        if opset < 13
        else helper.make_node("Unsqueeze", ["r", "axes"], ["y"])
    )
    if opset >= 13:
        inits.append(_init("axes", np.array([0], np.int64)))
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", *_bn_inputs("bn")], ["b"], epsilon=1e-3),
        helper.make_node("Relu", ["b"], ["r"]),
        unsqueeze,
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", F, None)],
        inits,
        opset=opset,
    )


def constants_into_matmul() -> onnx.ModelProto:
    """Constant nodes of every flavour: a weight tensor, a float scalar, ints for a shape."""
    rng = _rng(2)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=_init("w_t", w)),
        helper.make_node("Constant", [], ["s"], value_float=0.5),
        helper.make_node("Constant", [], ["shape"], value_ints=[-1, 8]),
        helper.make_node("Constant", [], ["bias"], value=_init("b_t", np.float32(0.25))),
        helper.make_node("Reshape", ["x", "shape"], ["x2"]),
        helper.make_node("MatMul", ["x2", "w"], ["m"]),
        helper.make_node("Mul", ["m", "s"], ["ms"]),
        helper.make_node("Add", ["ms", "bias"], ["y"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [2, 2, 8])],
        [helper.make_tensor_value_info("y", F, None)],
    )


def shape_chain(opset: int = 13) -> onnx.ModelProto:
    """Reshape to [batch, -1] computed from Shape(x), and a weight fed through Transpose."""
    rng = _rng(3)
    wt = rng.standard_normal((5, 12)).astype(np.float32)  # stored transposed
    nodes = [
        helper.make_node("Shape", ["x"], ["sx"]),
        helper.make_node("Gather", ["sx", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus_one"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["flat"]),
        helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]),
        helper.make_node("MatMul", ["flat", "W"], ["y"]),
    ]
    inits = [
        _init("zero", np.array(0, np.int64)),
        _init("axes0", np.array([0], np.int64)),
        _init("minus_one", np.array([-1], np.int64)),
        _init("Wt", wt),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [3, 3, 4])],
        [helper.make_tensor_value_info("y", F, None)],
        inits,
        opset=opset,
    )


def gemm_bn(trans_b: int, bias: bool = True, beta: float = 1.0, seed: int = 4) -> onnx.ModelProto:
    rng = _rng(seed)
    k, n = 6, 5
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [_init("W", w), *_bn_params("bn", n, rng)]
    gemm_inputs = ["x", "W"]
    if bias:
        inits.append(_init("C", rng.standard_normal(n).astype(np.float32)))
        gemm_inputs.append("C")
    nodes = [
        helper.make_node("Gemm", gemm_inputs, ["g"], transB=trans_b, beta=beta, alpha=0.7),
        helper.make_node("BatchNormalization", ["g", *_bn_inputs("bn")], ["y"], epsilon=1e-5),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [4, k])],
        [helper.make_tensor_value_info("y", F, None)],
        inits,
    )


def conv_transpose_bn(group: int = 2, seed: int = 5) -> onnx.ModelProto:
    rng = _rng(seed)
    c_in, c_out_per_group = 4, 3
    inits = [
        _init("W", rng.standard_normal((c_in, c_out_per_group, 3, 3)).astype(np.float32)),
        _init("B", rng.standard_normal(c_out_per_group * group).astype(np.float32)),
        *_bn_params("bn", c_out_per_group * group, rng),
    ]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "W", "B"], ["ct"], group=group, strides=[2, 2]),
        helper.make_node("BatchNormalization", ["ct", *_bn_inputs("bn")], ["y"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [1, c_in, 5, 5])],
        [helper.make_tensor_value_info("y", F, None)],
        inits,
    )


# ---------------------------------------------------------------------------------------------
# UpgradeOpsetPass


def test_upgrade_opset_11_to_13_keeps_outputs():
    proto = conv_bn_relu(opset=11)
    model, modified = _apply(UpgradeOpsetPass(), proto)
    assert modified
    assert model.opset_imports[""] == 13
    # Unsqueeze-13 takes its axes as an input now; the large weight survived the C-API round trip
    unsqueeze = next(n for n in model.graph if n.op_type == "Unsqueeze")
    assert len(unsqueeze.inputs) == 2
    np.testing.assert_array_equal(
        model.graph.initializers["W"].const_value.numpy(),
        numpy_helper.to_array(proto.graph.initializer[0]),
    )
    _assert_same_outputs(proto, model)


def test_upgrade_opset_leaves_newer_models_alone():
    proto = conv_bn_relu(opset=17)
    model, modified = _apply(UpgradeOpsetPass(), proto)
    assert not modified
    assert model.opset_imports[""] == 17
    assert _ops(model) == ["Conv", "BatchNormalization", "Relu", "Unsqueeze"]


def test_upgrade_opset_to_fp8_target():
    proto = conv_bn_relu(opset=11)
    model, modified = _apply(UpgradeOpsetPass(min_opset=19), proto)
    assert modified and model.opset_imports[""] == 19
    _assert_same_outputs(proto, model)
    # a separate target: upgrade only models below 13, but then straight to 19
    model, _ = _apply(UpgradeOpsetPass(min_opset=13, target_opset=19), conv_bn_relu(opset=11))
    assert model.opset_imports[""] == 19
    upgrade = UpgradeOpsetPass(min_opset=13, target_opset=19)
    model, modified = _apply(upgrade, conv_bn_relu(opset=17))
    assert not modified and model.opset_imports[""] == 17


def test_upgrade_opset_rejects_bad_arguments():
    with pytest.raises(ValueError):
        UpgradeOpsetPass(min_opset=13, target_opset=11)
    with pytest.raises(ValueError):
        UpgradeOpsetPass(min_opset=onnx.defs.onnx_opset_version() + 1)


def test_upgrade_opset_failure_is_a_user_error():
    # An op that does not exist: the converter cannot adapt it.
    nodes = [helper.make_node("NoSuchOp", ["x"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F, [2])],
        [helper.make_tensor_value_info("y", F, [2])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=8)
    model = ir.from_proto(proto)
    with pytest.raises(UnsupportedModelError, match="opset 11 to 13"):
        UpgradeOpsetPass()(model)
    # and through the pipeline, unwrapped from the pass manager's PassError
    with pytest.raises(UnsupportedModelError, match="opset 11 to 13"):
        preprocess(ir.from_proto(proto))


# ---------------------------------------------------------------------------------------------
# LiftConstantsPass


def test_lift_constants_all_sizes():
    proto = constants_into_matmul()
    model, modified = _apply(LiftConstantsPass(), proto)
    assert modified
    assert "Constant" not in _ops(model)
    for name, shape, dtype in [
        ("w", (8, 4), ir.DataType.FLOAT),
        ("s", (), ir.DataType.FLOAT),
        ("shape", (2,), ir.DataType.INT64),
        ("bias", (), ir.DataType.FLOAT),
    ]:
        init = model.graph.initializers[name]
        assert init.const_value is not None
        assert tuple(init.const_value.shape) == shape
        assert init.dtype == dtype
    _assert_same_outputs(proto, model)


def test_lift_constants_after_opset_upgrade():
    # The C-API converter writes Unsqueeze-13's axes as a Constant node.
    model = ir.from_proto(conv_bn_relu(opset=11))
    UpgradeOpsetPass()(model)
    LiftConstantsPass()(model)
    assert "Constant" not in _ops(model)


# ---------------------------------------------------------------------------------------------
# InferShapesPass


def test_infer_shapes_types_every_value():
    proto = conv_bn_relu(opset=13)
    model = ir.from_proto(proto)
    for node in model.graph:
        for out in node.outputs:
            out.type = None
            out.shape = None
    result = InferShapesPass()(model)
    assert result.modified
    assert values_without_type(model) == []
    shapes = {out.name: out.shape for node in model.graph for out in node.outputs}
    assert shapes["c"] == ir.Shape([1, 16, 8, 8])
    assert shapes["y"] == ir.Shape([1, 1, 16, 8, 8])
    # initializers keep their data (the large ones are stripped only during inference)
    assert model.graph.initializers["W"].const_value is not None
    assert model.graph.inputs[0].name == "x" and len(model.graph.inputs) == 1
    _assert_same_outputs(proto, model)


def test_infer_shapes_propagates_shape_data():
    # onnx propagates shape data into Reshape from opset 14 (Reshape-13 reads initializers only)
    model = ir.from_proto(shape_chain(opset=14))
    InferShapesPass()(model)
    flat = next(n for n in model.graph if n.op_type == "Reshape").outputs[0]
    assert flat.shape == ir.Shape([3, 12])  # needs data propagation through Shape/Gather/Concat


def test_infer_shapes_keeps_symbolic_dims():
    proto = conv_bn_relu(opset=13)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model = ir.from_proto(proto)
    InferShapesPass()(model)
    assert values_without_type(model) == []
    conv_out = model.graph.node(0).outputs[0]
    assert conv_out.shape is not None and str(conv_out.shape[0]) == "batch"
    assert list(conv_out.shape[1:]) == [16, 8, 8]


def test_infer_shapes_op_without_schema_leaves_only_its_outputs_untyped():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Mystery", ["a"], ["b"], domain="custom.domain"),
        helper.make_node("Relu", ["b"], ["d"]),
        helper.make_node("Sigmoid", ["x"], ["c"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F, [2, 3])],
        [helper.make_tensor_value_info("d", F, None), helper.make_tensor_value_info("c", F, None)],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("custom.domain", 1)],
        ir_version=8,
    )
    model = ir.from_proto(proto)
    InferShapesPass()(model)
    values = {out.name: out for node in model.graph for out in node.outputs}
    assert values["a"].dtype == ir.DataType.FLOAT and values["a"].shape == ir.Shape([2, 3])
    assert values["c"].dtype == ir.DataType.FLOAT and values["c"].shape == ir.Shape([2, 3])
    assert [v.name for v in values_without_type(model)] == ["b"]


def test_infer_shapes_falls_back_when_strict_inference_fails():
    # A stale annotation on "a" makes strict inference raise for the whole model; the
    # non-strict retry still types everything else.
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Sigmoid", ["x"], ["c"]),
        helper.make_node("Tanh", ["c"], ["d"]),
        helper.make_node("Add", ["a", "d"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F, [2, 3])],
        [helper.make_tensor_value_info("y", F, None)],
        value_info=[helper.make_tensor_value_info("a", F, [7])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    model = ir.from_proto(proto)
    assert InferShapesPass()(model).modified
    values = {out.name: out for node in model.graph for out in node.outputs}
    assert values["c"].shape == ir.Shape([2, 3]) and values["d"].shape == ir.Shape([2, 3])
    assert values_without_type(model) == []


# ---------------------------------------------------------------------------------------------
# FoldConstantsPass


def test_fold_constants_shape_chain_and_weight_transpose():
    proto = shape_chain()
    model, modified = _apply(FoldConstantsPass(), proto)
    assert modified
    assert _ops(model) == ["Reshape", "MatMul"]
    matmul = model.graph.node(1)
    weight = matmul.inputs[1]
    assert weight.is_initializer() and tuple(weight.const_value.shape) == (12, 5)
    assert "Wt" not in model.graph.initializers  # the pre-transpose copy is gone
    _assert_same_outputs(proto, model)


def test_fold_constants_respects_output_size_limit():
    # Expand of a scalar into a 512x1024 tensor would add 512K elements to the model.
    nodes = [
        helper.make_node("Expand", ["one", "big_shape"], ["mask"]),
        helper.make_node("Mul", ["x", "mask"], ["y"]),
    ]
    proto = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [512, 1024])],
        [helper.make_tensor_value_info("y", F, None)],
        [
            _init("one", np.array(2.0, np.float32)),
            _init("big_shape", np.array([512, 1024], np.int64)),
        ],
    )
    model, _ = _apply(FoldConstantsPass(output_size_limit=1000), proto)
    assert "Expand" in _ops(model)
    model, _ = _apply(FoldConstantsPass(output_size_limit=1 << 20), proto)
    assert "Expand" not in _ops(model)


def test_fold_constants_never_folds_a_graph_input():
    # "k" is an initializer that is also a graph input: the caller may override it.
    rng = _rng(6)
    nodes = [
        helper.make_node("Identity", ["k"], ["k_id"]),
        helper.make_node("Mul", ["k_id", "two"], ["k2"]),
        helper.make_node("Add", ["x", "k2"], ["y"]),
    ]
    k = rng.standard_normal(4).astype(np.float32)
    proto = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [4]), helper.make_tensor_value_info("k", F, [4])],
        [helper.make_tensor_value_info("y", F, None)],
        [_init("k", k), _init("two", np.array(2.0, np.float32))],
    )
    model, _ = _apply(FoldConstantsPass(), proto)
    assert "Mul" in _ops(model) and "Add" in _ops(model)
    assert [v.name for v in model.graph.inputs] == ["x", "k"]
    assert model.graph.initializers["k"].const_value is not None
    np.testing.assert_array_equal(model.graph.initializers["k"].const_value.numpy(), k)
    # outputs match with the default k and with an overridden k
    x = rng.standard_normal(4).astype(np.float32)
    other_k = rng.standard_normal(4).astype(np.float32)
    _assert_same_outputs(proto, model, feeds=[{"x": x}, {"x": x, "k": other_k}])


def test_fold_constants_keeps_if_on_an_overridable_flag():
    # onnxscript's If rule alone would inline the then-branch and drop the "flag" initializer,
    # leaving a required input that no longer does anything.
    def branch(op: str, name: str) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(name, F, [4])
        return helper.make_graph([helper.make_node(op, ["x"], [name])], name, [], [out])

    then_g, else_g = branch("Relu", "t"), branch("Neg", "e")
    proto = _model(
        [helper.make_node("If", ["flag"], ["y"], then_branch=then_g, else_branch=else_g)],
        [
            helper.make_tensor_value_info("x", F, [4]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", F, [4])],
        [_init("flag", np.array(True))],
    )
    model, _ = _apply(FoldConstantsPass(), proto)
    assert _ops(model) == ["If"]
    assert "flag" in model.graph.initializers
    x = np.array([-2.0, -1.0, 1.0, 2.0], np.float32)
    _assert_same_outputs(proto, model, feeds=[{"x": x}, {"x": x, "flag": np.array(False)}])


# ---------------------------------------------------------------------------------------------
# FoldBatchNormPass


@pytest.mark.parametrize("bias", [True, False])
def test_fold_batchnorm_into_conv(bias):
    proto = conv_bn_relu(opset=13, bias=bias)
    model, modified = _apply(FoldBatchNormPass(), proto)
    assert modified
    assert _ops(model) == ["Conv", "Relu", "Unsqueeze"]
    assert not any(name.startswith("bn_") for name in model.graph.initializers)
    conv = model.graph.node(0)
    assert len(conv.inputs) == 3 and conv.inputs[2].const_value is not None
    # the folded node keeps the Conv's name: plans, --exclude and diffs refer to it
    assert conv.name == next(n.name for n in proto.graph.node if n.op_type == "Conv")
    _assert_same_outputs(proto, model, tol=BN_TOL)


@pytest.mark.parametrize(
    ("trans_b", "bias", "beta"), [(1, True, 1.0), (0, True, 0.3), (1, False, 1.0), (0, False, 1.0)]
)
def test_fold_batchnorm_into_gemm(trans_b, bias, beta):
    proto = gemm_bn(trans_b, bias=bias, beta=beta)
    model, modified = _apply(FoldBatchNormPass(), proto)
    assert modified
    assert _ops(model) == ["Gemm"]
    _assert_same_outputs(proto, model, tol=BN_TOL)


@pytest.mark.parametrize("group", [1, 2])
def test_fold_batchnorm_into_conv_transpose(group):
    proto = conv_transpose_bn(group=group)
    model, modified = _apply(FoldBatchNormPass(), proto)
    assert modified
    assert _ops(model) == ["ConvTranspose"]
    _assert_same_outputs(proto, model, tol=BN_TOL)


def test_fold_batchnorm_skips_training_mode():
    proto = conv_bn_relu(opset=15)
    bn = proto.graph.node[1]
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    bn.output.extend(["running_mean", "running_var"])
    model, modified = _apply(FoldBatchNormPass(), proto)
    assert not modified
    assert "BatchNormalization" in _ops(model)
    _assert_same_outputs(proto, model)


def test_fold_batchnorm_skips_shared_conv_output():
    proto = conv_bn_relu(opset=13)
    proto.graph.node.append(helper.make_node("Sigmoid", ["c"], ["z"]))
    proto.graph.output.append(helper.make_tensor_value_info("z", F, None))
    model, modified = _apply(FoldBatchNormPass(), proto)
    assert not modified
    assert "BatchNormalization" in _ops(model)


def test_fold_batchnorm_skips_bn_without_producer_pattern():
    # BN on a graph input (no Conv/Gemm before it) stays.
    rng = _rng(7)
    proto = _model(
        [helper.make_node("BatchNormalization", ["x", *_bn_inputs("bn")], ["y"])],
        [helper.make_tensor_value_info("x", F, [1, 4, 3, 3])],
        [helper.make_tensor_value_info("y", F, None)],
        _bn_params("bn", 4, rng),
    )
    model, modified = _apply(FoldBatchNormPass(), proto)
    assert not modified and _ops(model) == ["BatchNormalization"]


# ---------------------------------------------------------------------------------------------
# preprocess


def _every_intermediate_typed(model: ir.Model) -> None:
    assert values_without_type(model) == []
    for node in model.graph:
        for out in node.outputs:
            assert out.shape is not None, f"{out.name} has no shape"


def test_preprocess_opset11_conv_bn_relu():
    proto = conv_bn_relu(opset=11)
    model = ir.from_proto(proto)
    out = preprocess(model)
    assert out is model
    assert model.opset_imports[""] == 13
    assert _ops(model) == ["Conv", "Relu", "Unsqueeze"]
    assert "Constant" not in _ops(model)
    _every_intermediate_typed(model)
    _assert_same_outputs(proto, model, tol=BN_TOL)


@pytest.mark.parametrize(
    "builder",
    [
        constants_into_matmul,
        shape_chain,
        lambda: gemm_bn(1),
        lambda: conv_transpose_bn(2),
        lambda: conv_bn_relu(opset=17),
    ],
    ids=["constants", "shape_chain", "gemm_bn", "convtranspose_bn", "opset17"],
)
def test_preprocess_structure_and_outputs(builder):
    proto = builder()
    opset = proto.opset_import[0].version
    model = preprocess(ir.from_proto(proto))
    assert model.opset_imports[""] == max(opset, 13)
    ops = _ops(model)
    for gone in ("Constant", "BatchNormalization", "Shape", "Transpose", "Gather", "Concat"):
        assert gone not in ops
    _every_intermediate_typed(model)
    _assert_same_outputs(proto, model, tol=BN_TOL)


def test_preprocess_is_idempotent():
    model = preprocess(ir.from_proto(conv_bn_relu(opset=11)))
    first = modelio.to_proto(model).SerializeToString(deterministic=True)
    result = PreprocessPass()(model)
    second = modelio.to_proto(result.model).SerializeToString(deterministic=True)
    assert first == second
    assert not result.modified


def test_preprocess_leaves_the_file_alone(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu(opset=11), path)
    before = path.read_bytes()
    model = modelio.load(path)
    preprocess(model)
    assert path.read_bytes() == before
    out = tmp_path / "pre.onnx"
    modelio.save(model, out)
    reloaded = onnx.load(out)
    onnx.checker.check_model(reloaded)
    assert reloaded.opset_import[0].version == 13


def test_preprocess_never_materialises_a_huge_weight():
    """A 4 GiB weight (lazy, never evaluated) goes through every pass: the C-API helpers strip
    large initializers before serializing, so the 2 GB protobuf limit does not apply."""

    def fail():
        raise AssertionError("the 4 GiB weight was materialised")

    n = 32768
    shape = ir.Shape([n, n])
    weight = ir.Value(
        name="W",
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=shape,
        const_value=ir.LazyTensor(fail, dtype=ir.DataType.FLOAT, shape=shape),
    )
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, n]))
    matmul = ir.node("MatMul", [x, weight], name="mm")
    relu = ir.node("Relu", [matmul.outputs[0]], name="relu")
    unsqueeze = ir.node("Unsqueeze", [relu.outputs[0]], attributes={"axes": [0]}, name="unsq")
    for value, name in zip(
        (matmul.outputs[0], relu.outputs[0], unsqueeze.outputs[0]), ("mm_out", "relu_out", "y")
    ):
        value.name = name
    graph = ir.Graph(
        [x], [unsqueeze.outputs[0]], nodes=[matmul, relu, unsqueeze], initializers=[weight],
        opset_imports={"": 11},
    )
    model = ir.Model(graph, ir_version=8)
    assert weight.const_value.nbytes >= 4 << 30

    preprocess(model)

    assert model.opset_imports[""] == 13
    assert _ops(model) == ["MatMul", "Relu", "Unsqueeze"]
    assert model.graph.initializers["W"].const_value.shape == shape
    _every_intermediate_typed(model)
    assert model.graph.outputs[0].shape == ir.Shape([1, 1, n])


def test_folding_never_stores_a_weight_twice_when_another_node_still_reads_it():
    """Unsqueeze(W) → MatMul and Transpose(W) → MatMul: folding the Unsqueeze would add a copy of
    W while W stays for its other reader; the model must not grow."""
    w = np.random.default_rng(0).normal(size=(128, 128)).astype(np.float32)
    nodes = [
        helper.make_node("Unsqueeze", ["w", "axes"], ["w3"], name="unsq"),
        helper.make_node("MatMul", ["x", "w3"], ["a"], name="mm_a"),
        helper.make_node("Transpose", ["w"], ["wt"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["b"], name="mm_b"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0], np.int64), "axes")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    model, _ = _apply(FoldConstantsPass(), proto)
    stored = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    assert stored <= w.nbytes + 64
    x = np.random.default_rng(1).normal(size=(1, 4, 128)).astype(np.float32)
    ref = create_session(proto).run(None, {"x": x})[0]
    got = create_session(modelio.to_proto(model)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
