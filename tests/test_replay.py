"""The plan is the whole contract: a saved plan rebuilds its model byte for byte, and a recipe
file gives the same model as the same options as flags (fast tier: synthetic models)."""

import json

import numpy as np
import pytest

from onnxq.cli import main
from onnxq.plan import QuantPlan


def _quantize(argv):
    assert main(["quantize", *argv, "-q"]) == 0


@pytest.mark.parametrize("extra", [[], ["--smoothquant", "auto", "--split-outliers", "4", "--high-precision", "fp16"], ["--precision", "fp8", "--target", "ort"], ["--precision", "w4a16", "--block-size", "32", "--target", "ort", "--quantize-head"]])
def test_saved_plan_replays_byte_for_byte_without_calibration(decoder_case, tmp_path, extra):
    model, calib, _ = decoder_case
    _quantize([str(model), "-o", str(tmp_path / "a.onnx"), "--calib", str(calib), "--calib-method", "minmax", "--save-plan", str(tmp_path / "plan.json"), *extra])
    plan = QuantPlan.load(tmp_path / "plan.json")
    if "--smoothquant" in extra:
        assert plan.smoothquant.active() and any(g.split for g in plan.smoothquant.active())
        assert plan.high_precision == "fp16" and plan.fp32_nodes
    # no --calib: a complete plan needs no calibration data
    _quantize([str(model), "-o", str(tmp_path / "b.onnx"), "--plan", str(tmp_path / "plan.json"), "--no-eval"])
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_recipe_file_and_flags_give_the_same_model(decoder_case, tmp_path):
    model, calib, _ = decoder_case
    flags = ["--target", "ort", "--calib-method", "percentile", "--percentile", "99.9", "--smoothquant", "0.6", "--exclude", "down_proj"]
    _quantize([str(model), "-o", str(tmp_path / "flags.onnx"), "--calib", str(calib), "--no-eval", *flags])
    (tmp_path / "r.yaml").write_text("target: ort\ncalib-method: percentile\npercentile: 99.9\nsmoothquant: 0.6\nexclude: [down_proj]\n")
    _quantize([str(model), "-o", str(tmp_path / "yaml.onnx"), "--calib", str(calib), "--no-eval", "--recipe", str(tmp_path / "r.yaml")])
    (tmp_path / "r.json").write_text(json.dumps({"target": "tensorrt", "calib-method": "percentile", "percentile": 99.9, "smoothquant": 0.6, "exclude": ["down_proj"]}))
    # a flag overrides the file
    _quantize([str(model), "-o", str(tmp_path / "json.onnx"), "--calib", str(calib), "--no-eval", "--recipe", str(tmp_path / "r.json"), "--target", "ort"])
    flags_bytes = (tmp_path / "flags.onnx").read_bytes()
    assert (tmp_path / "yaml.onnx").read_bytes() == flags_bytes
    assert (tmp_path / "json.onnx").read_bytes() == flags_bytes
    _quantize([str(model), "-o", str(tmp_path / "trt.onnx"), "--calib", str(calib), "--no-eval", "--recipe", str(tmp_path / "r.json")])
    assert (tmp_path / "trt.onnx").read_bytes() != flags_bytes  # the file's own target


@pytest.mark.parametrize("text, message", [
    ("target: gpu\n", "--target 'gpu' is not one of"),
    ("calib_method: median\n", "unknown calibration method 'median'"),
    ("split-outliers: 4\n", "--split-outliers is part of SmoothQuant"),
    ("smoothquant: 2\n", "migration strength"),
    ("colour: red\n", "unknown recipe key 'colour'"),
    ("- a\n- b\n", "a recipe is a mapping"),
    ("target: [\n", "is not valid YAML"),
])
def test_bad_recipe_is_one_line_error(decoder_case, tmp_path, capsys, text, message):
    model, calib, _ = decoder_case
    (tmp_path / "r.yaml").write_text(text)
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(model), "-o", str(out), "--calib", str(calib), "--recipe", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxq: error:") and message in err[0], err
    assert not out.exists()


def test_edited_plan_calibrates_only_what_it_lacks(decoder_case, tmp_path):
    """A node set back to int8 in a saved plan gets its ranges from --calib; every other
    parameter stays as saved."""
    model, calib, _ = decoder_case
    _quantize([str(model), "-o", str(tmp_path / "a.onnx"), "--calib", str(calib), "--calib-method", "minmax", "--exclude", "down_proj", "--save-plan", str(tmp_path / "plan.json")])
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["nodes"]["down_proj"]["precision"] == "float"
    saved_scales = {k: v["scale"] for k, v in data["activations"].items()}
    data["nodes"]["down_proj"].update(precision="int8", inputs={"0": "activation", "1": "weight"})
    data["weights"]["down_proj:1"] = {"dtype": "int8", "axis": 1}
    (tmp_path / "plan.json").write_text(json.dumps(data))
    assert main(["quantize", str(model), "-o", str(tmp_path / "b.onnx"), "--plan", str(tmp_path / "plan.json"), "--no-eval", "-q"]) == 2  # needs data now
    _quantize([str(model), "-o", str(tmp_path / "b.onnx"), "--plan", str(tmp_path / "plan.json"), "--calib", str(calib), "--calib-method", "minmax", "--no-eval", "--save-plan", str(tmp_path / "b.json")])
    replayed = json.loads((tmp_path / "b.json").read_text())["activations"]
    assert {k: replayed[k]["scale"] for k in saved_scales} == saved_scales
    new = set(replayed) - set(saved_scales)
    assert len(new) == 1
    x = np.load(calib)["x"]
    assert replayed[new.pop()]["scale"] > 0 and x.size


@pytest.mark.parametrize("precisions", ["int8", "int8,fp8"])
def test_solver_plan_replays_its_saved_model(decoder_case, tmp_path, precisions):
    """onnxq solve --save-model writes the model the solver measured; its plan, replayed with
    quantize --plan, rebuilds that model byte for byte (SmoothQuant with split channels; with
    FP8 candidates the opset the sweep raised to is part of the plan)."""
    model, calib, evald = decoder_case
    sweep_args = ["sweep", str(model), "--calib", str(calib), "--eval", str(evald), "-o", str(tmp_path / "s.json"),
                  "--precisions", precisions, "--smoothquant", "auto", "--split-outliers", "4", "--calib-method", "minmax", "-q"]
    assert main(sweep_args) == 0
    assert json.loads((tmp_path / "s.json").read_text())["recipe"]["split-outliers"] == 4
    assert main(["solve", str(tmp_path / "s.json"), str(model), "--calib", str(calib), "--eval", str(evald), "-o", str(tmp_path / "plan.json"),
                 "--max-high-precision-layers", "1", "--save-model", str(tmp_path / "solved.onnx"), "-q"]) == 0
    plan = QuantPlan.load(tmp_path / "plan.json")
    assert plan.smoothquant is not None and plan.recipe["smoothquant"] == "auto"
    assert sum(d.precision == "float" for d in plan.nodes.values() if d.inputs) >= 1
    _quantize([str(model), "-o", str(tmp_path / "replay.onnx"), "--plan", str(tmp_path / "plan.json"), "--no-eval"])
    assert (tmp_path / "replay.onnx").read_bytes() == (tmp_path / "solved.onnx").read_bytes()


def test_per_tensor_weights_from_flag_and_recipe(decoder_case, tmp_path):
    """--per-tensor-weights (the option added after the recipe/plan restructuring): every weight
    DequantizeLinear has one scalar scale and no axis; the recipe key gives the same model."""
    import onnx

    model, calib, _ = decoder_case
    _quantize([str(model), "-o", str(tmp_path / "flag.onnx"), "--calib", str(calib), "--no-eval", "--per-tensor-weights", "--save-plan", str(tmp_path / "p.json")])
    q = onnx.load(str(tmp_path / "flag.onnx"))
    inits = {i.name: i for i in q.graph.initializer}
    weight_dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weight_dqs and all(not n.attribute and list(inits[n.input[1]].dims) == [] for n in weight_dqs)
    assert all(w["axis"] is None for w in json.loads((tmp_path / "p.json").read_text())["weights"].values())
    (tmp_path / "r.yaml").write_text("per-tensor-weights: true\n")
    _quantize([str(model), "-o", str(tmp_path / "recipe.onnx"), "--calib", str(calib), "--no-eval", "--recipe", str(tmp_path / "r.yaml")])
    assert (tmp_path / "recipe.onnx").read_bytes() == (tmp_path / "flag.onnx").read_bytes()
    _quantize([str(model), "-o", str(tmp_path / "channel.onnx"), "--calib", str(calib), "--no-eval"])
    assert (tmp_path / "channel.onnx").read_bytes() != (tmp_path / "flag.onnx").read_bytes()
    (tmp_path / "bad.yaml").write_text("per-tensor-weights: maybe\n")
    assert main(["quantize", str(model), "-o", str(tmp_path / "x.onnx"), "--calib", str(calib), "--recipe", str(tmp_path / "bad.yaml")]) == 2


def test_an_old_format_plan_still_replays(decoder_case, tmp_path):
    """An onnxq.plan/1 file (weights keyed by initializer name, no SmoothQuant/FP16/opset entries)
    loads and builds the same model as the plan it was converted from (MatMul weights: axis 1, so
    an entry that were not found would fall back to axis 0 and change the model)."""
    model, calib, _ = decoder_case
    _quantize([str(model), "-o", str(tmp_path / "a.onnx"), "--calib", str(calib), "--no-eval", "--save-plan", str(tmp_path / "new.json")])
    data = json.loads((tmp_path / "new.json").read_text())
    proto = {n.name: n for n in __import__("onnx").load(str(model)).graph.node}
    data["format"] = "onnxq.plan/1"
    data["weights"] = {proto[key.rpartition(":")[0]].input[int(key.rpartition(":")[2])]: w for key, w in data["weights"].items()}
    assert 1 in {w["axis"] for w in data["weights"].values()}
    for key in ("smoothquant", "high_precision", "fp32_nodes", "min_opset", "recipe"):
        del data[key]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert not any(":" in k for k in data["weights"]) and QuantPlan.load(tmp_path / "old.json").weights
    _quantize([str(model), "-o", str(tmp_path / "b.onnx"), "--plan", str(tmp_path / "old.json"), "--no-eval"])
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()
