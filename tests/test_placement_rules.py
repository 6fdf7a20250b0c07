"""Placement rules judged by the GEMM a conv becomes, and ConvTranspose on the ort target (fast tier)."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.placement import place
from onnxq.passes.preprocess import preprocess
from tests.synthetic import IR_VERSION


def _one_conv(op: str, weight_shape, group: int = 1, channels_in: int = 3, size: int = 28):
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=weight_shape).astype(np.float32), "w")
    kernel = list(weight_shape[2:])
    node = helper.make_node(op, ["x", "w"], ["y"], name="conv", group=group, kernel_shape=kernel, strides=kernel if op == "Conv" else [1] * len(kernel))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels_in, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    return preprocess(ir.serde.deserialize_model(proto))


@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_a_vit_patch_embedding_is_a_large_gemm_and_is_quantized(target):
    model = _one_conv("Conv", (384, 3, 14, 14))  # 3 → 384 channels, 14×14: K = 588
    assert place(model, target).nodes["conv"].quantized


@pytest.mark.parametrize("shape, group, cin, k, cout", [((32, 8, 1, 1), 1, 8, 8, 32), ((8, 32, 3, 3), 1, 32, 288, 8)])
def test_a_tiny_conv_gemm_stays_float_with_a_reason_that_reads_right(shape, group, cin, k, cout):
    decision = place(_one_conv("Conv", shape, group, channels_in=cin), "tensorrt").nodes["conv"]
    assert not decision.quantized
    assert f"reduction K = {k}" in decision.reason and f"{cout} output channels" in decision.reason
    assert "both need >= 16" in decision.reason


def test_depthwise_convs_are_judged_by_their_channel_count():
    assert place(_one_conv("Conv", (32, 1, 3, 3), 32, channels_in=32), "tensorrt").nodes["conv"].quantized
    small = place(_one_conv("Conv", (8, 1, 3, 3), 8, channels_in=8), "tensorrt").nodes["conv"]
    assert not small.quantized and "depthwise conv with 8 channels" in small.reason


def test_the_ort_target_quantizes_conv_transpose_weights_on_their_output_channel_axis():
    model = _one_conv("ConvTranspose", (64, 32, 2, 2), channels_in=64, size=8)  # weight [C_in, C_out, k, k]
    plan = place(model, "ort")
    assert plan.nodes["conv"].quantized and plan.nodes["conv"].inputs == {0: "activation", 1: "weight"}
    assert plan.weights["conv:1"].axis == 1
