"""The solver evaluates the uniform plans (all INT8, all FP8) besides each layer's best precision,
and never returns a plan one of them dominates (issue 14, item 5)."""

import pytest

import onnxq
from onnxq.mixed_precision.search import cheapest_meeting, undominated
from onnxq.mixed_precision.solver import solve
from onnxq.mixed_precision.sweep import sweep


def _c(cost, accuracy, name):
    return {"cost": cost, "accuracy": accuracy, "name": name}


def test_cheapest_meeting_and_undominated_on_numbers():
    cands = [_c(1.0, 0.98, "int8"), _c(1.0, 0.991, "fp8"), _c(1.2, 0.990, "mixed"), _c(1.5, 0.999, "more")]
    higher = lambda a: a  # noqa: E731
    assert cheapest_meeting(cands, lambda a: a >= 0.99, higher)["name"] == "fp8"
    assert cheapest_meeting(cands, lambda a: a >= 0.9999, higher) is None
    assert cheapest_meeting(cands, lambda a: a >= 0.95, higher)["name"] == "fp8"  # equal cost: the more accurate
    assert undominated(cands[2], cands, higher)["name"] == "fp8"  # cheaper and more accurate
    assert undominated(cands[3], cands, higher)["name"] == "more"  # nothing cheaper is as accurate
    lower = lambda a: -a  # noqa: E731  (an error metric: lower is better)
    assert cheapest_meeting(cands, lambda a: a <= 0.985, lower)["name"] == "int8"
    assert undominated(cands[2], cands, lower)["name"] == "int8"


def test_solver_takes_uniform_fp8_when_the_per_layer_best_misses(decoder_case, tmp_path):
    """On this block the local sweep rates INT8 best for every layer, yet all-INT8 loses far more
    end to end than all-FP8: a target FP8 meets must cost x1.0, with no layer in float."""
    model, calib, evald = decoder_case
    swept = sweep(model, calib, tmp_path / "s.json", quiet=True, plot=False)
    assert all(swept.sensitivity(la.name, "int8") < swept.sensitivity(la.name, "fp8") for la in swept.layers)
    cosine = {p: onnxq.quantize(model, tmp_path / f"{p}.onnx", calib, eval=evald, precision=p, quiet=True).accuracy[0].cosine_mean for p in ("int8", "fp8")}
    assert cosine["fp8"] > cosine["int8"]
    target = cosine["fp8"] - 1e-4
    result = solve(tmp_path / "s.json", model, calib, tmp_path / "plan.json", eval=evald, target_cosine=target, quiet=True, plot=False)
    uniform = {c["base"]: c for c in result.candidates if c["high_precision_layers"] == 0}
    assert set(uniform) == {"all int8", "all fp8"}  # per-layer best is all-INT8 here: evaluated once
    for p in ("int8", "fp8"):
        assert uniform[f"all {p}"]["cosine"] == pytest.approx(cosine[p], abs=1e-4)
    assert result.chosen["base"] == "all fp8" and result.chosen["high_precision_layers"] == 0
    assert result.chosen["cost"] == pytest.approx(1.0) and result.chosen["accuracy"] >= target
    assert set(result.plan.precisions()) == {"fp8"}
    for c in result.candidates:  # nothing evaluated dominates the choice
        assert not (c["cost"] <= result.chosen["cost"] and c["accuracy"] > result.chosen["accuracy"])
    fixed = solve(tmp_path / "s.json", model, calib, None, eval=evald, max_high_precision_layers=1, quiet=True, plot=False)
    assert fixed.chosen["base"] == "all fp8"  # promotions start from the most accurate all-8-bit plan
    assert not any(c["cost"] <= fixed.chosen["cost"] and c["accuracy"] > fixed.chosen["accuracy"] for c in fixed.candidates)
