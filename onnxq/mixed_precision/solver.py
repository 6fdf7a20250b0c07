"""Mixed-precision assignment: the cheapest precision per layer that meets an accuracy target.

Inputs: a sweep (:mod:`.sweep`), the model, calibration and held-out data, and a cost
per layer and precision. The solver

1. evaluates every all-8-bit plan first: each layer at its best 8-bit precision (the candidate
   with the smallest sweep error; 8-bit formats cost the same) and each precision for every layer
   (all INT8, all FP8: per-layer sweep errors do not add up to the end-to-end error, so the
   per-layer best can lose to a uniform plan); promotions start from the most accurate of them;
2. orders the layers for promotion to high precision ("float") by sensitivity (the sweep's
   end-to-end noise-to-signal ratio when it has one, else the local one), or with
   ``order_by="per-cost"`` by sensitivity per unit of cost the promotion adds, so cheap
   sensitive layers go first; a ``min_8bit_macs`` floor drops from the order the layers whose
   promotion would leave too few MatMul/Gemm MACs in 8 bits;
3. picks how many of them to promote: ``max_high_precision_layers`` directly; for an accuracy
   target, an initial count from the sweep (with end-to-end errors, the smallest count whose
   summed NSR of the layers left in 8 bits stays within the target cosine's NSR, 1/c² − 1:
   independent noises add), then verifies each candidate end to end on held-out data and moves
   the count until the target holds — up by doubling steps, then down by bisection to the
   smallest count that holds (accuracy is taken as monotone in the count); the plan returned is
   the cheapest candidate evaluated that meets the target, so none evaluated dominates it (no
   cheaper-or-equal one is more accurate);
4. writes the QuantPlan (replay with ``onnxq quantize --plan``), a JSON report of every candidate
   it evaluated and an accuracy-versus-cost curve (PNG).

A sweep made with SmoothQuant (``--smoothquant``, ``--split-outliers``) is solved on the model
smoothed the same way (the sweep records the settings and its range method); the MACs of
split-off channels are float in every candidate. A sweep whose recipe has ``--weight-method gptq``
(measured with round-to-nearest weights) gets GPTQ's rounding in every candidate: decided once per
8-bit precision on the folded model, each node reading its own precision's.

Costs: :mod:`.costs` (measured with ``--latency-json``, else a nominal roofline). The search itself
(steps 1 to 3) is :mod:`.search`, pure functions with no model.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxq import modelio
from onnxq.calibration import DataArg, MethodArg
from onnxq.calibrators import model_hash
from onnxq.data import DataSource, open_source
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.pipeline import fold_equalization, fold_rotation
from onnxq.placement import plan_for
from onnxq.plan import FLOAT, QuantPlan
from onnxq.progress import log, quiet_option
from onnxq.recipe import Recipe
from onnxq.runtime import ort as ort_rt
from onnxq.task_metric import TaskMetric, load_metric

from .candidates import apply_smoothing, assemble_plan, gptq_offsets, prepare_opset, qdq_proto
from .costs import layer_costs
from .e2e import Evaluator
from .groups import Layer, layer_groups
from .options import SolverError, SweepError, TargetNotMetError, check_precisions
from .ranges import Ranges, calibrate_ranges
from .search import ORDERS, apply_macs_floor, best_precisions, cheapest_meeting, initial_count, promotion_order, smallest_passing_count, undominated
from .sweep import SweepResult


def parse_metric_target(text: str, lower_is_better=frozenset()) -> tuple[str, str, float]:
    """``NAME>=VALUE``, ``NAME<=VALUE`` or ``NAME=VALUE`` (``=``: ``<=`` for the metric's
    lower-is-better names, ``>=`` otherwise)."""
    m = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*(>=|<=|=)\s*([-+0-9.eE]+)\s*", text or "")
    if not m:
        raise SolverError(f"--target-metric {text!r} is not NAME>=VALUE (e.g. top1_agreement>=0.97)")
    name, op, value = m.group(1), m.group(2), float(m.group(3))
    if op == "=":
        op = "<=" if name in lower_is_better else ">="
    return name, op, value


@dataclass
class _Target:
    """What a candidate must meet: an output cosine, or a bound on a task metric."""

    cosine: float | None = None
    metric: tuple[str, str, float] | None = None  # (name, ">=" or "<=", value)

    def accuracy(self, measured: dict) -> float:
        if self.metric is None:
            return measured["cosine"]
        values = measured["metric"]
        if self.metric[0] not in values:
            raise SolverError(f"--target-metric names {self.metric[0]!r} but the metric returns {sorted(values)}; name one of them")
        return float(values[self.metric[0]])

    def score(self, accuracy: float) -> float:
        """Higher is better."""
        return -accuracy if self.metric is not None and self.metric[1] == "<=" else accuracy

    def met(self, accuracy: float) -> bool:
        if self.metric is None:
            return accuracy >= self.cosine
        return accuracy >= self.metric[2] if self.metric[1] == ">=" else accuracy <= self.metric[2]

    @property
    def label(self) -> str:
        return self.metric[0] if self.metric else "output cosine vs FP32"

    @property
    def value(self) -> float | None:
        return self.metric[2] if self.metric else self.cosine


@dataclass
class SolveResult:
    plan: QuantPlan
    chosen: dict
    candidates: list[dict]
    order: list[str]
    output: Path | None = None
    report_path: Path | None = None
    curve_path: Path | None = None
    model_path: Path | None = None
    timings: dict = field(default_factory=dict)
    smoothquant: dict | None = None
    metric: str | None = None

    def to_json(self) -> dict:
        return {
            "plan": str(self.output) if self.output else None,
            "model": str(self.model_path) if self.model_path else None,
            "smoothquant": self.smoothquant,
            "metric": self.metric,
            "plan_summary": self.plan.summary() if self.plan is not None else None,
            "chosen": self.chosen,
            "promotion_order": self.order,
            "candidates": self.candidates,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


def _check_request(target_cosine, target_metric, max_high_precision_layers, order_by: str, min_8bit_macs) -> None:
    if order_by not in ORDERS:
        raise SolverError(f"unknown promotion order {order_by!r}; choose one of {list(ORDERS)}")
    given = [x is not None for x in (target_cosine, target_metric, max_high_precision_layers)]
    if sum(given) != 1:
        raise SolverError("give exactly one target: --target-cosine C, --target-metric NAME>=VALUE (with --metric or --zoo) or --max-high-precision-layers N")
    if target_cosine is not None and not 0 < target_cosine <= 1:
        raise SolverError(f"--target-cosine must be in (0, 1], got {target_cosine}")
    if max_high_precision_layers is not None and max_high_precision_layers < 0:
        raise SolverError(f"--max-high-precision-layers must be >= 0, got {max_high_precision_layers}")
    if min_8bit_macs is not None and not 0 <= min_8bit_macs <= 1:
        raise SolverError(f"--min-8bit-macs must be a fraction in [0, 1], got {min_8bit_macs}")


def _target(target_cosine, target_metric, metric: TaskMetric | None) -> _Target:
    if target_metric is None:
        return _Target(cosine=target_cosine)
    if metric is None:
        raise SolverError("--target-metric needs a task metric: pass --metric MODULE:FUNCTION or --zoo NAME")
    return _Target(metric=parse_metric_target(target_metric, metric.lower_is_better))


def _solver_precisions(swept: SweepResult, precisions) -> list[str]:
    if precisions is None:
        return list(swept.precisions)
    chosen = list(check_precisions(precisions))
    missing = [p for p in chosen if p not in swept.precisions]
    if missing:
        raise SolverError(f"the sweep did not measure {missing}; it has {swept.precisions} (run onnxq sweep --precisions ...)")
    return chosen


def _sweep_layers(float_model: ir.Model, base: QuantPlan, swept: SweepResult) -> list[Layer]:
    """The model's layers, which must be the sweep's, with the costs the sweep measured."""
    layers = layer_groups(float_model, base)
    by_name = {la.name: la for la in swept.layers}
    if [la.name for la in layers] != [la.name for la in swept.layers]:
        if set(by_name) < {la.name for la in layers}:
            raise SweepError(f"the sweep covers {len(by_name)} of the model's {len(layers)} layers; the solver needs a sweep of all of them (no --layers)")
        raise SweepError("the sweep's layers differ from this model's; run onnxq sweep again with this onnxq version")
    for la in layers:  # costs come from the shapes the sweep ran with
        s = by_name[la.name]
        la.macs, la.matmul_macs, la.float_side_macs, la.weight_elements, la.activation_elements, la.output_elements = s.macs, s.matmul_macs, s.float_side_macs, s.weight_elements, s.activation_elements, s.output_elements
    return layers


@dataclass
class _Problem:
    """The float model as the sweep measured it (smoothed, opset raised), its plan and layers."""

    model: ir.Model
    base: QuantPlan
    layers: list[Layer]
    calib: DataSource
    eval: DataSource
    timings: dict
    gptq: dict[str, dict[str, str]] = field(default_factory=dict)  # {precision: {weight key: GPTQ offsets}}


def _load_problem(swept: SweepResult, recipe: Recipe, model, calib, eval, eval_samples: int | None) -> _Problem:
    float_model = load_and_preprocess(model)
    if model_hash(float_model) != swept.model_sha256:
        raise SweepError(f"the sweep was made for another model (its model hash differs from {model}'s); run onnxq sweep on this model")
    spec = ort_rt.model_input_spec(float_model)
    calib_data = open_source(calib, spec, limit=recipe.calib_samples)
    if eval is None:
        raise SolverError("the solver verifies on held-out data: pass --eval DATA (not the calibration data)")
    eval_data = open_source(eval, spec, limit=eval_samples, require_finite=False)
    base = plan_for(float_model, recipe)
    fold_rotation(float_model, base, recipe)
    fold_equalization(float_model, base, recipe)
    timings: dict[str, float] = {}
    apply_smoothing(float_model, base, calib_data, recipe.smoothquant, recipe.split_outliers, timings)
    prepare_opset(float_model, base, swept.precisions)
    return _Problem(float_model, base, _sweep_layers(float_model, base, swept), calib_data, eval_data, timings)


@dataclass
class _Promotion:
    """Each layer's best 8-bit precision, its sensitivity there, and the order of promotion."""

    best8: dict[str, str]
    sensitivity: dict[str, float]
    order: list[str]
    min_8bit_macs: float | None


def _promotion(swept: SweepResult, layers: list[Layer], precisions: list[str], costs: dict, order_by: str, min_8bit_macs: float | None) -> _Promotion:
    names = [la.name for la in layers]
    best8 = best_precisions(names, precisions, swept.sensitivity)
    sens = {n: swept.sensitivity(n, best8[n]) for n in names}
    extra = {n: costs[n][FLOAT] - costs[n][best8[n]] for n in names} if order_by == "per-cost" else None
    order = promotion_order(names, sens, extra)
    if min_8bit_macs is not None:  # skip promotions that would leave too few MACs in 8 bits
        order = apply_macs_floor(order, {la.name: la.matmul_macs for la in layers}, sum(la.float_side_macs for la in layers), min_8bit_macs)
    return _Promotion(best8, sens, order, min_8bit_macs)


class _Candidates:
    """One family of candidates: an 8-bit precision per layer (``base``: each layer's best, or one
    precision for all) with the first k layers of its promotion order in high precision, by k;
    each is built and evaluated once. Costs are relative to ``reference`` (the per-layer best
    all-8-bit cost), the same for every family."""

    def __init__(self, problem: _Problem, ranges: Ranges, evaluator: Evaluator, costs: dict, promotion: _Promotion, target: _Target, base: str, reference: float):
        self.problem, self.ranges, self.evaluator, self.costs = problem, ranges, evaluator, costs
        self.promotion, self.target, self.base, self.reference = promotion, target, base, reference
        self.by_count: dict[int, dict] = {}
        layers = problem.layers
        self.all8 = sum(costs[la.name][promotion.best8[la.name]] for la in layers)
        self.always_high_macs = sum(la.float_side_macs for la in layers)  # split-off channels, online rotations
        self.total_macs = sum(la.matmul_macs for la in layers) + self.always_high_macs
        self.matmul_macs = {la.name: la.matmul_macs for la in layers}

    def assignment(self, k: int) -> dict[str, str]:
        promoted = set(self.promotion.order[:k])
        return {node: (FLOAT if la.name in promoted else self.promotion.best8[la.name]) for la in self.problem.layers for node in la.nodes}

    def plan(self, k: int, reasons: dict[str, str] | None = None) -> QuantPlan:
        return assemble_plan(self.problem.model, self.problem.base, self.assignment(k), self.ranges, reasons, self.problem.gptq)

    def evaluate(self, k: int) -> dict:
        if k not in self.by_count:
            self.by_count[k] = self._measure(k)
        return self.by_count[k]

    def passes(self, k: int) -> bool:
        return self.target.met(self.evaluate(k)["accuracy"])

    def listed(self) -> list[dict]:
        return [self.by_count[k] for k in sorted(self.by_count)]

    def _measure(self, k: int) -> dict:
        r = self.evaluator.evaluate(self.plan(k))
        promoted = self.promotion.order[:k]
        cost = self.all8 + sum(self.costs[n][FLOAT] - self.costs[n][self.promotion.best8[n]] for n in promoted)
        mm8 = self.total_macs - self.always_high_macs - sum(self.matmul_macs[n] for n in promoted)
        acc = self.target.accuracy(r)
        c = {
            "base": self.base,
            "high_precision_layers": k,
            "promoted": promoted,
            "cost": cost / self.reference if self.reference else 0.0,
            "accuracy": acc,
            "cosine": r["cosine"],
            "snr_db": r["snr_db"] if r["snr_db"] is not None and math.isfinite(r["snr_db"]) else None,
            "metric": r.get("metric"),
            "matmul_macs_8bit_fraction": mm8 / self.total_macs if self.total_macs else 1.0,
        }
        log(f"onnxq: {self.base}, {k} layers in high precision: accuracy {acc:.4f}, cost x{c['cost']:.3f}, 8-bit MatMul/Gemm MACs {c['matmul_macs_8bit_fraction']:.1%}")
        return c


def _reasons(layers: list[Layer], promotion: _Promotion, k: int) -> dict[str, str]:
    """Why each node got its precision, for the plan."""
    rank = {name: i for i, name in enumerate(promotion.order)}
    out = {}
    for la in layers:
        best8 = promotion.best8[la.name]
        if la.name not in rank:
            what = f"{best8}: promoting it would leave less than {promotion.min_8bit_macs:.0%} of MatMul/Gemm MACs in 8 bits"
        else:
            what = ("kept in high precision" if rank[la.name] < k else best8) + f" (promotion rank {rank[la.name] + 1}"
            what += f", sweep NSR {promotion.sensitivity[la.name]:.3g})"
        for node in la.nodes:
            out[node] = f"solver: {what}"
    return out


def _families(problem: _Problem, ranges: Ranges, evaluator: Evaluator, costs: dict, target: _Target, swept: SweepResult, precisions: list[str], order_by: str, min_8bit_macs: float | None) -> list[_Candidates]:
    """Each layer at its best 8-bit precision first, then each precision for every layer (the
    uniform plans ``onnxq quantize --precision P`` makes), skipping a duplicate of the first."""
    def family(precisions: list[str]) -> tuple[str, _Promotion]:
        promotion = _promotion(swept, problem.layers, precisions, costs, order_by, min_8bit_macs)
        used = set(promotion.best8.values())
        return (f"all {used.pop()}" if len(used) == 1 else "per-layer best"), promotion

    bases = dict([family(precisions)])
    for p in precisions:
        label, promotion = family([p])
        bases.setdefault(label, promotion)
    best8 = next(iter(bases.values())).best8
    reference = sum(costs[la.name][best8[la.name]] for la in problem.layers)
    return [_Candidates(problem, ranges, evaluator, costs, promotion, target, label, reference) for label, promotion in bases.items()]


def _choose(families: list[_Candidates], swept: SweepResult, max_high_precision_layers: int | None) -> tuple[_Candidates, int] | None:
    """The chosen family and count: every all-8-bit candidate is evaluated first; promotions
    start from the most accurate of them; the choice is never dominated by a candidate evaluated
    (costs no more and is no less accurate). None: no candidate meets the target."""
    score = families[0].target.score
    search = max(families, key=lambda f: score(f.evaluate(0)["accuracy"]))  # ties: the first
    k = _choose_count(search, swept, max_high_precision_layers)
    evaluated = _evaluated(families)
    if max_high_precision_layers is not None:
        chosen = undominated(search.by_count[k], evaluated, score)
    else:
        chosen = cheapest_meeting(evaluated, search.target.met, score)
    if chosen is None:
        return None
    family = next(f for f in families if f.base == chosen["base"])
    return family, chosen["high_precision_layers"]


def _evaluated(families: list[_Candidates]) -> list[dict]:
    return [c for f in families for c in f.listed()]


def _choose_count(cands: _Candidates, swept: SweepResult, max_high_precision_layers: int | None) -> int | None:
    """How many layers to promote: the given number, or the smallest that meets the target (None: not even all)."""
    promotion, n = cands.promotion, len(cands.promotion.order)
    if max_high_precision_layers is not None:
        k = min(max_high_precision_layers, n)
        cands.evaluate(k)
        return k
    start = 0
    if cands.target.cosine is not None and swept.e2e:
        start = initial_count(promotion.order, promotion.sensitivity, cands.target.cosine)
    return smallest_passing_count(cands.passes, n, start)


def _unmet(families: list[_Candidates], n_layers: int) -> str:
    cands = next(f for f in families if len(f.promotion.order) in f.by_count)  # the family searched up to all layers
    n = len(cands.promotion.order)
    floor = f" the --min-8bit-macs floor allows to promote ({n} of {n_layers})" if cands.promotion.min_8bit_macs is not None else ""
    return f"the target is not met even with every layer{floor} in high precision (accuracy {cands.by_count[n]['accuracy']:.4f}); lower the target" + (" or the floor" if floor else "")


def _save_model(float_proto: onnx.ModelProto, plan: QuantPlan, path: Path) -> Path:
    modelio.save(ir.serde.deserialize_model(qdq_proto(float_proto, plan)), path)
    log(f"onnxq: wrote {path} (the chosen candidate)")
    return path


@quiet_option
def solve(
    sweep: str | os.PathLike | SweepResult,
    model: str | os.PathLike,
    calib: DataArg,
    output: str | os.PathLike | None = None,
    *,
    eval: DataArg | None = None,
    target_cosine: float | None = None,
    target_metric: str | None = None,
    max_high_precision_layers: int | None = None,
    metric: str | None = None,
    latency_json: str | os.PathLike | None = None,
    min_8bit_macs: float | None = None,
    precisions: str | list[str] | None = None,
    order_by: str = "sensitivity",
    calib_samples: int | None = None,
    eval_samples: int | None = None,
    method: MethodArg = None,
    percentile: float | None = None,
    save_model: str | os.PathLike | None = None,
    plot: bool = True,
) -> SolveResult:
    """Choose every layer's precision (see the module docstring); write the plan to ``output``
    with ``<stem>.solve.json`` and ``<stem>.curve.png`` beside it.

    ``metric``: the task metric spec ``target_metric`` names (default: the sweep's).
    ``min_8bit_macs``: never promote a layer if that leaves less than this fraction of MatMul/Gemm
    MACs in 8 bits. ``precisions``: a subset of the sweep's 8-bit candidates. ``order_by``:
    "sensitivity" or "per-cost" (sensitivity per unit of added cost). ``save_model``: also write
    the chosen candidate's Q/DQ model, the very model whose accuracy the report gives.
    """
    t0 = time.perf_counter()
    _check_request(target_cosine, target_metric, max_high_precision_layers, order_by, min_8bit_macs)
    inputs = [sweep, model, calib, eval, latency_json, metric]
    modelio.check_outputs([*solve_outputs(Path(output) if output is not None else None, plot), save_model], inputs)  # before any work
    swept = sweep if isinstance(sweep, SweepResult) else SweepResult.load(sweep)
    task_metric = load_metric(metric or swept.metric) if (metric or swept.metric) else None
    target = _target(target_cosine, target_metric, task_metric)
    output = Path(output) if output is not None else None
    save_model = Path(save_model) if save_model is not None else None
    with modelio.transaction([*solve_outputs(output, plot), save_model], inputs):
        recipe = swept.the_recipe().merged({k: v for k, v in {"calib_method": method, "percentile": percentile, "calib_samples": calib_samples}.items() if v is not None})
        problem = _load_problem(swept, recipe, model, calib, eval, eval_samples)
        precisions = _solver_precisions(swept, precisions)
        costs = layer_costs(problem.layers, precisions, latency_json)
        ranges = calibrate_ranges(problem.model, problem.base, problem.calib, precisions, method=recipe.calib_method, percentile=recipe.percentile)
        if recipe.weight_method == "gptq":
            t = time.perf_counter()
            problem.gptq = gptq_offsets(problem.model, problem.base, problem.calib, ranges, precisions, recipe.gptq_act_order)
            problem.timings["gptq"] = time.perf_counter() - t
        float_proto = modelio.to_proto(problem.model)
        evaluator = Evaluator(float_proto, model, problem.eval, metric=task_metric, outputs=target.metric is None)
        families = _families(problem, ranges, evaluator, costs, target, swept, precisions, order_by, min_8bit_macs)
        choice = _choose(families, swept, max_high_precision_layers)
        if choice is None:
            # The candidates evaluated stay for the user to look at: they are written, and the
            # error is raised once they are in place.
            report = _write_outputs(SolveResult(None, None, _evaluated(families), families[0].promotion.order), output, target, plot)
            unmet = TargetNotMetError(_unmet(families, len(problem.layers)) + (f"; the candidates evaluated are in {report}" if report else ""), report)
        else:
            unmet = None
            cands, chosen_k = choice
            plan = cands.plan(chosen_k, _reasons(problem.layers, cands.promotion, chosen_k))
            chosen = dict(cands.by_count[chosen_k])
            cands.by_count[chosen_k]["chosen"] = True
            result = SolveResult(plan, chosen, _evaluated(families), cands.promotion.order, metric=task_metric.spec if task_metric else None)
            if swept.smoothquant is not None:
                result.smoothquant = {"alpha": swept.smoothquant, "split_outliers": swept.split_outliers}
            if save_model is not None:
                result.model_path = _save_model(float_proto, plan, save_model)
            result.timings = {"total": time.perf_counter() - t0, "evaluate": evaluator.seconds, "calibrate": ranges.seconds, **problem.timings}
            _write_outputs(result, output, target, plot)
    if unmet is not None:
        raise unmet
    return result


def solve_outputs(output: Path | None, plot: bool = True) -> list[Path]:
    """The plan, ``<stem>.solve.json`` and (with ``plot``) ``<stem>.curve.png``."""
    if output is None:
        return []
    stem = output.with_suffix("") if output.suffix == ".json" else output
    return [output, stem.with_name(stem.name + ".solve.json"), *([stem.with_name(stem.name + ".curve.png")] if plot else [])]


def _write_outputs(result: SolveResult, output: Path | None, target: _Target, plot: bool) -> Path | None:
    """The plan (when there is one), ``<stem>.solve.json`` and ``<stem>.curve.png``."""
    if output is None:
        return None
    stem = output.with_suffix("") if output.suffix == ".json" else output
    if result.plan is not None:
        result.plan.save(output)
        result.output = output
    result.report_path = stem.with_name(stem.name + ".solve.json")
    with modelio.atomic_path(result.report_path) as tmp:
        tmp.write_text(json.dumps(result.to_json(), indent=1))
    if plot:
        from onnxq.plots import solver_curve

        result.curve_path = solver_curve(result.candidates, stem.with_name(stem.name + ".curve.png"), accuracy_label=target.label, target=target.value)
    return result.report_path
