"""Every user error gives one actionable line, exit code 2, no traceback and no output file."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper



def run_cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "onnxq", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


def assert_clean_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("onnxq: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _quantize(tmp_path, model, calib, out_name="out.onnx", *extra):
    out = tmp_path / out_name
    code, _, err = run_cli("quantize", model, "-o", out, "--calib", calib, "-q", *extra)
    return code, err, out


def test_missing_model(tmp_path, cnn_case):
    _, calib, _ = cnn_case
    code, err, out = _quantize(tmp_path, tmp_path / "nope.onnx", calib)
    assert_clean_error(code, err, "no such file")
    assert not out.exists()


def test_truncated_model(tmp_path, cnn_case):
    model, calib, _ = cnn_case
    data = model.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    code, err, out = _quantize(tmp_path, cut, calib)
    assert_clean_error(code, err, "cut.onnx")
    assert not out.exists()


def test_not_onnx(tmp_path, cnn_case):
    _, calib, _ = cnn_case
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is a text file, not a model\n" * 10)
    code, err, out = _quantize(tmp_path, junk, calib)
    assert_clean_error(code, err, "junk.onnx")
    assert not out.exists()


@pytest.mark.parametrize(
    "arrays, needle",
    [
        ({"y": np.zeros((4, 16, 8, 8), np.float32)}, "do not match the model inputs"),
        ({"x": np.zeros((4, 16, 8, 9), np.float32)}, "shape"),
        ({"x": np.zeros((4, 16, 8, 8), np.float64)}, "dtype float64"),
        ({"x": np.zeros((4, 8, 8), np.float32)}, "rank"),
        ({"x": np.zeros((0, 16, 8, 8), np.float32)}, "no samples"),
    ],
)
def test_data_that_does_not_fit(tmp_path, cnn_case, arrays, needle):
    model, _, _ = cnn_case
    calib = tmp_path / "bad.npz"
    np.savez(calib, **arrays)
    code, err, out = _quantize(tmp_path, model, calib)
    assert_clean_error(code, err, needle)
    assert not out.exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_calibration_data(tmp_path, cnn_case, bad):
    model, _, _ = cnn_case
    x = np.random.default_rng(0).normal(size=(5, 16, 8, 8)).astype(np.float32)
    x[3, 0, 0, 0] = bad
    calib = tmp_path / "bad.npz"
    np.savez(calib, x=x)
    code, err, out = _quantize(tmp_path, model, calib)
    assert_clean_error(code, err, "sample 3", "NaN" if np.isnan(bad) else "Inf")
    assert not out.exists()


def test_op_ort_cannot_run(tmp_path):
    node = helper.make_node("FancyOp", ["x"], ["y"], domain="com.example", name="fancy")
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)], ir_version=10)
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.ones((2, 4), np.float32))
    code, err, out = _quantize(tmp_path, path, calib)
    assert_clean_error(code, err, "FancyOp")
    assert not out.exists()


def test_output_equal_to_input(tmp_path, cnn_case):
    model, calib, _ = cnn_case
    before = model.read_bytes()
    code, _, err = run_cli("quantize", model, "-o", model, "--calib", calib, "-q")
    assert_clean_error(code, err, "is the input model")
    assert model.read_bytes() == before


def test_missing_calibration_flag(tmp_path, cnn_case):
    model, _, _ = cnn_case
    code, _, err = run_cli("quantize", model, "-o", tmp_path / "o.onnx", "-q")
    assert_clean_error(code, err, "--calib")


def test_function_data_source(tmp_path, cnn_case, monkeypatch):
    model, _, _ = cnn_case
    (tmp_path / "mydata.py").write_text(
        "import numpy as np\n"
        "def calib():\n"
        "    rng = np.random.default_rng(0)\n"
        "    for _ in range(4):\n"
        "        yield {'x': rng.normal(size=(1, 16, 8, 8)).astype(np.float32)}\n"
        "def broken():\n"
        "    raise RuntimeError('no database')\n"
    )
    out = tmp_path / "ok.onnx"
    code, stdout, err = run_cli("quantize", model, "-o", out, "--calib", "mydata:calib", "-q", cwd=tmp_path)
    assert code == 0, err
    assert out.exists()
    code, _, err = run_cli("quantize", model, "-o", tmp_path / "bad.onnx", "--calib", "mydata:broken", "-q", cwd=tmp_path)
    assert_clean_error(code, err, "no database")
    assert not (tmp_path / "bad.onnx").exists()


def test_directory_of_npz(tmp_path, cnn_case):
    model, _, _ = cnn_case
    d = tmp_path / "calib"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        np.savez(d / f"part{i}.npz", x=rng.normal(size=(2, 16, 8, 8)).astype(np.float32))
    out = tmp_path / "ok.onnx"
    code, _, err = run_cli("quantize", model, "-o", out, "--calib", d, "-q")
    assert code == 0, err
    import json

    report = json.loads((tmp_path / "ok.report.json").read_text())
    assert report["calibration_samples"] == 6
