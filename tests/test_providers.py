"""--providers: ONNX Runtime provider selection with fallback. This machine has no GPU and the CPU
build of onnxruntime, so the GPU providers' presence is simulated; the sessions' providers are
checked on the CPU build."""

import logging

import onnxruntime as ort
import pytest
import synthetic

from onnxq.errors import OnnxqError
from onnxq.recipe import PROVIDERS, Recipe, RecipeError
from onnxq.runtime import ort as ort_rt
from onnxq.runtime.ort import PROVIDER_ALIASES, create_session, select_providers, use_providers

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_preferred_order_kept_where_available():
    assert select_providers(["cuda", "cpu"], have=GPU_BUILD) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(["tensorrt", "cuda"], have=GPU_BUILD) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_missing_provider_falls_back_to_cpu_with_a_message(caplog):
    with caplog.at_level(logging.INFO, logger="onnxq"):
        chosen = select_providers(["cuda"], have=["CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider is not available" in caplog.text and "falling back" in caplog.text


def test_unknown_provider_is_an_error():
    with pytest.raises(OnnxqError, match="unknown provider 'rocm'"):
        select_providers(["rocm"], have=GPU_BUILD)
    with pytest.raises(RecipeError, match="unknown provider 'rocm'"):
        Recipe.from_options({"providers": "cuda,rocm"})


def test_recipe_takes_a_comma_list():
    assert Recipe.from_options({"providers": "CUDA, cpu"}).providers == ("cuda", "cpu")
    assert set(PROVIDERS) == set(PROVIDER_ALIASES)


def test_sessions_in_the_block_use_the_selection(tmp_path, monkeypatch):
    path = synthetic.save(synthetic.residual_cnn(), tmp_path / "m.onnx")
    monkeypatch.setattr(ort_rt.ort, "get_available_providers", lambda: GPU_BUILD)
    seen = []
    real = ort.InferenceSession

    def recording(source, sess_options=None, providers=None):
        seen.append(list(providers))
        return real(source, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort_rt.ort, "InferenceSession", recording)
    with use_providers(["cuda", "cpu"]):
        create_session(path)
    create_session(path)
    assert seen == [["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]]


def test_quantize_runs_on_the_available_providers(tmp_path, caplog):
    from onnxq.pipeline import quantize

    path = synthetic.save(synthetic.residual_cnn(), tmp_path / "m.onnx")
    npz = synthetic.random_npz(tmp_path / "c.npz", "x", (1, 16, 8, 8), 4)
    with caplog.at_level(logging.INFO, logger="onnxq"):
        quantize(path, tmp_path / "q.onnx", npz, providers="cuda,cpu", report=False)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "CUDAExecutionProvider is not available" in caplog.text
    assert "ONNX Runtime providers:" in caplog.text
