"""The task metric as a plug-in (``--metric MODULE:FUNCTION``) in sweep, solve and check, on a
synthetic model with the test plug-in ``metric_plugin.output_error``."""

import json

import pytest

import metric_plugin
import onnxq
from onnxq.cli import main
from onnxq.mixed_precision.sweep import SweepResult
from onnxq.task_metric import MetricError, load_metric

SPEC = "metric_plugin:output_error"


def test_sweep_solve_and_check_measure_the_plugin_metric(attention_case, tmp_path, capsys):
    model, calib, evald = map(str, attention_case)
    sweep_json = tmp_path / "s.json"
    assert main(["sweep", model, "--calib", calib, "--eval", evald, "-o", str(sweep_json), "--mode", "e2e", "--precisions", "int8", "--metric", SPEC, "-q"]) == 0
    saved = json.loads(sweep_json.read_text())
    assert saved["metric"] == SPEC
    for layer in saved["e2e"].values():
        assert set(layer["int8"]["metric"]) == {"max_abs_error", "argmax_agreement"}
    assert len({layer["int8"]["metric"]["max_abs_error"] for layer in saved["e2e"].values()}) > 1  # measured per layer

    all8 = onnxq.quantize(model, tmp_path / "all8.onnx", calib, quiet=True, report=False)
    bound = metric_plugin.output_error(str(all8.output), model)["max_abs_error"] / 2
    plan = tmp_path / "plan.json"
    # no --metric: solve repeats the sweep's; "=" means "<=" for a lower-is-better metric
    code = main(["solve", str(sweep_json), model, "--calib", calib, "--eval", evald, "-o", str(plan), f"--target-metric=max_abs_error={bound}", "--save-model", str(tmp_path / "mixed.onnx"), "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(plan.with_name("plan.solve.json").read_text())
    assert report["metric"] == SPEC
    assert report["candidates"][0]["accuracy"] > bound >= report["chosen"]["accuracy"]
    assert metric_plugin.output_error(str(tmp_path / "mixed.onnx"), model)["max_abs_error"] == pytest.approx(report["chosen"]["accuracy"], rel=1e-6)

    base = tmp_path / "check"
    assert main(["check", model, str(all8.output), "--data", evald, "--no-latency", "--metric", SPEC, "--zoo-samples", "3", "-q", "-o", str(base)]) == 0
    checked = json.loads(base.with_suffix(".json").read_text())
    assert checked["candidates"][0]["task_metric"] == pytest.approx(metric_plugin.output_error(str(all8.output), model, 3))
    assert checked["task_metric_reference"] == {"max_abs_error": 0.0, "argmax_agreement": 1.0}


def test_a_plugin_given_as_a_file_path(cnn_case, tmp_path):
    model, _, evald = map(str, cnn_case)
    plugin = tmp_path / "my_metric.py"
    plugin.write_text("def score(candidate, reference, samples):\n    return {'calls': 1, 'samples': samples or 0}\n")
    from onnxq.check import check

    result = check(model, [model], evald, latency=False, metric=f"{plugin}:score", metric_samples=5, progress=False)
    assert result.task_metric_reference == {"calls": 1.0, "samples": 5.0}
    assert result.candidates[0].task_metric == {"calls": 1.0, "samples": 5.0}


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "is not MODULE:FUNCTION"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("metric_plugin:nope", "has no function 'nope'"),
    ("metric_plugin:not_a_mapping", "returned float; a metric function returns {metric name: number}"),
    ("metric_plugin:raises", "raised RuntimeError: the evaluation server is down"),
])
def test_a_bad_metric_is_a_one_line_error_exit_2(attention_case, tmp_path, capsys, spec, message):
    model, calib, evald = map(str, attention_case)
    sweep_json = tmp_path / "s.json"
    onnxq.sweep(model, calib, sweep_json, precisions="int8", quiet=True, plot=False)
    commands = [
        ["sweep", model, "--calib", calib, "-o", str(tmp_path / "s2.json"), "--mode", "e2e", "--precisions", "int8", "--metric", spec, "-q"],
        ["solve", str(sweep_json), model, "--calib", calib, "--eval", evald, "-o", str(tmp_path / "p.json"), "--target-metric", "max_abs_error<=1", "--metric", spec, "-q"],
        ["check", model, model, "--data", evald, "--no-latency", "--metric", spec, "-q", "-o", str(tmp_path / "c")],
    ]
    for argv in commands:
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert err.startswith("onnxq: error:") and message in err and err.count("\n") == 1, (argv[0], err)


def test_metric_and_zoo_together_are_an_error(attention_case, tmp_path, capsys):
    model, calib, _ = map(str, attention_case)
    assert main(["sweep", model, "--calib", calib, "-o", str(tmp_path / "s.json"), "--metric", SPEC, "--zoo", "minilm-l6-v2", "-q"]) == 2
    assert "give --metric or --zoo, not both" in capsys.readouterr().err


def test_an_older_sweep_file_naming_a_zoo_model_loads_its_zoo_metric(attention_case, tmp_path):
    model, calib, _ = map(str, attention_case)
    onnxq.sweep(model, calib, tmp_path / "s.json", precisions="int8", quiet=True, plot=False)
    data = json.loads((tmp_path / "s.json").read_text())
    del data["metric"]
    data["zoo"] = "smollm2-6l"
    (tmp_path / "old.json").write_text(json.dumps(data))
    spec = SweepResult.load(tmp_path / "old.json").metric
    from onnxq.zoo.metrics import metric_spec

    assert spec == metric_spec("smollm2-6l")
    assert load_metric(spec).lower_is_better >= {"perplexity", "kl"}


def test_every_zoo_model_has_a_metric_function():
    from onnxq import zoo
    from onnxq.zoo.metrics import metric_spec

    for name in zoo.names():
        metric = load_metric(metric_spec(name))
        assert metric.spec == metric_spec(name) and callable(metric.function)
    with pytest.raises(Exception, match="unknown zoo model"):
        metric_spec("nope")
    with pytest.raises(MetricError, match="is not MODULE:FUNCTION"):
        load_metric("nope")
