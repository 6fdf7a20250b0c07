"""onnxq build: option parsing, optimization profiles and the manifest (no TensorRT needed), the
one-line error without TensorRT, and a real engine build where TensorRT and a GPU exist."""

import hashlib
import json

import numpy as np
import pytest

import synthetic
from onnxq.cli import main
from onnxq.errors import OnnxqError
from onnxq.runtime import tensorrt as trt_rt

TRT_MISSING = trt_rt.unavailable_reason()


def test_parse_shapes_reads_min_opt_max():
    (ids,) = trt_rt.parse_shapes(["input_ids:1x16,1x128,8x128"])
    assert (ids.name, ids.min, ids.opt, ids.max) == ("input_ids", (1, 16), (1, 128), (8, 128))
    # names may contain colons (ONNX allows them); the last colon separates the shapes
    (odd,) = trt_rt.parse_shapes(["ns:x:1,2,3"])
    assert odd.name == "ns:x" and odd.max == (3,)


@pytest.mark.parametrize("spec, words", [
    ("input_ids", "NAME:MIN,OPT,MAX"),
    ("x:1x2,1x2", "three shapes"),
    ("x:1x2,1x2x3,1x2", "ranks"),
    ("x:4x2,1x2,8x2", "MIN <= OPT <= MAX"),
    ("x:1xa,1x2,1x2", "positive dimensions"),
    ("x:0x2,1x2,1x2", "positive dimensions"),
])
def test_parse_shapes_rejects_bad_specs(spec, words):
    with pytest.raises(OnnxqError, match=words):
        trt_rt.parse_shapes([spec])


def test_parse_shapes_rejects_an_input_given_twice():
    with pytest.raises(OnnxqError, match="twice"):
        trt_rt.parse_shapes(["x:1,1,2", "x:1,2,2"])


def test_parse_size():
    assert trt_rt.parse_size("512M") == 512 << 20
    assert trt_rt.parse_size("2G") == 2 << 30
    assert trt_rt.parse_size("4096") == 4096
    with pytest.raises(OnnxqError, match="512M"):
        trt_rt.parse_size("lots")


def test_profile_is_polygraphys():
    from polygraphy.backend.trt import Profile

    profile = trt_rt.make_profile(trt_rt.parse_shapes(["input_ids:1x16,1x128,8x128", "mask:1x16,1x128,8x128"]))
    assert isinstance(profile, Profile)
    assert list(profile) == ["input_ids", "mask"]
    assert tuple(profile["input_ids"]) == ((1, 16), (1, 128), (8, 128))
    assert trt_rt.make_profile([]) is None


def test_shapes_checked_against_the_model():
    inputs = {"input_ids": [None, None], "pixels": [1, 3, 8, 8]}
    ids = trt_rt.parse_shapes(["input_ids:1x16,1x128,8x128"])
    trt_rt.check_shapes_against_model(ids, inputs)
    with pytest.raises(OnnxqError, match="dynamic dimensions.*--shapes"):
        trt_rt.check_shapes_against_model([], inputs)
    with pytest.raises(OnnxqError, match="not a model input"):
        trt_rt.check_shapes_against_model(trt_rt.parse_shapes(["nope:1,1,1"]) + ids, inputs)
    with pytest.raises(OnnxqError, match="fixed to 3"):
        trt_rt.check_shapes_against_model(ids + trt_rt.parse_shapes(["pixels:1x3x8x8,1x4x8x8,1x4x8x8"]), inputs)
    with pytest.raises(OnnxqError, match="rank"):
        trt_rt.check_shapes_against_model(trt_rt.parse_shapes(["input_ids:1,1,1"]), inputs)


def test_manifest_records_model_hash_versions_and_options(tmp_path):
    model = synthetic.save(synthetic.residual_cnn(), tmp_path / "m.onnx")
    env = {"tensorrt": "10.9.0", "cuda_driver": "12.8", "gpu": "NVIDIA L4"}
    options = {"strongly_typed": True, "shapes": {}, "workspace_bytes": 1 << 30}
    manifest = trt_rt.make_manifest(model, tmp_path / "m.plan", options, env)
    assert manifest["onnx"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert manifest["tensorrt_version"] == "10.9.0" and manifest["cuda_version"] == "12.8"
    assert manifest["gpu"] == "NVIDIA L4" and manifest["options"] == options
    assert manifest["engine"] == "m.plan"
    json.dumps(manifest)
    assert trt_rt.manifest_path(tmp_path / "m.plan").name == "m.plan.manifest.json"


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT is usable here; this tests the error without it")
def test_build_without_tensorrt_is_one_line_error(tmp_path, capsys):
    model = synthetic.save(synthetic.residual_cnn(), tmp_path / "m.onnx")
    assert main(["build", str(model), "-o", str(tmp_path / "m.plan")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("onnxq: error: cannot build a TensorRT engine")
    assert TRT_MISSING in err
    assert not (tmp_path / "m.plan").exists() and not (tmp_path / "m.plan.manifest.json").exists()


def test_build_checks_its_options_before_needing_tensorrt(tmp_path, capsys):
    model = synthetic.save(synthetic.tiny_attention(), tmp_path / "m.onnx")
    assert main(["build", str(model), "-o", str(tmp_path / "m.plan"), "--shapes", "y:1,1,1"]) == 2
    assert "not a model input" in capsys.readouterr().err
    assert main(["build", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "m.plan")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.skipif(TRT_MISSING is not None, reason=f"needs TensorRT and a GPU: {TRT_MISSING}")
def test_build_and_run_engine(tmp_path):
    from onnxq.check import check
    from onnxq.pipeline import quantize

    model = synthetic.save(synthetic.residual_cnn(), tmp_path / "m.onnx")
    calib = synthetic.random_npz(tmp_path / "c.npz", "x", (1, 16, 8, 8), 8, seed=1)
    quantize(model, tmp_path / "q.onnx", calib, quiet=True)
    assert main(["build", str(tmp_path / "q.onnx"), "-o", str(tmp_path / "q.plan"), "--timing-cache", str(tmp_path / "t.cache")]) == 0
    manifest = json.loads((tmp_path / "q.plan.manifest.json").read_text())
    assert manifest["tensorrt_version"] and manifest["gpu"]
    report = check(model, [], calib, engines=[tmp_path / "q.plan"], runs=3, warmup=1)
    assert report.candidates[0].outputs[0].cosine_mean > 0.99
    assert np.isfinite(report.candidates[0].latency[0].median_ms)
