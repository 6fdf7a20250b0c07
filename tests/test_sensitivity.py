"""The sensitivity sweep and the mixed-precision solver on synthetic models."""

import json
import math

import numpy as np
import onnx
import pytest

import synthetic
from onnxq import modelio
from onnxq.cli import main
from onnxq.metrics import spearman
from onnxq.mixed_precision.candidates import assemble_plan, qdq_proto
from onnxq.mixed_precision.groups import layer_groups
from onnxq.mixed_precision.options import SolverError, SweepError
from onnxq.mixed_precision.ranges import calibrate_ranges
from onnxq.mixed_precision.solver import solve
from onnxq.mixed_precision.sweep import SweepResult, sweep
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.placement import place
from onnxq.plan import QUANTIZED_PRECISIONS, QuantPlan
from onnxq.runtime import ort as ort_rt


def _feeds(path, model):
    from onnxq.data import open_source

    return list(open_source(path, ort_rt.model_input_spec(model)))


def _direct_errors(model_path, calib, evald, target="tensorrt"):
    """Per layer: SNR of its linear nodes' outputs with only that layer quantized (a whole model
    per layer, the nodes' outputs exposed as graph outputs) — what the local twins must equal."""
    model = load_and_preprocess(model_path)
    base = place(model, target)
    layers = layer_groups(model, base)
    ranges = calibrate_ranges(model, base, _feeds(calib, model), QUANTIZED_PRECISIONS)
    by_name = {n.name: n for n in model.graph}
    float_proto = modelio.to_proto(model)
    out = {}
    for layer in layers:
        linear = [n for n in layer.nodes if by_name[n].op_type in ("Conv", "MatMul", "Gemm")]
        tensors = [by_name[n].outputs[0].name for n in linear]
        out[layer.name] = {}
        for p in QUANTIZED_PRECISIONS:
            plan = assemble_plan(model, base, {n: p for n in layer.nodes}, ranges)
            sums = []
            for proto in (float_proto, qdq_proto(float_proto, plan)):
                proto = onnx.ModelProto.FromString(proto.SerializeToString())
                proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
                sess = ort_rt.create_session(proto)
                sums.append([ort_rt.run(sess, f, tensors) for f in _feeds(evald, model)])
            signal = sum(float((r.astype(np.float64) ** 2).sum()) for rs in sums[0] for r in rs)
            noise = sum(float(((r.astype(np.float64) - q) ** 2).sum()) for rs, qs in zip(*sums) for r, q in zip(rs, qs))
            out[layer.name][p] = 10 * math.log10(signal / noise)
    return out


# attention: every layer's nodes read float tensors in the quantized model too, so twins must agree
# exactly; cnn: one layer chains conv1 → conv2 (joined by the residual Add's shared input), and
# conv2's twin reads conv1's float output where the quantized model feeds it conv1's quantized one.
@pytest.mark.parametrize(("case", "tolerance_db"), [("attention_case", 0.02), ("cnn_case", 0.5)])
def test_local_twins_match_quantizing_each_layer_alone(case, tolerance_db, request, tmp_path):
    model, calib, evald = request.getfixturevalue(case)
    result = sweep(model, calib, tmp_path / "sweep.json", eval=evald, mode="local", quiet=True)
    direct = _direct_errors(model, calib, evald)
    assert set(result.local) == set(direct)
    for layer, by_precision in direct.items():
        for p, snr in by_precision.items():
            assert result.local[layer][p]["snr_db"] == pytest.approx(snr, abs=tolerance_db), (layer, p)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["format"] == "onnxq.sweep/1" and len(saved["layers"]) == len(direct)
    assert (tmp_path / "sweep.md").read_text().startswith("| layer |")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_layers_group_nodes_that_share_a_quantized_tensor(attention_case):
    model = load_and_preprocess(attention_case[0])
    layers = layer_groups(model, place(model, "tensorrt"))
    assert [la.nodes for la in layers] == [["q_proj", "k_proj", "v_proj"], ["qk"], ["pv"], ["o_proj"]]


def test_e2e_mode_and_rank_correlation(attention_case, tmp_path):
    model, calib, evald = attention_case
    result = sweep(model, calib, tmp_path / "s.json", eval=evald, mode="both", quiet=True)
    assert set(result.e2e) == set(result.local)
    for layer in result.e2e.values():
        assert 0.99 < layer["int8"]["cosine"] < 1.0
    local = [result.local[la.name]["int8"]["snr_db"] for la in result.layers]
    e2e = [result.e2e[la.name]["int8"]["snr_db"] for la in result.layers]
    assert result.spearman["int8"] == pytest.approx(spearman(local, e2e))
    assert SweepResult.load(tmp_path / "s.json").e2e.keys() == result.e2e.keys()


def test_spearman_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=30), rng.normal(size=30)
    y[:5] = y[5]  # ties
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)


def test_solver_meets_the_target_and_its_plan_replays(attention_case, tmp_path):
    import onnxq

    model, calib, evald = attention_case
    sweep(model, calib, tmp_path / "s.json", eval=evald, mode="both", quiet=True)
    all8 = onnxq.quantize(model, tmp_path / "all8.onnx", calib, eval=evald, quiet=True).accuracy[0].cosine_mean
    target = 1 - (1 - all8) / 2  # halve the all-INT8 cosine loss
    result = solve(tmp_path / "s.json", model, calib, tmp_path / "plan.json", eval=evald, target_cosine=target, quiet=True)
    assert result.chosen["accuracy"] >= target
    assert 0 < result.chosen["high_precision_layers"] < len(result.order)
    assert result.candidates[0]["high_precision_layers"] == 0 and result.candidates[0]["accuracy"] < target
    assert result.curve_path.read_bytes()[:4] == b"\x89PNG"
    plan = QuantPlan.load(tmp_path / "plan.json")
    floats = [n for n, d in plan.nodes.items() if not d.quantized]
    assert floats and len(plan.quantized_nodes()) > 0
    replay = onnxq.quantize(model, tmp_path / "mixed.onnx", calib, eval=evald, plan=tmp_path / "plan.json", quiet=True)
    assert replay.accuracy[0].cosine_mean == pytest.approx(result.chosen["cosine"], abs=1e-6)

    fixed = solve(tmp_path / "s.json", model, calib, tmp_path / "plan1.json", eval=evald, max_high_precision_layers=1, quiet=True)
    assert fixed.chosen["high_precision_layers"] == 1 and fixed.chosen["promoted"] == fixed.order[:1]


def test_latency_json_costs(attention_case, tmp_path):
    model, calib, evald = attention_case
    result = sweep(model, calib, tmp_path / "s.json", eval=evald, quiet=True)
    # o_proj is made very expensive in float: it must be promoted last.
    costs = {la.name: {"int8": 1.0, "fp8": 1.0, "float": 1000.0 if la.name == "o_proj" else 1.5} for la in result.layers}
    (tmp_path / "lat.json").write_text(json.dumps(costs))
    solved = solve(tmp_path / "s.json", model, calib, None, eval=evald, max_high_precision_layers=0, latency_json=tmp_path / "lat.json", order_by="per-cost", quiet=True)
    assert solved.order[-1] == "o_proj"
    floor = solve(tmp_path / "s.json", model, calib, None, eval=evald, max_high_precision_layers=10, min_8bit_macs=0.6, precisions="int8", quiet=True)
    assert 0.6 <= floor.chosen["matmul_macs_8bit_fraction"] < 1 and "q_proj" not in floor.order  # q_proj holds 60% of the MACs
    assert set(floor.plan.precisions()) == {"int8"}
    int8_only = SweepResult.load(tmp_path / "s.json")
    int8_only.precisions = ["int8"]
    with pytest.raises(SolverError, match="did not measure"):
        solve(int8_only, model, calib, None, eval=evald, max_high_precision_layers=0, precisions="fp8", quiet=True)
    (tmp_path / "bad.json").write_text(json.dumps({"q_proj": {"int8": 1}}))
    with pytest.raises(SolverError, match="no .fp8. cost for layer .q_proj."):
        solve(tmp_path / "s.json", model, calib, None, eval=evald, max_high_precision_layers=0, latency_json=tmp_path / "bad.json", quiet=True)


def test_bad_inputs_are_clear_errors(attention_case, tmp_path, capsys):
    model, calib, evald = map(str, attention_case)
    assert main(["sweep", model, "--calib", calib, "-o", str(tmp_path / "s.json"), "--precisions", "int4", "-q"]) == 2
    assert "unknown precision 'int4'" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
    sweep(model, calib, tmp_path / "s.json", quiet=True, plot=False)
    other = str(synthetic.save(synthetic.tiny_attention(seed=1), tmp_path / "other.onnx"))  # same graph, other weights
    code = main(["solve", str(tmp_path / "s.json"), other, "--calib", calib, "--eval", evald, "-o", str(tmp_path / "p.json"), "--target-cosine", "0.99", "-q"])
    assert code == 2 and "sweep was made for another model" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(SweepError, match="not an onnxq sweep"):
        solve(tmp_path / "junk.json", model, calib, None, eval=evald, target_cosine=0.99)
    with pytest.raises(SolverError, match="needs a task metric: pass --metric MODULE:FUNCTION or --zoo NAME"):
        solve(tmp_path / "s.json", model, calib, None, eval=evald, target_metric="top1_agreement>=0.9")
    with pytest.raises(SolverError, match="exactly one target"):
        solve(tmp_path / "s.json", model, calib, None, eval=evald)
    with pytest.raises(SolverError, match="not met even with every layer the --min-8bit-macs floor allows"):
        solve(tmp_path / "s.json", model, calib, tmp_path / "unmet.json", eval=evald, target_cosine=0.999999, min_8bit_macs=0.99, quiet=True)
    assert not (tmp_path / "unmet.json").exists() and json.loads((tmp_path / "unmet.solve.json").read_text())["candidates"]
    # through the CLI (whose whole command is one transaction) the report the message names is
    # written too: an unmet target is a result (exit 1), not an error that leaves nothing behind
    code = main(["solve", str(tmp_path / "s.json"), model, "--calib", calib, "--eval", evald, "-o", str(tmp_path / "cli_unmet.json"), "--target-cosine", "0.999999", "--min-8bit-macs", "0.99", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("onnxq: target not met:") and "cli_unmet.solve.json" in err, err
    assert not (tmp_path / "cli_unmet.json").exists() and json.loads((tmp_path / "cli_unmet.solve.json").read_text())["candidates"]
    partial = sweep(model, calib, tmp_path / "part.json", layers_only=["qk"], quiet=True, plot=False)
    assert [la.name for la in partial.layers] == ["qk"]
    with pytest.raises(SweepError, match="covers 1 of the model's 4 layers"):
        solve(tmp_path / "part.json", model, calib, None, eval=evald, target_cosine=0.99, quiet=True)
    with pytest.raises(SweepError, match=r"no layer named \['nope'\]"):
        sweep(model, calib, layers_only=["nope"], quiet=True)
    with pytest.raises(SweepError, match="unknown sweep mode"):
        sweep(model, calib, mode="fast")


def test_sweep_and_solver_with_smoothquant_and_split_outliers(decoder_case, tmp_path):
    """The sweep records its SmoothQuant settings and the solver repeats them; split-off channels
    are float MACs in every candidate; --save-model writes the very model the solver measured."""
    from onnxq.check import compare

    model, calib, evald = decoder_case
    result = sweep(model, calib, tmp_path / "s.json", eval=evald, smoothquant="auto", split_outliers=4, quiet=True, plot=False)
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["smoothquant"] == "auto" and saved["split_outliers"] == 4
    assert any(la.float_side_macs > 0 for la in result.layers)
    assert all(la.float_side_macs < la.matmul_macs for la in result.layers)
    solved = solve(tmp_path / "s.json", model, calib, tmp_path / "plan.json", eval=evald, max_high_precision_layers=0, save_model=tmp_path / "mixed.onnx", quiet=True, plot=False)
    side = sum(la.float_side_macs for la in result.layers)
    total = sum(la.matmul_macs for la in result.layers) + side
    assert solved.chosen["matmul_macs_8bit_fraction"] == pytest.approx(1 - side / total)
    q = onnx.load(str(tmp_path / "mixed.onnx"))
    assert any(n.name.endswith("_SplitMatMul") for n in q.graph.node)
    assert json.loads(solved.report_path.read_text())["smoothquant"] == {"alpha": "auto", "split_outliers": 4}
    measured = compare(model, ort_rt.create_session(str(tmp_path / "mixed.onnx")), _feeds(evald, load_and_preprocess(model)), progress=False)
    assert min(a.cosine_mean for a in measured) == pytest.approx(solved.chosen["cosine"], abs=1e-6)
