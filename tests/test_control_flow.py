"""Quantization inside If/Loop bodies (fast tier: synthetic graphs built with onnx.helper)."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxq import modelio
from onnxq.calibrators import collect
from onnxq.cli import main
from onnxq.passes.preprocess import preprocess
from onnxq.plan import QuantPlan
from tests import synthetic


def _ops_by_graph(path) -> dict[str, list[str]]:
    model = onnx.load(str(path))
    out = {"main": [n.op_type for n in model.graph.node]}
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out[f"{node.name}.{attr.name}"] = [n.op_type for n in attr.g.node]
    return out


@pytest.fixture
def vad_case(tmp_path):
    model = synthetic.save(synthetic.vad_like_if(), tmp_path / "vad.onnx")
    rng = np.random.default_rng(0)

    def chunks(n, seed):
        r = np.random.default_rng(seed)
        x = r.normal(0, 1, (n, 1, 16, 64)).astype(np.float32) * r.uniform(0.2, 2.0, (n, 1, 1, 1)).astype(np.float32)
        return {"x": x, "sr": np.array([16000, 8000] * (n // 2), dtype=np.int64)}

    np.savez(tmp_path / "calib.npz", **chunks(32, 1))
    np.savez(tmp_path / "eval.npz", **chunks(200, 2))
    del rng
    return model, tmp_path / "calib.npz", tmp_path / "eval.npz"


def _run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.array([sess.run(None, {"x": x, "sr": np.asarray(sr)})[0].item() for x, sr in zip(feeds["x"], feeds["sr"])])


def test_convs_inside_if_branches_are_quantized_and_decisions_agree(vad_case, tmp_path):
    model, calib, evaluation = vad_case
    out = tmp_path / "vad.q.onnx"
    assert main(["quantize", str(model), "-o", str(out), "--calib", str(calib), "--eval", str(evaluation), "-q"]) == 0
    ops = _ops_by_graph(out)
    for branch in ("by_rate.then_branch", "by_rate.else_branch"):
        # Q/DQ sit in the branch itself: the Conv reads a DQ of its own graph
        assert ops[branch].count("QuantizeLinear") == 2 and ops[branch].count("DequantizeLinear") == 4
    report = json.loads((tmp_path / "vad.q.report.json").read_text())
    assert report["quantized_nodes_by_graph"] == {"main/by_rate.then_branch": 2, "main/by_rate.else_branch": 2}
    assert report["warnings"] == [] and report["calibration_method"] == "mse"
    feeds = dict(np.load(evaluation))
    ref, got = _run(model, feeds), _run(out, feeds)
    assert ((ref > 0.5) == (got > 0.5)).mean() >= 0.97  # streaming decisions per chunk
    assert np.abs(ref - got).max() < 0.05


def test_saved_plan_of_a_model_with_if_replays_byte_for_byte(vad_case, tmp_path):
    model, calib, _ = vad_case
    argv = ["quantize", str(model), "--no-eval", "-q"]
    assert main([*argv, "-o", str(tmp_path / "a.onnx"), "--calib", str(calib), "--save-plan", str(tmp_path / "plan.json")]) == 0
    plan = QuantPlan.load(tmp_path / "plan.json")
    assert plan.nodes["conv2_16k"].quantized and "r1_16k" in plan.activations
    assert main([*argv, "-o", str(tmp_path / "b.onnx"), "--plan", str(tmp_path / "plan.json")]) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_a_branch_the_data_never_takes_stays_float_with_its_reason(vad_case, tmp_path, capsys):
    model, _, _ = vad_case
    np.savez(tmp_path / "only16k.npz", x=np.random.default_rng(3).normal(size=(8, 1, 16, 64)).astype(np.float32), sr=np.full(8, 16000, np.int64))
    # -q keeps warnings on stderr
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "only16k.npz"), "--no-eval", "--save-plan", str(tmp_path / "p.json"), "-q"]) == 0
    plan = QuantPlan.load(tmp_path / "p.json")
    assert not plan.nodes["conv2_8k"].quantized and "not reached by any calibration sample" in plan.nodes["conv2_8k"].reason
    assert "conv2_8k:1" not in plan.weights
    assert plan.nodes["conv1_8k"].quantized  # its input x comes from the main graph: observed
    assert "not reached by the calibration data" in capsys.readouterr().err


def test_nothing_quantized_is_a_warning_in_the_output_and_the_report(vad_case, tmp_path, capsys):
    model, calib, _ = vad_case
    # -q keeps warnings on stderr
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib), "--no-eval", "--exclude-op", "Conv", "-q"]) == 0
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["quantized_nodes"] == 0 and "nothing quantized: 0 of 6 candidate nodes" in report["warnings"][0]
    assert "nothing quantized" in capsys.readouterr().err


def test_loop_body_tensors_are_calibrated_over_every_iteration_and_quantized(tmp_path):
    proto = synthetic.loop_matmul(steps=3)
    model = preprocess(ir.serde.deserialize_model(proto))
    before = modelio.to_proto(model).SerializeToString()
    h0 = np.random.default_rng(0).normal(size=(4, 4, 32)).astype(np.float32)
    table = collect(model, ["h_in"], [{"h0": h} for h in h0], progress=False)
    assert modelio.to_proto(model).SerializeToString() == before  # the promotion is undone
    w = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w_loop"))
    seen = []
    for h in h0:
        for _ in range(3):  # the body reads h_in at every iteration
            seen.append(h)
            h = np.maximum(h @ w, 0)
    assert table.tensors["h_in"].min == pytest.approx(min(s.min() for s in seen), rel=1e-5)
    assert table.tensors["h_in"].max == pytest.approx(max(s.max() for s in seen), rel=1e-5)

    path = synthetic.save(proto, tmp_path / "loop.onnx")
    np.savez(tmp_path / "h.npz", h0=h0)
    assert main(["quantize", str(path), "-o", str(tmp_path / "loop.q.onnx"), "--calib", str(tmp_path / "h.npz"), "-q"]) == 0
    assert _ops_by_graph(tmp_path / "loop.q.onnx")["loop.body"].count("QuantizeLinear") == 1
    report = json.loads((tmp_path / "loop.q.report.json").read_text())
    assert report["quantized_nodes_by_graph"] == {"main/loop.body": 1}
    assert report["evaluation"]["outputs"][0]["cosine_mean"] > 0.999


def test_fp8_relu_before_quantize_is_flagged_because_a_default_ort_session_computes_it_wrong(tmp_path):
    """ORT's ReluQuantRewrite (ORT_ENABLE_EXTENDED and above) deletes a Relu feeding an FP8
    QuantizeLinear; onnxq warns, and the rule is the whole difference between BASIC and ALL."""
    model = synthetic.save(synthetic.residual_cnn(), tmp_path / "cnn.onnx")
    calib = synthetic.random_npz(tmp_path / "calib.npz", "x", (1, 16, 8, 8), 16)
    out = tmp_path / "fp8.onnx"
    assert main(["quantize", str(model), "-o", str(out), "--calib", str(calib), "--precision", "fp8", "--no-eval", "-q"]) == 0
    report = json.loads((tmp_path / "fp8.report.json").read_text())
    assert any("ReluQuantRewrite" in w for w in report["warnings"])
    feeds = np.load(synthetic.random_npz(tmp_path / "eval.npz", "x", (1, 16, 8, 8), 8, seed=5))["x"]

    def run(level, disabled=None):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        sess = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        return np.stack([sess.run(None, {"x": x[None]})[0] for x in feeds])

    basic = run(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    every = run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert np.abs(every - basic).max() > 0.05 * np.abs(basic).max()  # the Relu is gone: not what the graph says
    np.testing.assert_allclose(run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ["ReluQuantRewrite"]), basic, rtol=1e-4, atol=1e-5)
