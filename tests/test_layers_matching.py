"""check --layers matches the quantizers of FP16-region and SmoothQuant models to their float
tensors, compares rescaled tensors after undoing the scale, and lists what it cannot match."""

import json

import onnx
import pytest

import onnxq
from onnxq import modelio
from onnxq.check import check
from onnxq.data import open_source
from onnxq.localize import layer_snr
from onnxq.runtime import ort as ort_rt

CASES = {
    "fp16 regions": dict(high_precision="fp16"),
    "smoothquant folded": dict(smoothquant=0.5),
    "smoothquant inserted, split": dict(smoothquant="auto", split_outliers=2),
}


def _activation_quantizers(path) -> int:
    proto = onnx.load(str(path))
    constants = {i.name for i in proto.graph.initializer}
    return sum(1 for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants)


@pytest.mark.parametrize("case", CASES)
def test_every_quantizer_is_matched_and_compared_unscaled(decoder_case, tmp_path, case):
    model, calib, evald = decoder_case
    out = tmp_path / "q.onnx"
    onnxq.quantize(model, out, calib, quiet=True, **CASES[case])
    feeds = list(open_source(evald, ort_rt.model_input_spec(modelio.load(model))))
    layers = layer_snr(model, out, feeds, progress=False)
    assert layers.unmatched == [] and layers.matched == layers.total == _activation_quantizers(out)
    for s in layers.stats:
        # The error at the DQ is the upstream error plus this quantizer's own; independent noises
        # add. Compared with an unscaled float tensor the DQ's SNR would be a few dB.
        added = 10 ** (-s.snr_local_db / 10) + 10 ** (-s.snr_input_db / 10)
        assert 10 ** (-s.snr_dq_db / 10) == pytest.approx(added, rel=0.5), s.to_json()
        assert s.snr_input_db > 12, s.to_json()
    # h_norm (a LayerNorm of the input) has no quantizer upstream: the quantized graph's tensor,
    # scale undone, equals the float one to rounding (a few dB if compared unscaled).
    first = next(s for s in layers.stats if s.pair.float_tensor == "h_norm")
    assert first.snr_input_db > 60 and first.snr_dq_db == pytest.approx(first.snr_local_db, abs=0.01)
    if case.startswith("smoothquant"):
        assert any(s.pair.multiplier is not None for s in layers.stats)


def test_unmatched_quantizers_are_listed_with_the_reason(decoder_case, tmp_path):
    model, calib, evald = decoder_case
    onnxq.quantize(model, tmp_path / "q.onnx", calib, quiet=True)
    proto = onnx.load(str(tmp_path / "q.onnx"))
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "ctx")
    proto.graph.node.insert(list(proto.graph.node).index(q), onnx.helper.make_node("Neg", ["ctx"], ["ctx_renamed"], name="renamer"))
    q.input[0] = "ctx_renamed"
    onnx.save(proto, str(tmp_path / "odd.onnx"))
    report = check(model, [tmp_path / "odd.onnx"], evald, latency=False, layers=True, progress=False)
    layers = report.candidates[0].to_json()["layers_matched"]
    assert layers["unmatched"] == [{"tensor": "ctx_renamed", "reason": "made by Neg 'renamer', which the float model does not have"}]
    assert layers["matched"] == layers["total"] - 1 == len(report.candidates[0].layers.stats)
    assert json.dumps(report.to_json())  # the report stays JSON


def test_equalized_tensors_are_compared_after_undoing_the_scale(tmp_path):
    from synthetic import random_npz, save
    from test_equalization import mobile_block

    model = save(mobile_block(), tmp_path / "block.onnx")
    calib = random_npz(tmp_path / "calib.npz", "x", (1, 16, 12, 12), 16, seed=1)
    evald = random_npz(tmp_path / "eval.npz", "x", (1, 16, 12, 12), 8, seed=2)
    plain, equalized = tmp_path / "plain.onnx", tmp_path / "eq.onnx"
    onnxq.quantize(model, plain, calib, quiet=True)
    onnxq.quantize(model, equalized, calib, equalize=True, quiet=True)
    feeds = list(open_source(evald, ort_rt.model_input_spec(modelio.load(model))))
    stats = {p: {s.pair.tensor: s for s in layer_snr(model, p, feeds, progress=False)} for p in (plain, equalized)}
    rescaled = [t for t, s in stats[equalized].items() if s.pair.multiplier is not None]
    assert rescaled
    for t in rescaled:  # equalization changes the rounding, not the scale of the comparison
        assert stats[equalized][t].snr_dq_db == pytest.approx(stats[plain][t].snr_dq_db, abs=6), t
