"""Cross-layer equalization and bias correction on synthetic depthwise CNNs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq import modelio
from onnxq.bias_correction import measure_corrections
from onnxq.emit import emit
from onnxq.equalization import channel_range, in_axis, out_axis, plan_equalization
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.pipeline import build, quantize
from onnxq.placement import plan_for
from onnxq.plan import QuantPlan
from onnxq.recipe import Recipe
from tests.synthetic import IR_VERSION, random_npz, save


def _w(rng, shape, spread):
    """Weights whose output channels differ in range by up to e^(±2·spread)."""
    w = rng.normal(0, 0.3, shape)
    return (w * np.exp(rng.normal(0, spread, (shape[0],) + (1,) * (len(shape) - 1)))).astype(np.float32)


def mobile_block(seed: int = 0, spread: float = 1.0, opset: int = 17) -> onnx.ModelProto:
    """x[1,16,12,12] → Conv 1×1 (16→32) → Relu → depthwise 3×3 → Clip(0, 6) → Conv 1×1 (32→16)
    → Conv 3×3 (16→16) → Relu → GlobalAveragePool → Flatten → Gemm(16→6) → LeakyRelu → Gemm(6→3)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "w_expand": _w(rng, (32, 16, 1, 1), spread), "b_expand": rng.normal(0, 0.2, 32),
        "w_dw": _w(rng, (32, 1, 3, 3), spread), "b_dw": rng.normal(0, 0.2, 32),
        "w_project": _w(rng, (16, 32, 1, 1), spread), "b_project": rng.normal(0, 0.2, 16),
        "w_conv": _w(rng, (16, 16, 3, 3), spread), "b_conv": rng.normal(0, 0.2, 16),
        "w_fc1": _w(rng, (6, 16), spread), "b_fc1": rng.normal(0, 0.2, 6),
        "w_fc2": _w(rng, (3, 6), spread), "b_fc2": rng.normal(0, 0.2, 3),
        "lo": np.array(0.0), "hi": np.array(6.0),
    }
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in arrays.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w_expand", "b_expand"], ["expand"], name="expand"),
        helper.make_node("Relu", ["expand"], ["expand_relu"], name="expand_relu"),
        helper.make_node("Conv", ["expand_relu", "w_dw", "b_dw"], ["dw"], name="dw", group=32, pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["dw", "lo", "hi"], ["dw_relu6"], name="dw_relu6"),
        helper.make_node("Conv", ["dw_relu6", "w_project", "b_project"], ["project"], name="project"),
        helper.make_node("Conv", ["project", "w_conv", "b_conv"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["conv_relu"], name="conv_relu"),
        helper.make_node("GlobalAveragePool", ["conv_relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w_fc1", "b_fc1"], ["fc1"], name="fc1", transB=1),
        helper.make_node("LeakyRelu", ["fc1"], ["fc1_act"], name="fc1_act", alpha=0.1),
        helper.make_node("Gemm", ["fc1_act", "w_fc2", "b_fc2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mobile_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


@pytest.fixture
def block_case(tmp_path):
    model = save(mobile_block(), tmp_path / "block.onnx")
    return model, random_npz(tmp_path / "calib.npz", "x", (1, 16, 12, 12), 16, seed=1), random_npz(tmp_path / "eval.npz", "x", (1, 16, 12, 12), 16, seed=2)


def _run(model, x: np.ndarray) -> np.ndarray:
    """The model's output (a proto or an ir.Model) on each sample of ``x``."""
    proto = model if isinstance(model, onnx.ModelProto) else modelio.to_proto(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))])


def _equalized(path, clips="rescale"):  # the test model's ReLU6 pair too
    model = load_and_preprocess(path)
    plan = plan_for(model, Recipe())
    plan.equalization = plan_equalization(model, clips)
    emit(model, plan, ["equalize"])
    return model, plan


def test_equalization_is_exact_in_float(block_case):
    path, _, _ = block_case
    x = np.random.default_rng(3).normal(0, 1, (8, 16, 12, 12)).astype(np.float32) * 3
    reference = _run(onnx.load(path), x)
    model, plan = _equalized(path)
    assert [(p.first, p.second) for p in plan.equalization.pairs] == [("expand", "dw"), ("dw", "project"), ("project", "conv"), ("fc1", "fc2")]
    assert "Clip" not in {n.op_type for n in model.graph}  # ReLU6 got per-channel bounds
    out = _run(model, x)
    assert np.abs(out - reference).max() <= 1e-5 * np.abs(reference).max()


def test_converged_weight_ranges_match_per_channel(block_case):
    path, _, _ = block_case
    model, plan = _equalized(path)
    assert 1 < plan.equalization.iterations < 100
    nodes = {n.name: n for n in model.graph}
    before = {n.name: n for n in load_and_preprocess(path).graph}
    for pair in plan.equalization.pairs:
        first, second = nodes[pair.first], nodes[pair.second]
        r1 = channel_range(first.inputs[1].const_value.numpy(), out_axis(first))
        r2 = channel_range(second.inputs[1].const_value.numpy(), in_axis(second))
        np.testing.assert_allclose(r1, r2, rtol=2e-3)
        old = channel_range(before[pair.first].inputs[1].const_value.numpy(), out_axis(first))
        assert r1.max() / r1.min() < old.max() / old.min()  # the spread across channels shrank


def test_clips_skip_leaves_relu6_pairs_alone(block_case):
    path, _, _ = block_case
    model, plan = _equalized(path, clips="skip")
    assert [(p.first, p.second) for p in plan.equalization.pairs] == [("expand", "dw"), ("project", "conv"), ("fc1", "fc2")]
    assert "Clip" in {n.op_type for n in model.graph}


def test_equalize_and_bias_correction_plan_replays_byte_for_byte(block_case, tmp_path):
    path, calib, evaluation = block_case
    out, plan_path = tmp_path / "q.onnx", tmp_path / "plan.json"
    quantize(path, out, calib, eval=evaluation, save_plan=plan_path, equalize=True, bias_correction=True, quiet=True)
    saved = json.loads(plan_path.read_text())
    assert len(saved["equalization"]["pairs"]) == 3 and set(saved["bias_correction"]) >= {"expand", "dw", "project", "conv"}
    replay = tmp_path / "replay.onnx"
    quantize(path, replay, plan=plan_path, quiet=True)
    assert replay.read_bytes() == out.read_bytes()


def _layer_mean_error(path, calib, evaluation, correct: bool) -> float:
    """Mean |per-channel mean error| of the quantized dw conv's output on held-out data."""
    model = load_and_preprocess(path)
    recipe = Recipe.from_options({"bias_correction": correct})
    plan, _ = build(model, recipe, [{"x": d[None]} for d in np.load(calib)["x"]])
    float_model = onnx.load(path)
    quant = modelio.to_proto(model)
    for proto in (float_model, quant):
        proto.graph.output.append(helper.make_tensor_value_info("dw", TensorProto.FLOAT, None))
    x = np.load(evaluation)["x"]
    ref, got = _run_output(float_model, x), _run_output(quant, x)
    return float(np.abs((got - ref).mean(axis=(0, 2, 3))).mean())


def _run_output(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["dw"], {"x": x[i : i + 1]})[0] for i in range(len(x))])


def test_bias_correction_reduces_mean_output_error_on_held_out_data(block_case):
    path, calib, evaluation = block_case
    plain = _layer_mean_error(path, calib, evaluation, correct=False)
    corrected = _layer_mean_error(path, calib, evaluation, correct=True)
    assert corrected < 0.6 * plain, (plain, corrected)


def test_one_correction_per_output_channel_of_every_quantized_conv(block_case):
    path, calib, _ = block_case
    model = load_and_preprocess(path)
    data = [{"x": d[None]} for d in np.load(calib)["x"]]
    plan, _ = build(model, Recipe(), data)  # ranges for every tensor
    fresh = load_and_preprocess(path)
    corrections = measure_corrections(fresh, plan, data)
    assert set(corrections) == {n for n, d in plan.quantized_nodes().items() if d.op_type in ("Conv", "Gemm")}
    channels = {n.name: n.outputs[0].shape[1] for n in fresh.graph if n.name in corrections}
    assert all(len(v) == channels[n] for n, v in corrections.items())
    plan.bias_correction = corrections
    assert QuantPlan.from_json(json.loads(json.dumps(plan.to_json()))).bias_correction == corrections


def test_bias_corrections_are_the_same_at_opset_18(block_case, tmp_path):
    """The per-channel mean error is reduced with ``axes`` as an attribute at 17 and as an input
    at 18 (ReduceMean's change): the same model gives the same corrections at both."""
    _, calib, _ = block_case
    data = [{"x": d[None]} for d in np.load(calib)["x"]]
    corrections = []
    for opset in (17, 18):
        path = save(mobile_block(opset=opset), tmp_path / f"block{opset}.onnx")
        plan, _ = build(load_and_preprocess(path), Recipe(), data)
        corrections.append(measure_corrections(load_and_preprocess(path), plan, data))
    assert corrections[0].keys() == corrections[1].keys() and corrections[0]
    for name, values in corrections[0].items():
        np.testing.assert_allclose(corrections[1][name], values, rtol=1e-5, atol=1e-7)
