"""onnxq check on a real zoo model (the 6-layer SmolLM2): FP32 vs its INT8 models for both targets,
the three report formats, the zoo task metric, and per-layer SNR."""

import json

import pytest

pytestmark = pytest.mark.zoo
pytest.importorskip("torch", reason="the zoo exports PyTorch models: install the zoo extra")

from onnxq import zoo  # noqa: E402
from onnxq.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def smollm_case(tmp_path_factory):
    import numpy as np

    import onnxq

    case = tmp_path_factory.mktemp("smollm2-6l")
    entry = zoo.get("smollm2-6l")
    files = {"model": entry.onnx_path(), "eval": case / "eval.npz"}  # the cached export, not a copy
    np.savez(files["eval"], **entry.eval_data(2))
    calib = entry.calib_data(4)
    feeds = [{k: v[i : i + 1] for k, v in calib.items()} for i in range(4)]
    models = []
    for target in ("tensorrt", "ort"):
        out = case / f"model.{target}.onnx"
        onnxq.quantize(files["model"], out, feeds, target=target, evaluate=False, report=False, quiet=True)
        models.append(out)
    return files, models


def test_check_smollm2_both_targets_three_formats(smollm_case, tmp_path):
    files, models = smollm_case
    base = tmp_path / "report"
    code = main(["check", str(files["model"]), *map(str, models), "--data", str(files["eval"]), "--samples", "2",
                 "--runs", "2", "--warmup", "1", "--layers", "--layer-samples", "1", "--zoo", "smollm2-6l",
                 "--zoo-samples", "2", "--min-cosine", "0.5", "-q", "-o", str(base)])
    assert code == 0
    report = json.loads(base.with_suffix(".json").read_text())
    assert [c["kind"] for c in report["candidates"]] == ["onnx", "onnx"]
    for cand in report["candidates"]:
        (logits,) = cand["outputs"]
        assert logits["name"] == "logits" and logits["samples"] == 2
        assert 0.5 < logits["top1_agreement"] <= 1 and logits["top5_agreement"] >= logits["top1_agreement"]
        assert cand["task_metric"]["top1_agreement"] > 0.5
        layers = cand["layers"]
        assert len(layers) > 20  # every decoder MatMul input of 6 layers
        snrs = [layer["snr_local_db"] for layer in layers]
        assert snrs == sorted(snrs)
        assert cand["latency"][0]["runs"] == 2
    assert report["task_metric_reference"] is not None
    html = base.with_suffix(".html").read_text()
    assert html.count("<svg") == 2 and "Per-layer SNR" in html
    assert "| logits |" in base.with_suffix(".md").read_text()
