"""Cross-layer equalization and bias correction on EfficientNet-Lite0: the equalized float model
computes the same function (ReLU6 pairs rescaled too), and bias correction raises INT8's logit
cosine against FP32 on the held-out photos."""

import numpy as np
import onnx
import pytest

from onnxq import modelio
from onnxq.emit import emit
from onnxq.equalization import plan_equalization
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.pipeline import quantize
from onnxq.plan import QuantPlan
from onnxq.runtime import ort as ort_rt

pytestmark = pytest.mark.zoo
pytest.importorskip("torch", reason="the zoo exports PyTorch models: install the zoo extra")

from onnxq import zoo  # noqa: E402


def _logits(proto, images):
    session = ort_rt.create_session(proto)
    return np.concatenate([session.run(None, {"image": images[i : i + 1]})[0] for i in range(len(images))])


@pytest.mark.parametrize("clips", ["skip", "rescale"])
def test_equalized_efficientnet_computes_the_same_logits(clips):
    entry = zoo.get("efficientnet-lite0")
    model = load_and_preprocess(entry.onnx_path())
    plan = QuantPlan(target="tensorrt")
    plan.equalization = plan_equalization(model, clips=clips)
    assert len(plan.equalization.pairs) >= (30 if clips == "rescale" else 2)
    emit(model, plan, ["equalize"])
    images = entry.eval_data(8)["image"]
    reference = _logits(onnx.load(entry.onnx_path()), images)
    got = _logits(modelio.to_proto(model), images)
    assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max()


def test_bias_correction_raises_int8_logit_cosine(tmp_path):
    entry = zoo.get("efficientnet-lite0")
    np.savez(tmp_path / "calib.npz", **entry.calib_data(16))
    cosine = {}
    for corrected in (False, True):
        out = tmp_path / f"q_{corrected}.onnx"
        quantize(entry.onnx_path(), out, tmp_path / "calib.npz", bias_correction=corrected, report=False, evaluate=False, quiet=True)
        cosine[corrected] = entry.evaluate(out, entry.onnx_path(), n=40)["logit_cosine"]
    assert cosine[True] > cosine[False] + 0.001, cosine


def test_measured_depthwise_placement_reaches_the_int8_target(tmp_path):
    """tensorrt INT8, minmax ranges, bias correction, depthwise convs below 34 dB of their own
    SNR kept float: logit cosine >= 0.997 and top-1 agreement >= 0.98 on the 80 photo views."""
    entry = zoo.get("efficientnet-lite0")
    np.savez(tmp_path / "calib.npz", **entry.calib_data(32))
    out = tmp_path / "q.onnx"
    result = quantize(entry.onnx_path(), out, tmp_path / "calib.npz", calib_method="minmax", bias_correction=True, depthwise_min_snr=34, report=False, evaluate=False, quiet=True)
    floated = [n for n, d in result.plan.nodes.items() if d.reason.startswith("measured")]
    assert 0 < len(floated) < len(result.plan.local_snr) / 2, floated
    metrics = entry.evaluate(out, entry.onnx_path())
    assert metrics["logit_cosine"] >= 0.997 and metrics["top1_agreement"] >= 0.98, metrics
