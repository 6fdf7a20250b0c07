"""The solver on a real zoo model: an INT8 MiniLM below a cosine target is brought above it by
keeping the layers the sweep ranks most sensitive in float, and the plan replays."""

import pytest

import onnxq

pytestmark = pytest.mark.zoo
pytest.importorskip("torch", reason="the zoo exports PyTorch models: install the zoo extra")

from onnxq import zoo  # noqa: E402

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
