"""onnxq diff and onnxq inspect on synthetic models: INT8 from onnxq quantize, FP8/INT4/FP16 built by hand."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import synthetic
from onnxq.cli import main
from onnxq.diff import diff, format_html
from onnxq.inspect import inspect
from onnxq.pipeline import quantize


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def attention_int8(tmp_path_factory):
    """The FP32 attention model and two INT8 quantizations of it from the same data."""
    d = tmp_path_factory.mktemp("att")
    fp32 = synthetic.save(synthetic.tiny_attention(), d / "att.onnx")
    calib = synthetic.random_npz(d / "calib.npz", "x", (1, 16, 32), 8, seed=1)
    first = quantize(fp32, d / "a.int8.onnx", calib, quiet=True, report=False)
    quantize(fp32, d / "b.int8.onnx", calib, quiet=True, report=False)
    return fp32, d / "a.int8.onnx", d / "b.int8.onnx", first.plan


def test_same_inputs_twice_is_no_difference(attention_int8, capsys):
    _, a, b, _ = attention_int8
    code, out, _ = _run(capsys, "diff", a, b, "--format", "json")
    report = json.loads(out)
    assert code == 0 and report["equivalent"] is True
    assert report["counts"]["changed"] == report["counts"]["added"] == report["counts"]["removed"] == 0


def test_fp32_vs_int8_lists_every_quantized_layer_with_its_scales(attention_int8, capsys):
    fp32, a, _, plan = attention_int8
    code, out, _ = _run(capsys, "diff", fp32, a, "--format", "json")
    assert code == 1
    layers = {entry["name"]: entry for entry in json.loads(out)["layers"]}
    quantized = plan.quantized_nodes()
    assert quantized and set(quantized) <= set(layers)
    for name, decision in quantized.items():
        entry = layers[name]
        assert entry["status"] == "changed" and entry["precision"] == {"a": "FP32", "b": "INT8"}
        quant = entry["quantization"]["b"]
        assert entry["quantization"]["a"] == {}
        assert sorted(map(int, quant)) == sorted(decision.inputs)
        for index, kind in decision.inputs.items():
            q = quant[str(index)]
            assert q["kind"] == kind and q["dtype"] == "int8"
            if kind == "activation":
                tensor = q["source"]
                assert q["scale"] == pytest.approx(plan.activations[tensor].scale, rel=1e-6)
                assert q["zero_point"] == 0
            else:
                assert q["axis"] == 1 and q["scale"]["n"] == 32 and q["scale"]["min"] > 0
                # the initializer difference is the rounding error: at most half a step
                assert 0 < entry["weight_max_abs_diff"][str(index)] <= q["scale"]["max"] / 2 * (1 + 1e-6)
    # MACs all move from FP32 to INT8 (every MatMul is quantized here)
    summary = json.loads(out)["summary"]["macs_by_precision"]
    assert summary["a"] == {"FP32": 81920} and summary["b"] == {"INT8": 81920}


def _mixed_models(tmp_path):
    """A: x → MatMul m1 → MatMul m2 → MatMul m3 → y (FP32). B: m1 FP8 Q/DQ, m2 in an FP16 Cast region,
    m3 with an INT4 weight; the same weights."""
    rng = np.random.default_rng(0)
    w = {k: rng.normal(0, 0.2, (16, 16)).astype(np.float32) for k in ("w1", "w2", "w3")}
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])
    a_nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="m1"),
               helper.make_node("MatMul", ["h1", "w2"], ["h2"], name="m2"),
               helper.make_node("MatMul", ["h2", "w3"], ["y"], name="m3")]
    a = helper.make_model(helper.make_graph(a_nodes, "a", [x], [y], [numpy_helper.from_array(v, k) for k, v in w.items()]),
                          opset_imports=[helper.make_opsetid("", 21)], ir_version=10)

    f8 = TensorProto.FLOAT8E4M3FN
    s1 = np.float32(0.05)
    w1_scale = (np.abs(w["w1"]).max(axis=0) / 448).astype(np.float32)
    w3_scale = (np.abs(w["w3"]).max(axis=0) / 7).astype(np.float32)
    w3_q = np.clip(np.rint(w["w3"] / w3_scale), -8, 7).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(s1), "x_scale"),
        helper.make_tensor("x_zp", f8, [], [0]),
        numpy_helper.from_array(w1_scale, "w1_scale"),
        helper.make_tensor("w1_zp", f8, [16], [0] * 16),
        helper.make_tensor("w1_q", f8, [16, 16], (w["w1"] / w1_scale).ravel().tolist()),
        numpy_helper.from_array(w["w2"].astype(np.float16), "w2_fp16"),
        numpy_helper.from_array(w3_scale, "w3_scale"),
        helper.make_tensor("w3_zp", TensorProto.INT4, [16], [0] * 16),
        helper.make_tensor("w3_q", TensorProto.INT4, [16, 16], w3_q.ravel().tolist()),
    ]
    b_nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_dq"),
        helper.make_node("DequantizeLinear", ["w1_q", "w1_scale", "w1_zp"], ["w1_dq"], name="w1_dq", axis=1),
        helper.make_node("MatMul", ["x_dq", "w1_dq"], ["h1"], name="m1"),
        helper.make_node("Cast", ["h1"], ["h1_16"], name="to16", to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["h1_16", "w2_fp16"], ["h2_16"], name="m2"),
        helper.make_node("Cast", ["h2_16"], ["h2"], name="to32", to=TensorProto.FLOAT),
        helper.make_node("DequantizeLinear", ["w3_q", "w3_scale", "w3_zp"], ["w3_dq"], name="w3_dq", axis=1),
        helper.make_node("MatMul", ["h2", "w3_dq"], ["y"], name="m3"),
    ]
    b = helper.make_model(helper.make_graph(b_nodes, "b", [x], [y], inits),
                          opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(b, full_check=True)
    onnx.save(a, tmp_path / "a.onnx")
    onnx.save(b, tmp_path / "b.onnx")
    return tmp_path / "a.onnx", tmp_path / "b.onnx", w1_scale, w3_scale


def test_fp8_int4_and_fp16_regions_are_recognised(tmp_path):
    a, b, w1_scale, w3_scale = _mixed_models(tmp_path)
    result = diff(a, b)
    assert not result.equivalent
    by = {c.name: c for c in result.layers}
    assert [(by[n].a.precision, by[n].b.precision) for n in ("m1", "m2", "m3")] == [
        ("FP32", "FP8"), ("FP32", "FP16"), ("FP32", "INT4")]
    m1 = {i.index: i.quant for i in by["m1"].b.inputs}
    assert m1[0].dtype == "FLOAT8E4M3FN" and m1[0].kind == "activation" and float(m1[0].scale) == pytest.approx(0.05)
    assert m1[1].kind == "weight" and m1[1].axis == 1 and np.array_equal(m1[1].scale, w1_scale)
    m3 = {i.index: i.quant for i in by["m3"].b.inputs}
    assert m3[1].dtype == "INT4" and np.array_equal(m3[1].scale, w3_scale)
    # the INT4 weight's dequantized values differ from the float ones by at most half a step
    assert 0 < by["m3"].weight_max_abs_diff[1] <= float(w3_scale.max()) / 2 + 1e-6
    # the FP16 weight differs by its rounding: a constant-value change on a float input
    assert any("constant values changed" in n for n in by["m2"].changes)
    macs = result.summary["macs_by_precision"]
    assert macs["a"] == {"FP32": 3 * 2 * 16 * 16}
    assert macs["b"] == {"INT4": 512, "FP8": 512, "FP16": 512}
    info = inspect(b)
    assert info["qdq_by_precision"] == {"Cast FLOAT": 1, "Cast FLOAT16": 1, "DQ FP8": 2, "DQ INT4": 1, "Q FP8": 1}
    assert info["layers_by_precision"] == {"INT4": 1, "FP8": 1, "FP16": 1}


def test_changed_weight_attribute_and_added_node(tmp_path, capsys):
    base = synthetic.tiny_attention()
    a = synthetic.save(base, tmp_path / "a.onnx")
    m = onnx.ModelProto()
    m.CopyFrom(base)
    wq = next(i for i in m.graph.initializer if i.name == "wq")
    arr = numpy_helper.to_array(wq).copy()
    arr[3, 4] += 0.25
    wq.CopyFrom(numpy_helper.from_array(arr, "wq"))
    softmax = next(n for n in m.graph.node if n.name == "softmax")
    softmax.attribute[0].i = 1
    out = m.graph.node[-1]
    out.output[0] = "y_pre"
    m.graph.node.append(helper.make_node("Relu", ["y_pre"], ["y"], name="extra_relu"))
    b = synthetic.save(m, tmp_path / "b.onnx")
    code, text, _ = _run(capsys, "diff", a, b)
    assert code == 1
    assert re.search(r"~ q_proj .*\n\s+input 1 constant values changed \(max abs diff 0\.25\)", text)
    assert "attributes axis: -1 -> 1" in text
    assert "+ extra_relu (Relu)" in text and "1 added, 0 removed" in text


def test_structure_matches_renamed_nodes(tmp_path):
    base = synthetic.tiny_attention()
    m = onnx.ModelProto()
    m.CopyFrom(base)
    for n in m.graph.node:
        n.name = "renamed_" + n.name
    result = diff(synthetic.save(base, tmp_path / "a.onnx"), synthetic.save(m, tmp_path / "b.onnx"))
    assert result.equivalent and len(result.layers) == 10
    assert all(c.name_b == "renamed_" + c.name_a for c in result.layers)


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_html_is_one_self_contained_collapsible_page(attention_int8, tmp_path, capsys):
    fp32, a, _, plan = attention_int8
    out = tmp_path / "diff.html"
    code, _, _ = _run(capsys, "diff", fp32, a, "--format", "html", "-o", out)
    assert code == 1
    page = out.read_text()
    parser = _Tags()
    parser.feed(page)
    tags = [t for t, _ in parser.tags]
    assert tags.count("details") == len(diff(fp32, a).layers) == tags.count("summary")
    changed = [attrs for t, attrs in parser.tags if t == "details" and attrs.get("data-status") == "changed"]
    assert len(changed) == len(plan.quantized_nodes())
    assert "style" in tags and not any(t in ("script", "link", "img") for t in tags)
    assert not re.search(r"(src|href)=\"?https?:", page)
    assert page.count('class="side"') == tags.count("details")  # A | B side by side per layer
    assert format_html(diff(a, a)).count('data-status="same"') == 10


def test_inspect_counts(attention_int8, capsys):
    fp32, a, _, plan = attention_int8
    code, out, _ = _run(capsys, "inspect", a, "--format", "json")
    info = json.loads(out)
    model = onnx.load(a)
    assert code == 0
    assert info["parameters"]["count"] == sum(int(np.prod(i.dims)) for i in model.graph.initializer)
    assert info["op_histogram"]["QuantizeLinear"] == info["qdq_by_precision"]["Q INT8"]
    assert sum(info["op_histogram"].values()) == len(model.graph.node)
    assert info["inputs"] == [{"name": "x", "dtype": "float", "shape": [1, 16, 32]}]
    assert info["opsets"]["ai.onnx"] == 17 and info["ir_version"] == model.ir_version
    code, text, _ = _run(capsys, "inspect", fp32)
    assert code == 0 and "MatMul" in text and "x: float[1, 16, 32]" in text


def test_bad_diff_input_exits_2(tmp_path, capsys):
    code, _, err = _run(capsys, "diff", tmp_path / "missing.onnx", tmp_path / "b.onnx")
    assert code == 2 and err.startswith("onnxq: error:") and "no such file" in err


def test_blocked_int4_weight_dequantizes_per_block():
    from onnxq.layers import QuantParams, _dequantize

    q = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
    scale = np.array([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]], np.float32)  # blocks of 2 rows
    params = QuantParams("weight", "INT4", scale, None, 0, "w", block_size=2)
    expected = q.astype(np.float32) * np.repeat(scale, 2, axis=0)
    np.testing.assert_array_equal(_dequantize(q, params), expected)
