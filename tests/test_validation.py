"""Tables and plans are validated by structure and value before any work, and options that a plan
or the method in use would ignore are refused (docs/cli.md, "Outputs and errors")."""

import json

import numpy as np
import pytest

import synthetic
from onnxq import cli
from test_bad_input import assert_clean_error


def run_main(capsys, *args):
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A CNN, its data, a table written by onnxq calibrate and a plan written by quantize."""
    folder = tmp_path_factory.mktemp("made")
    model = synthetic.save(synthetic.residual_cnn(opset=11), folder / "cnn.onnx")
    calib = synthetic.random_npz(folder / "calib.npz", "x", (1, 16, 8, 8), 8, seed=1)
    assert cli.main(["calibrate", str(model), "--calib", str(calib), "-o", str(folder / "table.json"), "-q"]) == 0
    assert cli.main(["quantize", str(model), "--calib", str(calib), "-o", str(folder / "q.onnx"), "--save-plan", str(folder / "plan.json"), "-q", "--no-eval"]) == 0
    return folder


def _edited(made, tmp_path, name, edit):
    data = json.loads((made / name).read_text())
    edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _first_tensor(data):
    return next(t for t, s in data["tensors"].items() if "histogram" in s and s["max"] > 0)


TABLE_EDITS = {
    "infinite max": (lambda d, t: d["tensors"][t].update(max=float("inf")), "not finite"),
    "NaN min": (lambda d, t: d["tensors"][t].update(min=float("nan")), "not finite"),
    "min above max": (lambda d, t: d["tensors"][t].update(min=d["tensors"][t]["max"] + 1), "is above max"),
    "histogram of another range": (lambda d, t: d["tensors"][t]["histogram"].update(range=d["tensors"][t]["histogram"]["range"] * 4), "does not fit"),
    "histogram counts beyond its bins": (lambda d, t: d["tensors"][t]["histogram"].update(offset=4095, counts=[1, 2, 3]), "do not fit"),
}


@pytest.mark.parametrize("edit,needle", TABLE_EDITS.values(), ids=TABLE_EDITS.keys())
def test_a_table_with_an_unusable_value_is_one_line_naming_the_tensor(made, tmp_path, capsys, edit, needle):
    tensor = _first_tensor(json.loads((made / "table.json").read_text()))
    table = _edited(made, tmp_path, "table.json", lambda d: edit(d, tensor))
    code, err = run_main(capsys, "quantize", made / "cnn.onnx", "--table", table, "-o", tmp_path / "o.onnx", "-q")
    assert_clean_error(code, err, needle, repr(tensor), str(table))
    assert not (tmp_path / "o.onnx").exists()


def _first_activation(d):
    return next(iter(d["activations"]))


def _first_quantized(d):
    return next(n for n, v in d["nodes"].items() if v["precision"] != "float")


PLAN_EDITS = {
    "unknown target": (lambda d: d.update(target="tflite"), "target 'tflite'"),
    "infinite scale": (lambda d: d["activations"][_first_activation(d)].update(scale=float("inf")), "finite number above 0"),
    "negative scale": (lambda d: d["activations"][_first_activation(d)].update(scale=-0.5), "finite number above 0"),
    "zero point off the grid": (lambda d: d["activations"][_first_activation(d)].update(zero_point=300), "outside int8"),
    "unknown activation dtype": (lambda d: d["activations"][_first_activation(d)].update(dtype="int4"), "dtype 'int4'"),
    "unknown weight dtype": (lambda d: d["weights"][next(iter(d["weights"]))].update(dtype="int16"), "dtype 'int16'"),
    "unknown input kind": (lambda d: d["nodes"][_first_quantized(d)]["inputs"].update({"0": "scale"}), "input kind 'scale'"),
    "a node the model lacks": (lambda d: d["nodes"].update(ghost={"op_type": "Conv", "precision": "int8", "inputs": {"0": "activation"}}), "'ghost'"),
    "an input index the node lacks": (lambda d: d["nodes"][_first_quantized(d)]["inputs"].update({"7": "activation"}), "input 7"),
}


@pytest.mark.parametrize("edit,needle", PLAN_EDITS.values(), ids=PLAN_EDITS.keys())
def test_a_plan_with_an_unusable_value_is_one_line(made, tmp_path, capsys, edit, needle):
    plan = _edited(made, tmp_path, "plan.json", edit)
    code, err = run_main(capsys, "quantize", made / "cnn.onnx", "--plan", plan, "-o", tmp_path / "o.onnx", "-q", "--no-eval")
    assert_clean_error(code, err, needle)
    assert not (tmp_path / "o.onnx").exists()


def test_the_unedited_plan_and_table_still_replay(made, tmp_path, capsys):
    assert run_main(capsys, "quantize", made / "cnn.onnx", "--plan", made / "plan.json", "-o", tmp_path / "p.onnx", "-q", "--no-eval")[0] == 0
    assert (tmp_path / "p.onnx").read_bytes() == (made / "q.onnx").read_bytes()
    assert run_main(capsys, "quantize", made / "cnn.onnx", "--table", made / "table.json", "-o", tmp_path / "t.onnx", "-q", "--no-eval")[0] == 0


CONFLICTS = {
    "--precision fp8 on an INT8 plan": (["--precision", "fp8"], "--precision fp8 conflicts with the plan, which decided int8"),
    "--target ort on a TensorRT plan": (["--target", "ort"], "--target ort conflicts with the plan, which decided tensorrt"),
}


@pytest.mark.parametrize("extra,needle", CONFLICTS.values(), ids=CONFLICTS.keys())
def test_an_option_the_plan_decided_otherwise_is_refused(made, tmp_path, capsys, extra, needle):
    code, err = run_main(capsys, "quantize", made / "cnn.onnx", "--plan", made / "plan.json", "-o", tmp_path / "o.onnx", "-q", "--no-eval", *extra)
    assert_clean_error(code, err, needle)


def test_the_plans_own_values_given_again_are_accepted(made, tmp_path, capsys):
    code, _ = run_main(capsys, "quantize", made / "cnn.onnx", "--plan", made / "plan.json", "-o", tmp_path / "o.onnx", "-q", "--no-eval", "--precision", "int8", "--target", "tensorrt")
    assert code == 0


@pytest.mark.parametrize("extra", [["--calib-method", "minmax"], [], ["--table", "TABLE"]], ids=["explicit minmax", "default mse", "a minmax-less table"])
def test_percentile_without_the_percentile_method_is_refused(made, tmp_path, capsys, extra):
    extra = [str(made / "table.json") if e == "TABLE" else e for e in extra]
    data = [] if "--table" in extra else ["--calib", made / "calib.npz"]
    code, err = run_main(capsys, "quantize", made / "cnn.onnx", *data, "-o", tmp_path / "o.onnx", "-q", "--percentile", "99.9", *extra)
    assert_clean_error(code, err, "--percentile only applies to --calib-method percentile")
    assert not (tmp_path / "o.onnx").exists()


def test_percentile_with_the_percentile_method_is_used(made, tmp_path, capsys):
    out = {}
    for p in ("99.0", "99.999"):
        code, _ = run_main(capsys, "quantize", made / "cnn.onnx", "--calib", made / "calib.npz", "-o", tmp_path / f"{p}.onnx", "-q", "--no-eval",
                           "--calib-method", "percentile", "--percentile", p, "--save-plan", tmp_path / f"{p}.json")
        assert code == 0
        out[p] = json.loads((tmp_path / f"{p}.json").read_text())["activations"]
    assert any(out["99.0"][t]["scale"] < out["99.999"][t]["scale"] for t in out["99.0"])


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """A model whose residual stream (x·1e5) overflows FP16, and a table of it from onnxq calibrate."""
    folder = tmp_path_factory.mktemp("fp16")
    model = synthetic.save(synthetic.rmsnorm_attention(gain=1e5), folder / "rms.onnx")
    calib = synthetic.random_npz(folder / "calib.npz", "x", (1, 16, 32), 4, seed=1)
    assert cli.main(["calibrate", str(model), "--calib", str(calib), "-o", str(folder / "table.json"), "-q"]) == 0
    return folder


def _fp32_nodes(folder, capsys, *data):
    plan = folder / f"plan{len(list(folder.glob('plan*')))}.json"
    code, err = run_main(capsys, "quantize", folder / "rms.onnx", *data, "-o", folder / "o.onnx", "-q", "--no-eval", "--high-precision", "fp16", "--save-plan", plan)
    assert code == 0, err
    return json.loads(plan.read_text())["fp32_nodes"]


def test_a_table_from_calibrate_keeps_the_fp16_overflow_protection(overflowing, capsys):
    from_calib = _fp32_nodes(overflowing, capsys, "--calib", overflowing / "calib.npz")
    from_table = _fp32_nodes(overflowing, capsys, "--table", overflowing / "table.json")
    assert from_table == from_calib
    assert any("reaches" in reason for reason in from_table.values())  # a range decided it, not only the rules


def test_a_table_without_the_float_ranges_is_refused_with_high_precision_fp16(overflowing, tmp_path, capsys):
    data = json.loads((overflowing / "table.json").read_text())
    kept = {t for t, s in data["tensors"].items() if "histogram" in s}  # what older versions recorded
    data["tensors"] = {t: s for t, s in data["tensors"].items() if t in kept}
    table = tmp_path / "old.json"
    table.write_text(json.dumps(data))
    code, err = run_main(capsys, "quantize", overflowing / "rms.onnx", "--table", table, "-o", tmp_path / "o.onnx", "-q", "--high-precision", "fp16")
    assert_clean_error(code, err, "--high-precision fp16", "pass --calib DATA instead of --table")
    assert run_main(capsys, "quantize", overflowing / "rms.onnx", "--table", table, "-o", tmp_path / "o.onnx", "-q", "--no-eval")[0] == 0
    assert np.isfinite([s["max"] for s in data["tensors"].values()]).all()
