"""Evaluation outputs with NaN or infinity are counted and left out of the metrics (no bare NaN in
a report); -1 and missing input dimensions are dynamic; a data failure names the source and the
sample (docs/cli.md, "Outputs and errors")."""

import json
import math

import numpy as np
import onnx
import pytest

import synthetic
from onnxq import cli
from onnxq.check import Thresholds
from onnxq.metrics import OutputAccuracy
from test_bad_input import assert_clean_error


def run_main(capsys, *args):
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr()


def strict_json(text):
    """JSON as the standard has it: NaN and Infinity are not numbers."""
    def refuse(constant):
        raise AssertionError(f"bare {constant} in JSON")
    return json.loads(text, parse_constant=refuse)


def test_nonfinite_samples_are_counted_and_left_out_of_the_metrics():
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(1, 10)) for _ in range(4)]
    acc, finite_only = OutputAccuracy("y"), OutputAccuracy("y")
    for i, r in enumerate(ref):
        c = r + 0.01 * rng.normal(size=r.shape)
        bad_ref, bad_cand = r.copy(), c.copy()
        bad_ref[0, 3], bad_cand[0, 5] = np.nan, np.inf
        acc.update(r, c)
        finite_only.update(r, c)
        acc.update(bad_ref, bad_ref)  # NaN in the data: both outputs non-finite
        if i == 0:
            acc.update(r, bad_cand)  # only the candidate
    assert (acc.nonfinite_reference, acc.nonfinite_candidate, acc.samples) == (4, 1, 4)
    assert acc.cosine_mean == finite_only.cosine_mean and acc.snr_db == finite_only.snr_db and math.isfinite(acc.snr_db)
    d = strict_json(json.dumps(acc.to_json()))
    assert d["nonfinite_reference"] == 4 and d["nonfinite_candidate"] == 1
    assert "nonfinite_reference" not in finite_only.to_json()
    # a threshold fails on samples the candidate alone made non-finite, not on the data's
    assert any("non-finite in the candidate only" in f for f in Thresholds(min_cosine=0.5).failures([acc], {}))
    acc.nonfinite_candidate = 0
    assert Thresholds(min_cosine=0.5).failures([acc], {}) == []


def test_an_output_with_no_finite_sample_reports_nothing_measured():
    acc = OutputAccuracy("y")
    acc.update(np.full((1, 4), np.nan), np.full((1, 4), np.nan))
    d = strict_json(json.dumps(acc.to_json()))
    assert d["samples"] == 0 and d["cosine_mean"] is None and d["snr_db"] is None
    assert Thresholds(min_cosine=0.5).failures([acc], {})  # nothing measured passes no threshold


@pytest.fixture
def nan_eval(tmp_path, cnn_case):
    """Evaluation data whose samples 2 and 5 hold a NaN."""
    model, calib, _ = cnn_case
    x = np.random.default_rng(3).normal(size=(8, 1, 16, 8, 8)).astype(np.float32)
    x[2, 0, 0, 0, 0] = x[5, 0, 3, 1, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    return model, calib, tmp_path / "nan.npz"


def test_quantize_and_check_report_nonfinite_samples_without_bare_nan(nan_eval, tmp_path, capsys):
    model, calib, evald = nan_eval
    code, _ = run_main(capsys, "quantize", model, "--calib", calib, "--eval", evald, "-o", tmp_path / "q.onnx", "-q")
    assert code == 0
    out = strict_json((tmp_path / "q.report.json").read_text())["evaluation"]["outputs"][0]
    assert out["nonfinite_reference"] == 2 and out["samples"] == 6 and out["cosine_mean"] > 0.9
    code, streams = run_main(capsys, "check", model, tmp_path / "q.onnx", "--data", evald, "-o", tmp_path / "base", "--min-cosine", "0.9", "--no-latency")
    assert code == 0, streams.err
    assert "2 samples in the reference" in streams.out
    report = strict_json((tmp_path / "base.json").read_text())
    assert "nonfinite_reference" in json.dumps(report)


def _with_input_dims(model: onnx.ModelProto, dims):
    """``model`` with its input's shape replaced: a list of sizes (-1 kept as written, None: a
    dimension with neither size nor name), or None for no shape at all."""
    tensor_type = model.graph.input[0].type.tensor_type
    if dims is None:
        tensor_type.ClearField("shape")
    else:
        tensor_type.shape.ClearField("dim")
        for d in dims:
            dim = tensor_type.shape.dim.add()
            if d is not None:
                dim.dim_value = d
    return model


@pytest.mark.parametrize("dims", [[-1, 16, 8, 8], [1, 16, -1, -1], [None, 16, None, 8]], ids=["batch -1", "spatial -1", "unknown dims"])
def test_minus_one_and_missing_dimensions_are_dynamic(tmp_path, capsys, dims):
    model = synthetic.save(_with_input_dims(synthetic.residual_cnn(opset=11), dims), tmp_path / "m.onnx")
    calib = synthetic.random_npz(tmp_path / "calib.npz", "x", (1, 16, 8, 8), 4, seed=1)
    code, streams = run_main(capsys, "quantize", model, "--calib", calib, "-o", tmp_path / "q.onnx", "-q")
    assert code == 0, streams.err
    code, streams = run_main(capsys, "check", model, tmp_path / "q.onnx", "--data", calib, "-o", tmp_path / "base", "--no-latency", "-q")
    assert code == 0, streams.err


def test_an_input_without_a_shape_takes_any_shape_and_fails_quantize_as_the_inputs_problem(tmp_path, capsys):
    model = synthetic.save(_with_input_dims(synthetic.residual_cnn(opset=11), None), tmp_path / "m.onnx")
    calib = synthetic.random_npz(tmp_path / "calib.npz", "x", (1, 16, 8, 8), 4, seed=1)
    code, streams = run_main(capsys, "check", model, model, "--data", calib, "-o", tmp_path / "base", "--no-latency", "-q")
    assert code == 0, streams.err  # ONNX Runtime runs it: the data is not refused as "rank 0"
    code, streams = run_main(capsys, "quantize", model, "--calib", calib, "-o", tmp_path / "q.onnx", "-q")
    assert_clean_error(code, streams.err, f"the input model {model} does not pass onnx.checker", "shape", "fix or re-export it")
    assert "please report" not in streams.err and not (tmp_path / "q.onnx").exists()


def test_a_static_dimension_is_still_checked(tmp_path, capsys, cnn_case):
    model, _, _ = cnn_case
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 1, 16, 9, 8), np.float32))
    code, streams = run_main(capsys, "quantize", model, "--calib", tmp_path / "wrong.npz", "-o", tmp_path / "q.onnx", "-q")
    assert_clean_error(code, streams.err, str(tmp_path / "wrong.npz"), "sample 0", "[1, 16, 9, 8]")


BAD_SAMPLES = {
    "wrong dtype": (lambda i: {"x": np.zeros((1, 16, 8, 8), np.float64 if i == 3 else np.float32)}, "dtype float64"),
    "wrong shape": (lambda i: {"x": np.zeros((1, 16, 8, 7 if i == 3 else 8), np.float32)}, "has shape"),
    "wrong name": (lambda i: {"y" if i == 3 else "x": np.zeros((1, 16, 8, 8), np.float32)}, "input names do not match"),
    "NaN": (lambda i: {"x": np.full((1, 16, 8, 8), np.nan if i == 3 else 0.0, np.float32)}, "contains NaN"),
}


@pytest.mark.parametrize("sample,needle", BAD_SAMPLES.values(), ids=BAD_SAMPLES.keys())
def test_a_bad_sample_is_one_line_naming_the_source_and_the_sample(tmp_path, capsys, cnn_case, sample, needle):
    model, _, _ = cnn_case
    source = tmp_path / "src.py"
    name = [k for k, v in BAD_SAMPLES.items() if v[0] is sample][0]
    source.write_text(f"from test_data_edges import BAD_SAMPLES\n\ndef feeds():\n    return [BAD_SAMPLES[{name!r}][0](i) for i in range(6)]\n")
    code, streams = run_main(capsys, "quantize", model, "--calib", f"{source}:feeds", "-o", tmp_path / "q.onnx", "-q")
    assert_clean_error(code, streams.err, f"{source}:feeds, sample 3", needle)
