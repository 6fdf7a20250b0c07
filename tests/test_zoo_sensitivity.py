"""The solver on a real zoo model: an INT8 MiniLM below a cosine target is brought above it by
keeping the layers the sweep ranks most sensitive in float, and the plan replays."""

import pytest

import onnxq

pytestmark = pytest.mark.zoo
pytest.importorskip("torch", reason="the zoo exports PyTorch models: install the zoo extra")

from onnxq import zoo  # noqa: E402
from onnxq.zoo.metrics import metric_spec  # noqa: E402

TARGET = 0.99


def _feeds(arrays):
    n = len(next(iter(arrays.values())))
    return [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(n)]


def test_solver_meets_a_cosine_target_on_minilm(tmp_path):
    entry = zoo.get("minilm-l6-v2")
    model = entry.onnx_path()
    calib, evald = _feeds(entry.calib_data(8)), _feeds(entry.eval_data(8))
    swept = onnxq.sweep(model, calib, tmp_path / "sweep.json", eval=calib, precisions="int8", quiet=True, plot=False)
    assert len(swept.layers) == 36  # 6 x (QKV, Q·Kᵀ, P·V, out, FFN up, FFN down)
    result = onnxq.solve(tmp_path / "sweep.json", model, calib, tmp_path / "plan.json", eval=evald, target_cosine=TARGET, quiet=True)
    assert result.candidates[0]["high_precision_layers"] == 0 and result.candidates[0]["accuracy"] < TARGET
    assert result.chosen["accuracy"] >= TARGET
    assert 0 < result.chosen["high_precision_layers"] < len(result.order)
    assert 0 < result.chosen["matmul_macs_8bit_fraction"] < 1
    replay = onnxq.quantize(model, tmp_path / "mixed.onnx", calib, eval=evald, plan=tmp_path / "plan.json", quiet=True, report=False)
    assert replay.accuracy[0].cosine_mean == pytest.approx(result.chosen["cosine"], abs=1e-6)


def test_solver_meets_smollm2s_agreement_target_with_most_macs_in_8_bits(tmp_path):
    """Issue 5's bar: SmolLM2-6l next-token agreement >= 0.97 with >= 80 % of MatMul MACs in 8 bits
    (INT8 or FP8). Its LM head holds 56 % of them, so the head has to stay in 8 bits: SmoothQuant
    with outlier channels split off makes that possible (the head alone: 0.9595 -> 0.9878).
    Measured with this local sweep: 0.9727 with 16 layers in float, 84.3 % of MACs in 8 bits."""
    entry = zoo.get("smollm2-6l")
    model = entry.onnx_path()
    calib, evald = _feeds(entry.calib_data()), _feeds(entry.eval_data())
    onnxq.sweep(model, calib, tmp_path / "sweep.json", eval=evald, smoothquant="auto", split_outliers=16, method="minmax", quiet=True, plot=False)
    result = onnxq.solve(
        tmp_path / "sweep.json", model, calib, tmp_path / "plan.json", eval=evald, metric=metric_spec("smollm2-6l"),
        target_metric="top1_agreement>=0.97", min_8bit_macs=0.8, save_model=tmp_path / "mixed.onnx", quiet=True, plot=False,
    )
    assert result.candidates[0]["accuracy"] < 0.97  # all layers in 8 bits do not meet it
    assert result.chosen["accuracy"] >= 0.97 and result.chosen["matmul_macs_8bit_fraction"] >= 0.8
    assert "node_linear_42" not in result.chosen["promoted"]  # the LM head stays in 8 bits
    # the saved model is the one measured
    assert entry.evaluate(tmp_path / "mixed.onnx")["top1_agreement"] == pytest.approx(result.chosen["accuracy"], abs=1e-9)
    # and its plan rebuilds that model byte for byte (SmoothQuant, split channels, FP8 opset)
    replay = tmp_path / "replay.onnx"
    onnxq.quantize(model, replay, plan=tmp_path / "plan.json", evaluate=False, report=False, quiet=True)
    assert replay.read_bytes() == (tmp_path / "mixed.onnx").read_bytes()
