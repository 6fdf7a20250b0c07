"""Replay is exact on real models: ``quantize --plan`` rebuilds, byte for byte, the model whose
run wrote the plan, with SmoothQuant auto, split outliers and FP16 high-precision regions."""

import pytest

from onnxq.cli import main

pytestmark = pytest.mark.zoo
pytest.importorskip("torch", reason="the zoo exports PyTorch models: install the zoo extra")

from onnxq import zoo  # noqa: E402


@pytest.mark.parametrize("name, samples", [("minilm-l6-v2", 8), ("smollm2-6l", 4)])
def test_plan_replays_byte_for_byte(tmp_path, name, samples):
    case = zoo.export_case(name, tmp_path / "case", n_calib=samples, n_eval=2)
    first, again, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "plan.json"
    recipe = ["--smoothquant", "auto", "--split-outliers", "16", "--high-precision", "fp16", "--calib-method", "minmax"]
    assert main(["quantize", str(case["model"]), "-o", str(first), "--calib", str(case["calib"]), "--save-plan", str(plan), "--no-eval", "-q", *recipe]) == 0
    assert main(["quantize", str(case["model"]), "-o", str(again), "--plan", str(plan), "--no-eval", "-q"]) == 0
    assert first.read_bytes() == again.read_bytes()
