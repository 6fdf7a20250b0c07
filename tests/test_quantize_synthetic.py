"""The quantize job on small synthetic graphs: placement rules, Q/DQ form, accuracy, plan replay."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxq
from onnxq.runtime.ort import create_session


def _nodes(path):
    return list(onnx.load(path).graph.node)


def _inits(path):
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}


def _consumers(model, tensor):
    return [n for n in model.graph.node if tensor in n.input]


def test_tensorrt_rules_on_residual_cnn(cnn_case, tmp_path):
    model, calib, evald = cnn_case
    out = tmp_path / "q.onnx"
    res = onnxq.quantize(model, out, calib, eval=evald, target="tensorrt", quiet=True)
    m = onnx.load(out)
    onnx.checker.check_model(m)
    inits = _inits(out)
    ops = [n.op_type for n in m.graph.node]
    assert "BatchNormalization" not in ops
    # zero points are 0 everywhere, and int8
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any()
    # weights: per-channel DQ on axis 0 of the conv weights, scale length = out channels
    by_out = {o: n for n in m.graph.node for o in n.output}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    quantized_convs = [c for c in convs if c.input[1] in by_out and by_out[c.input[1]].op_type == "DequantizeLinear"]
    assert len(quantized_convs) == 2
    for c in quantized_convs:
        dq = by_out[c.input[1]]
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert axis == 0
        assert inits[dq.input[0]].dtype == np.int8
        assert inits[dq.input[1]].shape == (inits[dq.input[0]].shape[0],)
    # the tiny conv (3 output channels) and the GEMV classifier stay float
    tiny = next(c for c in convs if c.name == "conv_tiny")
    assert tiny.input[1] == "w3"
    fc = next(n for n in m.graph.node if n.op_type == "Gemm")
    assert fc.input[0] == "flat" and fc.input[1] == "wfc"
    # Q/DQ sits before the Pad, not between Pad and Conv
    pad = next(n for n in m.graph.node if n.op_type == "Pad")
    assert by_out[pad.input[0]].op_type == "DequantizeLinear"
    # residual Add: skip branch (x) quantized, conv branch not
    add = next(n for n in m.graph.node if n.op_type == "Add")
    assert by_out[add.input[1]].op_type == "DequantizeLinear"
    assert by_out[add.input[0]].op_type == "Conv"
    # nothing quantizes a Conv output (no simulated BN/ReLU folding)
    for c in convs:
        for user in _consumers(m, c.output[0]):
            assert user.op_type != "QuantizeLinear"
    assert res.accuracy[0].cosine_mean > 0.999
    assert res.accuracy[0].snr_db > 30


def test_ort_target_uses_u8_activations_s8_weights(cnn_case, tmp_path):
    model, calib, evald = cnn_case
    out = tmp_path / "q.onnx"
    onnxq.quantize(model, out, calib, eval=evald, target="ort", quiet=True)
    m = onnx.load(out)
    inits = _inits(out)
    q_nodes = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert q_nodes and all(inits[n.input[2]].dtype == np.uint8 for n in q_nodes)
    const_dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    w_dq = [n for n in const_dq if inits[n.input[0]].dtype == np.int8]
    assert w_dq and all(not inits[n.input[2]].any() for n in w_dq)
    # the only other constant DQs: Gemm biases as int32, which ORT needs to form QGemm
    others = [n for n in const_dq if n not in w_dq]
    consumers = {i: n.op_type for n in m.graph.node for i in n.input}
    assert all(inits[n.input[0]].dtype == np.int32 and consumers[n.output[0]] == "Gemm" for n in others)
    # the conv output is quantized after its Relu so ORT can form QLinearConv
    assert any(n.input[0] == "r1" for n in q_nodes)


def test_shared_activation_gets_one_qdq_pair(attention_case, tmp_path):
    model, calib, evald = attention_case
    out = tmp_path / "q.onnx"
    res = onnxq.quantize(model, out, calib, eval=evald, target="tensorrt", quiet=True)
    m = onnx.load(out)
    q_on_x = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x"]
    assert len(q_on_x) == 1
    dq_out = next(n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q_on_x[0].output[0])
    assert len(_consumers(m, dq_out)) == 3  # Q, K and V projections
    # both operands of the activation×activation MatMuls are quantized
    by_out = {o: n for n in m.graph.node for o in n.output}
    qk = next(n for n in m.graph.node if n.name == "qk")
    assert all(by_out[i].op_type == "DequantizeLinear" for i in qk.input)
    # weights of MatMul [K, N] are per-channel on axis 1
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0].startswith("w"):
            assert next(a.i for a in n.attribute if a.name == "axis") == 1
    assert res.accuracy[0].cosine_mean > 0.999


def test_quantized_outputs_match_a_numpy_fake_quant(attention_case, tmp_path):
    """One MatMul quantized alone equals numpy's quantize-dequantize of its inputs."""
    model, calib, evald = attention_case
    out = tmp_path / "q.onnx"
    names = ["k_proj", "v_proj", "qk", "pv", "o_proj"]
    res = onnxq.quantize(model, out, calib, eval=evald, exclude=names, quiet=True)
    plan = res.plan
    assert [n for n, d in plan.nodes.items() if d.quantized] == ["q_proj"]
    x = np.load(evald)["x"][0:1]
    ref = onnx.load(model)
    w = {i.name: numpy_helper.to_array(i) for i in ref.graph.initializer}
    s_x = plan.activations["x"].scale
    xq = np.clip(np.rint(x / s_x), -128, 127) * s_x
    amax = np.abs(w["wq"]).max(axis=0)
    s_w = amax / 127
    wq = np.clip(np.rint(w["wq"] / s_w), -127, 127) * s_w
    import synthetic

    expected = synthetic.attention_reference(x, w, q=xq @ wq)
    got = create_session(out).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_plan_replay_with_an_edited_plan(cnn_case, tmp_path):
    model, calib, evald = cnn_case
    plan_path = tmp_path / "plan.json"
    onnxq.quantize(model, tmp_path / "a.onnx", calib, save_plan=plan_path, quiet=True)
    data = json.loads(plan_path.read_text())
    assert data["format"] == "onnxq.plan/2"
    assert data["nodes"]["conv2"]["precision"] == "int8"
    data["nodes"]["conv2"]["precision"] = "float"
    plan_path.write_text(json.dumps(data))
    onnxq.quantize(model, tmp_path / "b.onnx", calib, plan=plan_path, quiet=True)
    conv2 = next(n for n in _nodes(tmp_path / "b.onnx") if n.name == "conv2")
    assert conv2.input[1] == "w2"  # float weight kept
    by_out = {o: n for n in _nodes(tmp_path / "b.onnx") for o in n.output}
    assert by_out.get(conv2.input[0]) is None or by_out[conv2.input[0]].op_type != "DequantizeLinear"


def test_exclude_regex_and_unknown_pattern(attention_case, tmp_path):
    model, calib, _ = attention_case
    res = onnxq.quantize(model, tmp_path / "q.onnx", calib, exclude=[r"[qkv]_proj"], quiet=True)
    assert {n for n, d in res.plan.nodes.items() if not d.quantized} == {"q_proj", "k_proj", "v_proj"}
    with pytest.raises(onnxq.OnnxqError, match="matches no node"):
        onnxq.quantize(model, tmp_path / "r.onnx", calib, exclude=["no_such_node"], quiet=True)
    assert not (tmp_path / "r.onnx").exists()


def test_input_model_is_not_modified(cnn_case, tmp_path):
    model, calib, _ = cnn_case
    before = model.read_bytes()
    onnxq.quantize(model, tmp_path / "q.onnx", calib, quiet=True)
    assert model.read_bytes() == before


def test_report_json_written_beside_output(cnn_case, tmp_path):
    model, calib, evald = cnn_case
    out = tmp_path / "m.int8.onnx"
    onnxq.quantize(model, out, calib, eval=evald, quiet=True)
    report = json.loads((tmp_path / "m.int8.report.json").read_text())
    (logits,) = report["evaluation"]["outputs"]
    assert logits["name"] == "logits" and logits["samples"] == 8
    assert 0.99 < logits["cosine_mean"] <= 1.0
    assert report["calibration_samples"] == 16


def test_tied_embedding_head_is_quantized_per_channel_and_gather_stays_float(tmp_path):
    import synthetic

    # above constant folding's size limit, as SmolLM2's 28M-element head is, so the Transpose stays
    vocab, hidden = 4096, 288
    model = synthetic.save(synthetic.tied_embedding_lm(vocab=vocab, hidden=hidden), tmp_path / "lm.onnx")
    rng = np.random.default_rng(0)
    calib = [{"ids": rng.integers(0, vocab, (1, 8)).astype(np.int64)} for _ in range(8)]
    out = tmp_path / "q.onnx"
    res = onnxq.quantize(model, out, calib, quiet=True)
    m = onnx.load(out)
    inits = _inits(out)
    by_out = {o: n for n in m.graph.node for o in n.output}
    gather = next(n for n in m.graph.node if n.op_type == "Gather")
    assert gather.input[0] == "embed" and inits["embed"].dtype == np.float32
    head = next(n for n in m.graph.node if n.name == "lm_head")
    dq = by_out[head.input[1]]
    # DQ straight into the MatMul: the transposed int8 weight is an initializer, nothing transposes at run time
    assert dq.op_type == "DequantizeLinear"
    assert inits[dq.input[0]].dtype == np.int8 and inits[dq.input[0]].shape == (hidden, vocab)
    axis = next(a.i for a in dq.attribute if a.name == "axis")
    # output channels of the head are the vocabulary: axis 1 of the [hidden, vocab] operand
    assert axis == 1 and inits[dq.input[1]].shape == (vocab,)
    np.testing.assert_allclose(
        inits[dq.input[0]].astype(np.float32) * inits[dq.input[1]], inits["embed"].T, atol=float(inits[dq.input[1]].max())
    )
    assert not [n for n in m.graph.node if n.op_type == "Transpose"]  # the float Transpose is gone
    assert res.accuracy[0].cosine_mean > 0.999
