"""What check and quantize state (issue 14, item 4): the thresholds next to PASS/FAIL, the task
metric as a table, a mixed plan labelled with its mix, and the output model's producer and recipe."""

import hashlib
import json

import onnx

import onnxq
from onnxq.cli import main
from onnxq.plan import QuantPlan

SPEC = "metric_plugin:output_error"


def _check(model, cand, evald, out, *extra):
    return main(["check", str(model), str(cand), "--data", str(evald), "--no-latency", "-o", str(out), *extra])


def test_check_prints_the_thresholds_and_the_metric_table(attention_case, tmp_path, capsys):
    model, calib, evald = attention_case
    onnxq.quantize(model, tmp_path / "q.onnx", calib, quiet=True)
    capsys.readouterr()
    assert _check(model, tmp_path / "q.onnx", evald, tmp_path / "r", "--min-cosine", "0.9", "--min-snr", "10", "--metric", SPEC) == 0
    out = capsys.readouterr().out
    assert "PASS (thresholds: mean cosine >= 0.9 on every output; SNR >= 10.0 dB on every output)" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["thresholds_applied"] == "mean cosine >= 0.9 on every output; SNR >= 10.0 dB on every output"
    assert report["candidates"][0]["verdict"].startswith("PASS (thresholds: mean cosine >= 0.9")
    # the task metric: a table with a column per value, on the terminal and in MD/HTML
    values = report["candidates"][0]["task_metric"]
    header = next(line for line in out.splitlines() if line.strip().startswith("model "))
    assert header.split() == ["model", *values]
    table = out.split("task metric:")[1].splitlines()
    cand_row = next(line for line in table if line.strip().startswith("q.onnx"))
    assert f"{values['argmax_agreement']:.4f}" in cand_row
    md = (tmp_path / "r.md").read_text()
    assert "| model | max_abs_error | argmax_agreement |" in md and '{"' not in md.split("## Task metric")[1]
    assert "<th>argmax_agreement</th>" in (tmp_path / "r.html").read_text()
    assert "thresholds: mean cosine >= 0.9" in md

    assert _check(model, tmp_path / "q.onnx", evald, tmp_path / "none") == 0
    assert "PASS (thresholds: no thresholds given" in capsys.readouterr().out
    assert _check(model, tmp_path / "q.onnx", evald, tmp_path / "fail", "--min-snr", "200") == 1
    assert "FAIL: " in (verdict := json.loads((tmp_path / "fail.json").read_text())["candidates"][0]["verdict"]) and "SNR >= 200.0 dB" in verdict


def test_mixed_plan_is_labelled_with_its_mix(attention_case, tmp_path, capsys):
    model, calib, evald = attention_case
    first = onnxq.quantize(model, tmp_path / "q.onnx", calib, save_plan=tmp_path / "plan.json", quiet=True)
    assert json.loads(first.report_path.read_text())["precision"] == "int8"
    plan = json.loads((tmp_path / "plan.json").read_text())
    quantized = [n for n, d in plan["nodes"].items() if d["precision"] == "int8"]
    plan["nodes"][quantized[0]]["precision"] = "fp8"
    (tmp_path / "mixed.json").write_text(json.dumps(plan))
    capsys.readouterr()
    assert main(["quantize", str(model), "-o", str(tmp_path / "m.onnx"), "--calib", str(calib), "--eval", str(evald), "--plan", str(tmp_path / "mixed.json")]) == 0
    counts = QuantPlan.load(tmp_path / "mixed.json").summary()
    n_int8 = sum(v for k, v in counts.items() if k.endswith(":int8"))
    label = json.loads((tmp_path / "m.report.json").read_text())["precision"]
    assert label.startswith("mixed (") and f"int8 {n_int8}" in label and "fp8 1" in label
    assert f"ORT FP32 vs ORT {label}" in capsys.readouterr().out


def test_output_model_records_onnxq_and_the_recipe_and_the_input_is_untouched(attention_case, tmp_path):
    model, calib, _ = attention_case
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    onnxq.quantize(model, tmp_path / "q.onnx", calib, save_plan=tmp_path / "plan.json", precision="fp8", quiet=True)
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before
    out = onnx.load(str(tmp_path / "q.onnx"))
    assert (out.producer_name, out.producer_version) == ("onnxq", onnxq.__version__)
    meta = {p.key: p.value for p in out.metadata_props}
    recipe = json.loads(meta["onnxq.recipe"])
    assert recipe == json.loads((tmp_path / "plan.json").read_text())["recipe"] and recipe["precision"] == "fp8"
    onnxq.quantize(model, tmp_path / "replay.onnx", plan=tmp_path / "plan.json", quiet=True)
    assert (tmp_path / "replay.onnx").read_bytes() == (tmp_path / "q.onnx").read_bytes()
    assert onnx.load(str(model)).producer_name != "onnxq"

