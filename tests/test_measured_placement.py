"""--depthwise-min-snr: depthwise convs whose own measured INT8 error is too large stay float."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxq import modelio
from onnxq.bias_correction import measure_local_snr
from onnxq.emit import emit
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.pipeline import build, quantize
from onnxq.plan import FLOAT
from onnxq.recipe import Recipe
from onnxq.errors import OnnxqError
from tests.synthetic import random_npz, save
from tests.test_equalization import mobile_block


@pytest.fixture
def block_case(tmp_path):
    path = save(mobile_block(), tmp_path / "block.onnx")
    return path, random_npz(tmp_path / "calib.npz", "x", (1, 16, 12, 12), 16, seed=1)


def _feeds(calib):
    return [{"x": d[None]} for d in np.load(calib)["x"]]


def _dw_output(proto: onnx.ModelProto, feeds) -> np.ndarray:
    proto.graph.output.append(helper.make_tensor_value_info("dw", TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["dw"], f)[0] for f in feeds])


def test_local_snr_is_the_snr_of_the_node_quantized_alone(block_case):
    path, calib = block_case
    feeds = _feeds(calib)
    model = load_and_preprocess(path)
    plan, _ = build(model, Recipe(), feeds)  # every range decided
    measured = measure_local_snr(load_and_preprocess(path), plan, feeds, ["dw"])
    for name, decision in plan.nodes.items():  # only dw quantized: its input is the float one
        if name != "dw":
            decision.precision, decision.inputs = FLOAT, {}
    alone = load_and_preprocess(path)
    emit(alone, plan)
    ref, got = _dw_output(onnx.load(path), feeds), _dw_output(modelio.to_proto(alone), feeds)
    expected = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((got - ref).astype(np.float64) ** 2))
    assert set(measured) == {"dw"} and measured["dw"] == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize("margin, floated", [(+1.0, True), (-1.0, False)])
def test_depthwise_below_the_threshold_stays_float_and_replays(block_case, tmp_path, margin, floated):
    path, calib = block_case
    probe = tmp_path / "probe.onnx"
    first = quantize(path, probe, calib, depthwise_min_snr=1.0, report=False, evaluate=False, quiet=True)
    snr = first.plan.local_snr["dw"]
    out, plan_path = tmp_path / "q.onnx", tmp_path / "plan.json"
    result = quantize(path, out, calib, depthwise_min_snr=snr + margin, save_plan=plan_path, report=False, evaluate=False, quiet=True)
    assert ("dw" not in result.plan.quantized_nodes()) == floated
    assert ("measured" in result.plan.nodes["dw"].reason) == floated
    assert set(json.loads(plan_path.read_text())["local_snr"]) == {"dw"}
    replay = tmp_path / "replay.onnx"
    quantize(path, replay, plan=plan_path, report=False, evaluate=False, quiet=True)  # no data: nothing measured again
    assert replay.read_bytes() == out.read_bytes()


def test_depthwise_min_snr_needs_data_and_a_sensible_value(block_case, tmp_path):
    path, calib = block_case
    quantize(path, tmp_path / "q.onnx", calib, save_plan=tmp_path / "plan.json", report=False, evaluate=False, quiet=True)
    with pytest.raises(OnnxqError, match="--depthwise-min-snr needs calibration data"):  # the plan has not measured it
        quantize(path, tmp_path / "q2.onnx", plan=tmp_path / "plan.json", depthwise_min_snr=30, quiet=True)
    with pytest.raises(OnnxqError, match="--depthwise-min-snr takes"):
        Recipe.from_options({"depthwise_min_snr": -3})


def test_sweep_and_solver_honour_equalize(block_case, tmp_path):
    """The sweep folds --equalize into its base model and records it; the solver's plan carries
    the equalization, and quantize --plan rebuilds the solver's model from it."""
    from onnxq.mixed_precision.solver import solve
    from onnxq.mixed_precision.sweep import sweep

    path, calib = block_case
    evaluation = random_npz(tmp_path / "eval.npz", "x", (1, 16, 12, 12), 8, seed=3)
    sweep(path, calib, tmp_path / "s.json", eval=evaluation, equalize=True, quiet=True, plot=False)
    assert json.loads((tmp_path / "s.json").read_text())["recipe"]["equalize"] is True
    solve(tmp_path / "s.json", path, calib, tmp_path / "plan.json", eval=evaluation, max_high_precision_layers=0, save_model=tmp_path / "solved.onnx", quiet=True, plot=False)
    assert len(json.loads((tmp_path / "plan.json").read_text())["equalization"]["pairs"]) == 3
    quantize(path, tmp_path / "replay.onnx", plan=tmp_path / "plan.json", report=False, evaluate=False, quiet=True)
    assert (tmp_path / "replay.onnx").read_bytes() == (tmp_path / "solved.onnx").read_bytes()
