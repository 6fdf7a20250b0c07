"""onnxq check: accuracy statistics, thresholds and exit codes, per-layer SNR through Q/DQ pairs, and
the three report formats (HTML structure, not pixels)."""

import json
from html.parser import HTMLParser

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import synthetic
from onnxq.check import check
from onnxq.metrics import OutputAccuracy
from onnxq.cli import main
from onnxq.data import open_source
from onnxq.localize import layer_snr, match_pairs
from onnxq.pipeline import quantize


class _Structure(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: dict[str, int] = {}
        self.ids: set[str] = set()
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for key in ("src", "href"):
            if attrs.get(key) and not attrs[key].startswith(("data:", "#")):
                self.external.append(attrs[key])


def _html_structure(path):
    parser = _Structure()
    parser.feed(path.read_text())
    return parser


def _corrupt_weights(src, dst):
    """The quantized model with its largest int8 weight negated and scrambled (a broken artifact)."""
    model = onnx.load(str(src))
    weights = [i for i in model.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) >= 2]
    target = max(weights, key=lambda i: int(np.prod(i.dims)))
    arr = numpy_helper.to_array(target)
    rng = np.random.default_rng(0)
    broken = rng.permutation(arr.ravel()).reshape(arr.shape) * np.int8(-1)
    target.CopyFrom(numpy_helper.from_array(broken.astype(np.int8), target.name))
    onnx.save(model, str(dst))
    return dst


@pytest.fixture
def cnn_quantized(cnn_case, tmp_path):
    model, calib, evald = cnn_case
    good = tmp_path / "cnn.int8.onnx"
    quantize(model, good, calib, eval=evald, quiet=True)
    return model, good, _corrupt_weights(good, tmp_path / "cnn.broken.onnx"), evald


def test_output_accuracy_topk_and_histogram():
    acc = OutputAccuracy("logits")
    ref = np.zeros((2, 3, 20), np.float32)
    ref[..., 0] = 5.0  # class 0 wins everywhere
    cand = ref.copy()
    cand[0, 0, 0] = 1.0
    cand[0, 0, 7] = 9.0  # one row's top-1 moves to class 7; class 0 stays second
    cand[0, 1, 0] = -1.0
    cand[0, 1, 1:6] = 1.0  # another row: class 0 drops out of the top-5
    acc.update(ref, cand)
    assert acc.top1_agreement == pytest.approx(4 / 6)
    assert acc.top5_agreement == pytest.approx(5 / 6)
    h = acc.error_histogram()
    assert sum(h["counts"]) + h["exact"] + h["below"] + h["above"] == ref.size
    assert h["exact"] == ref.size - 8  # two elements changed in one row, six in the other
    assert acc.max_abs_error == pytest.approx(9.0)
    # an embedding is not classifier-shaped: no top-k
    emb = OutputAccuracy("embedding")
    emb.update(ref[0], cand[0])
    assert emb.top1_agreement is None and "top1_agreement" not in emb.to_json()


def test_check_passing_and_broken_candidates_exit_codes(cnn_quantized, tmp_path, capsys):
    model, good, broken, evald = cnn_quantized
    base = tmp_path / "good"
    args = ["check", str(model), str(good), "--data", str(evald), "--runs", "3", "--warmup", "1", "-q",
            "--min-cosine", "0.99", "--min-snr", "20"]
    assert main(args + ["-o", str(base)]) == 0
    report = json.loads((tmp_path / "good.json").read_text())
    assert report["passed"] and report["candidates"][0]["passed"]
    (out,) = report["candidates"][0]["outputs"]
    assert out["cosine_mean"] > 0.99 and out["snr_db"] > 20 and out["top1_agreement"] > 0.5

    bad_args = ["check", str(model), str(broken), "--data", str(evald), "--runs", "3", "--warmup", "1", "-q",
                "--min-cosine", "0.99", "--min-snr", "20", "-o", str(tmp_path / "bad")]
    assert main(bad_args) == 1
    bad = json.loads((tmp_path / "bad.json").read_text())
    assert not bad["passed"]
    assert any("cosine" in f for f in bad["candidates"][0]["failures"])
    assert "FAIL" in (tmp_path / "bad.md").read_text()
    # both candidates in one run: the run fails, the good one still passes
    assert main(["check", str(model), str(good), str(broken), "--data", str(evald), "--no-latency", "-q",
                 "--min-snr", "20", "-o", str(tmp_path / "both")]) == 1
    both = json.loads((tmp_path / "both.json").read_text())
    assert [c["passed"] for c in both["candidates"]] == [True, False]


def test_latency_threshold_and_report_contents(cnn_quantized, tmp_path):
    model, good, _, evald = cnn_quantized
    # no model runs in zero time: a ratio bound of 1e-9 must fail
    assert main(["check", str(model), str(good), "--data", str(evald), "--runs", "3", "--warmup", "1", "-q",
                 "--batch", "1", "--max-latency-ratio", "1e-9", "--threads", "1", "-o", str(tmp_path / "r")]) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    cand = report["candidates"][0]
    assert any("latency ratio" in f for f in cand["failures"])
    assert report["threads"] == 1 and report["environment"]["intra_op_threads"] == 1
    (lat,) = cand["latency"]
    assert lat["runs"] == 3 and lat["median_ms"] <= lat["p90_ms"] <= lat["p99_ms"]


def test_html_report_is_self_contained_with_plots(cnn_quantized, tmp_path):
    model, good, broken, evald = cnn_quantized
    assert main(["check", str(model), str(good), str(broken), "--data", str(evald), "--runs", "3", "--warmup", "1",
                 "-q", "--layers", "-o", str(tmp_path / "r")]) == 0
    s = _html_structure(tmp_path / "r.html")
    assert s.tags.get("svg", 0) == 2  # one output's error distribution + latency bars
    assert s.tags.get("figure", 0) == 2
    assert s.tags.get("table", 0) >= 2 + 2  # accuracy, latency, one layer table per candidate
    assert "verdict" in s.ids and not s.external  # nothing loaded from elsewhere
    md = (tmp_path / "r.md").read_text()
    assert "## Accuracy" in md and "## Latency" in md and "## Per-layer SNR" in md


def test_check_errors_exit_2(cnn_quantized, tmp_path, capsys):
    model, good, _, evald = cnn_quantized
    assert main(["check", str(model), str(tmp_path / "nope.onnx"), "--data", str(evald), "-o", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["check", str(model), "--engine", str(good), "--data", str(evald), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    from onnxq.runtime.tensorrt import unavailable_reason

    if unavailable_reason() is not None:
        assert "cannot run the TensorRT engine" in err
    assert main(["check", str(model), str(good), "--data", str(evald), "--providers", "cuda", "-o", str(tmp_path / "x")]) == 2
    assert "CUDAExecutionProvider" in capsys.readouterr().err
    assert main(["check", str(model), str(good), "--data", str(evald), "--batch", "4", "-o", str(tmp_path / "x")]) == 2
    assert "fixed batch dimension" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def _folded_relu_models(tmp_path):
    """float: x → Conv → c → Relu → r → Conv → y; quantized: the Relu folded into c's UINT8 Q (zero point 0)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 1, 1)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "w2")
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])])
    float_graph = helper.make_graph([
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ], "f", *io, [w1, w2])
    scale = numpy_helper.from_array(np.array(0.02, np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, np.uint8), "zp")
    quant_graph = helper.make_graph([
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"),
        helper.make_node("QuantizeLinear", ["c", "s", "zp"], ["c_q"], name="q"),
        helper.make_node("DequantizeLinear", ["c_q", "s", "zp"], ["c_dq"], name="dq"),
        helper.make_node("Conv", ["c_dq", "w2"], ["y"], name="conv2"),
    ], "q", *io, [w1, w2, scale, zp])
    paths = []
    for g, name in ((float_graph, "f.onnx"), (quant_graph, "q.onnx")):
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=synthetic.IR_VERSION)
        onnx.save(m, str(tmp_path / name))
        paths.append(tmp_path / name)
    data = synthetic.random_npz(tmp_path / "d.npz", "x", (1, 4, 6, 6), 4, seed=3)
    return *paths, data


def test_layers_compare_dq_with_the_relu_output_when_folded(tmp_path):
    import onnx_ir as ir

    f, q, data = _folded_relu_models(tmp_path)
    (pair,) = match_pairs(ir.load(f), ir.load(q))
    assert (pair.tensor, pair.float_ref, pair.dq_output, pair.consumers) == ("c", "r", "c_dq", ["conv2"])
    (stat,) = layer_snr(f, q, open_source(data, {"x": (np.float32, [1, 4, 6, 6])}), progress=False)
    assert stat.samples == 4
    # DQ(Q(c)) with a UINT8 zero point of 0 is relu(c) rounded: close to r, far from c
    assert stat.snr_dq_db > 25
    assert stat.snr_input_db == float("inf")  # c itself is computed identically in both graphs
    assert stat.snr_local_db == pytest.approx(stat.snr_dq_db)  # so all the error is this pair's own


def test_layers_sorted_ascending_and_bounded_to_qdq_pairs(attention_case, tmp_path):
    model, calib, evald = attention_case
    out = tmp_path / "att.int8.onnx"
    quantize(model, out, calib, quiet=True, evaluate=False, report=False)
    stats = layer_snr(model, out, open_source(evald, {"x": (np.float32, [1, 16, 32])}), progress=False)
    local = [s.snr_local_db for s in stats]
    assert local == sorted(local) and len(stats) >= 4
    n_act_q = sum(1 for n in onnx.load(str(out)).graph.node if n.op_type == "QuantizeLinear")
    assert len(stats) <= n_act_q
    # error accumulates downstream: the graph input's own quantization is the cleanest step
    by_tensor = {s.pair.tensor: s for s in stats}
    assert by_tensor["x"].snr_input_db == float("inf")
    assert by_tensor["x"].snr_dq_db == max(s.snr_dq_db for s in stats)
    # the local SNR isolates each pair: it is never below the accumulated one by more than rounding
    for s in stats:
        assert s.snr_local_db >= s.snr_dq_db - 3


def test_check_api_streams_an_iterable(cnn_quantized):
    model, good, _, evald = cnn_quantized
    feeds = [{"x": np.random.default_rng(i).normal(size=(1, 16, 8, 8)).astype(np.float32)} for i in range(3)]
    report = check(model, [good], feeds, latency=False, progress=False)
    assert report.samples == 3 and report.reference_latency == []
    assert report.candidates[0].outputs[0].samples == 3
