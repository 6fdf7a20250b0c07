"""Mixed-precision assignment: the cheapest precision per layer that meets an accuracy target.

Inputs: a sweep (:mod:`onnxq.sensitivity`), the model, calibration and held-out data, and a cost
per layer and precision. The solver

1. gives each layer its best 8-bit precision (the candidate with the smallest sweep error; 8-bit
   formats cost the same);
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
   smallest count that holds (accuracy is taken as monotone in the count);
4. writes the QuantPlan (replay with ``onnxq quantize --plan``), a JSON report of every candidate
   it evaluated and an accuracy-versus-cost curve (PNG).

A sweep made with SmoothQuant (``--smoothquant``, ``--split-outliers``) is solved on the model
smoothed the same way (the sweep records the settings and its range method); the MACs of
split-off channels are float in every candidate.

Cost: ``--latency-json`` gives measured costs ``{layer or node name: {precision: cost}}`` (e.g.
from a TensorRT profile); node costs are summed per layer. Without it, a nominal roofline per
layer and sample: time = max(MACs / peak, bytes / bandwidth), 8-bit peak twice the 16-bit one,
8-bit tensors one byte an element and high precision two (FP16, what TensorRT runs outside
Q/DQ), outputs written in 16 bits either way.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from onnxq import modelio
from onnxq.calibration import DataArg, MethodArg
from onnxq.data import open_source
from onnxq.errors import OnnxqError
from onnxq.layer_groups import Layer, layer_groups
from onnxq.plan import FLOAT, QuantPlan
from onnxq.progress import log
from onnxq.runtime import ort as ort_rt
from onnxq.sensitivity import (
    Evaluator,
    SweepError,
    SweepResult,
    apply_smoothing,
    assemble_plan,
    calibrate_ranges,
    prepare_opset,
    qdq_proto,
    read_json,
)

# Nominal roofline (an A100-like device; only ratios matter): MAC/s by precision, bytes/s.
PEAK_MACS = {"float": 156e12, "int8": 312e12, "fp8": 312e12}
BANDWIDTH = 2.0e12
ELEMENT_BYTES = {"float": 2, "int8": 1, "fp8": 1}
LOWER_IS_BETTER = ("kl", "perplexity")
ORDERS = ("sensitivity", "per-cost")


class SolverError(OnnxqError):
    """A solver request cannot be met or is malformed."""


def roofline_cost(layer: Layer, precision: str) -> float:
    """Microseconds per sample on the nominal roofline."""
    size = ELEMENT_BYTES.get(precision, 1)
    moved = (layer.weight_elements + layer.activation_elements) * size + layer.output_elements * ELEMENT_BYTES["float"]
    return 1e6 * max(layer.macs / PEAK_MACS.get(precision, PEAK_MACS["int8"]), moved / BANDWIDTH)


def load_latency(path: str | os.PathLike, layers: list[Layer], precisions: list[str]) -> dict[str, dict[str, float]]:
    """Per-layer costs from ``{layer or node name: {precision: cost}}``; every layer must be covered."""
    path = Path(path)
    data = read_json(path, "latency", SolverError, "give {layer or node name: {precision: cost}}")
    if not isinstance(data, dict):
        raise SolverError(f"{path} must map layer or node names to {{precision: cost}}")
    out = {}
    for layer in layers:
        keys = [layer.name] if layer.name in data else [n for n in layer.nodes if n in data]
        if not keys:
            raise SolverError(f"{path} has no cost for layer {layer.name!r} (nodes {layer.nodes}); give each layer or its nodes {{precision: cost}}")
        out[layer.name] = {}
        for p in [*precisions, FLOAT]:
            try:
                out[layer.name][p] = float(sum(float(data[k][p]) for k in keys if p in data[k]))
            except (TypeError, ValueError):
                raise SolverError(f"{path}: the cost of {keys} at {p!r} is not a number") from None
            if not any(p in data[k] for k in keys):
                raise SolverError(f"{path}: no {p!r} cost for layer {layer.name!r}")
    return out


def parse_metric_target(text: str) -> tuple[str, str, float]:
    """``NAME>=VALUE``, ``NAME<=VALUE`` or ``NAME=VALUE`` (higher is better except for kl/perplexity)."""
    m = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*(>=|<=|=)\s*([-+0-9.eE]+)\s*", text or "")
    if not m:
        raise SolverError(f"--target-metric {text!r} is not NAME>=VALUE (e.g. top1_agreement>=0.97)")
    name, op, value = m.group(1), m.group(2), float(m.group(3))
    if op == "=":
        op = "<=" if name in LOWER_IS_BETTER else ">="
    return name, op, value


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

    def to_json(self) -> dict:
        return {
            "plan": str(self.output) if self.output else None,
            "model": str(self.model_path) if self.model_path else None,
            "smoothquant": self.smoothquant,
            "plan_summary": self.plan.summary() if self.plan is not None else None,
            "chosen": self.chosen,
            "promotion_order": self.order,
            "candidates": self.candidates,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


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
    zoo: str | None = None,
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
    quiet: bool = False,
) -> SolveResult:
    """Choose every layer's precision (see the module docstring); write the plan to ``output``
    with ``<stem>.solve.json`` and ``<stem>.curve.png`` beside it.

    ``min_8bit_macs``: a floor on the fraction of MatMul/Gemm MACs left in 8 bits; a layer whose
    promotion would break it is never promoted (the promotion order skips it). ``precisions``: the
    8-bit candidates to use, a subset of the sweep's (default: all of them). ``order_by``:
    "sensitivity" (most sensitive first) or "per-cost" (sensitivity per unit of added cost).
    A sweep made with ``smoothquant``/``split_outliers`` is solved on the model smoothed the same
    way; MACs of split-off channels count as high precision. ``save_model``: also write the
    chosen candidate's Q/DQ model, the very model whose accuracy the report gives.
    """
    if order_by not in ORDERS:
        raise SolverError(f"unknown promotion order {order_by!r}; choose one of {list(ORDERS)}")
    from onnxq.calibrators import model_hash
    from onnxq.passes.preprocess import load_and_preprocess
    from onnxq.placement import place

    t0 = time.perf_counter()
    given = [x is not None for x in (target_cosine, target_metric, max_high_precision_layers)]
    if sum(given) != 1:
        raise SolverError("give exactly one target: --target-cosine C, --target-metric NAME>=VALUE (with --zoo) or --max-high-precision-layers N")
    if target_cosine is not None and not 0 < target_cosine <= 1:
        raise SolverError(f"--target-cosine must be in (0, 1], got {target_cosine}")
    if max_high_precision_layers is not None and max_high_precision_layers < 0:
        raise SolverError(f"--max-high-precision-layers must be >= 0, got {max_high_precision_layers}")
    result_sweep = sweep if isinstance(sweep, SweepResult) else SweepResult.load(sweep)
    zoo = zoo or result_sweep.zoo
    if method is None:  # the ranges the sweep measured with
        method = result_sweep.method
    metric = None
    if target_metric is not None:
        metric = parse_metric_target(target_metric)
        if zoo is None:
            raise SolverError("--target-metric needs --zoo NAME (the zoo model whose task metric it names)")
    if output is not None:
        output = modelio.check_output_path(output, model)
    if save_model is not None:
        save_model = modelio.check_output_path(save_model, model)
    float_model = load_and_preprocess(model)
    if model_hash(float_model) != result_sweep.model_sha256:
        raise SweepError(f"the sweep was made for another model (its model hash differs from {model}'s); run onnxq sweep on this model")
    spec = ort_rt.model_input_spec(float_model)
    calib_data = open_source(calib, spec, limit=calib_samples)
    if eval is None:
        raise SolverError("the solver verifies on held-out data: pass --eval DATA (not the calibration data)")
    eval_data = open_source(eval, spec, limit=eval_samples, require_finite=False)
    base = place(float_model, result_sweep.target)
    timings: dict[str, float] = {}
    apply_smoothing(float_model, base, calib_data, result_sweep.smoothquant, result_sweep.split_outliers, timings, quiet)
    prepare_opset(float_model, result_sweep.precisions)
    layers = layer_groups(float_model, base)
    by_name = {la.name: la for la in result_sweep.layers}
    if [la.name for la in layers] != [la.name for la in result_sweep.layers]:
        if set(by_name) < {la.name for la in layers}:
            raise SweepError(f"the sweep covers {len(by_name)} of the model's {len(layers)} layers; the solver needs a sweep of all of them (no --layers)")
        raise SweepError("the sweep's layers differ from this model's; run onnxq sweep again with this onnxq version")
    for la in layers:  # costs come from the shapes the sweep ran with
        s = by_name[la.name]
        la.macs, la.matmul_macs, la.split_macs, la.weight_elements, la.activation_elements, la.output_elements = s.macs, s.matmul_macs, s.split_macs, s.weight_elements, s.activation_elements, s.output_elements
    if precisions is None:
        precisions = list(result_sweep.precisions)
    else:
        from onnxq.sensitivity import check_precisions

        precisions = list(check_precisions(precisions))
        missing = [p for p in precisions if p not in result_sweep.precisions]
        if missing:
            raise SolverError(f"the sweep did not measure {missing}; it has {result_sweep.precisions} (run onnxq sweep --precisions ...)")
    if min_8bit_macs is not None and not 0 <= min_8bit_macs <= 1:
        raise SolverError(f"--min-8bit-macs must be a fraction in [0, 1], got {min_8bit_macs}")
    costs = load_latency(latency_json, layers, precisions) if latency_json else {
        la.name: {p: roofline_cost(la, p) for p in [*precisions, FLOAT]} for la in layers
    }

    ranges = calibrate_ranges(float_model, base, calib_data, precisions, method=method, percentile=percentile, quiet=quiet)
    float_proto = modelio.to_proto(float_model)
    evaluator = Evaluator(float_proto, model, eval_data, zoo=zoo if (metric or zoo) else None, quiet=quiet, outputs=metric is None)

    best8 = {la.name: min(precisions, key=lambda p: result_sweep.sensitivity(la.name, p)) for la in layers}
    sens = {la.name: result_sweep.sensitivity(la.name, best8[la.name]) for la in layers}

    def gain(la: Layer) -> float:
        if order_by == "sensitivity":
            return sens[la.name]
        extra = costs[la.name][FLOAT] - costs[la.name][best8[la.name]]
        return sens[la.name] / max(extra, 1e-12)

    order = [la.name for la in sorted(layers, key=gain, reverse=True)]
    all8 = sum(costs[la.name][best8[la.name]] for la in layers)
    side_mm = sum(la.split_macs for la in layers)  # split-off channels: high precision in every candidate
    total_mm = sum(la.matmul_macs for la in layers) + side_mm
    layer_of = {la.name: la for la in layers}
    if min_8bit_macs is not None:  # skip promotions that would leave too few MACs in 8 bits
        budget, kept = (1 - min_8bit_macs) * total_mm - side_mm, []
        for name in order:
            if layer_of[name].matmul_macs <= budget:
                budget -= layer_of[name].matmul_macs
                kept.append(name)
        order = kept

    def assignment(k: int) -> dict[str, str]:
        promoted = set(order[:k])
        return {node: (FLOAT if la.name in promoted else best8[la.name]) for la in layers for node in la.nodes}

    def reasons(k: int) -> dict[str, str]:
        rank = {name: i for i, name in enumerate(order)}
        out = {}
        for la in layers:
            if la.name not in rank:
                what = f"{best8[la.name]}: promoting it would leave less than {min_8bit_macs:.0%} of MatMul/Gemm MACs in 8 bits"
            else:
                what = ("kept in high precision" if rank[la.name] < k else best8[la.name]) + f" (promotion rank {rank[la.name] + 1}"
                what += f", sweep NSR {sens[la.name]:.3g})"
            for node in la.nodes:
                out[node] = f"solver: {what}"
        return out

    candidates: dict[int, dict] = {}

    def evaluate(k: int) -> dict:
        if k in candidates:
            return candidates[k]
        plan = assemble_plan(float_model, base, assignment(k), ranges)
        r = evaluator.evaluate(plan)
        cost = all8 + sum(costs[n][FLOAT] - costs[n][best8[n]] for n in order[:k])
        mm8 = total_mm - side_mm - sum(layer_of[n].matmul_macs for n in order[:k])
        if metric is not None:
            acc = float(r["metric"][metric[0]])
        else:
            acc = r["cosine"]
        c = {
            "high_precision_layers": k,
            "promoted": order[:k],
            "cost": cost / all8 if all8 else 0.0,
            "accuracy": acc,
            "cosine": r["cosine"],
            "snr_db": r["snr_db"] if r["snr_db"] is not None and math.isfinite(r["snr_db"]) else None,
            "metric": r.get("metric"),
            "matmul_macs_8bit_fraction": mm8 / total_mm if total_mm else 1.0,
        }
        candidates[k] = c
        log(f"onnxq: {k} layers in high precision: accuracy {acc:.4f}, cost x{c['cost']:.3f}, 8-bit MatMul/Gemm MACs {c['matmul_macs_8bit_fraction']:.1%}", quiet)
        return c

    def ok(k: int) -> bool:
        acc = evaluate(k)["accuracy"]
        if metric is not None:
            return acc >= metric[2] if metric[1] == ">=" else acc <= metric[2]
        return acc >= target_cosine

    n = len(order)
    if max_high_precision_layers is not None:
        chosen_k = min(max_high_precision_layers, n)
        evaluate(chosen_k)
    else:
        k0 = 0
        if target_cosine is not None and result_sweep.e2e:
            budget = 1 / target_cosine**2 - 1
            remaining = sum(sens[x] for x in order)
            while k0 < n and remaining > budget:
                remaining -= sens[order[k0]]
                k0 += 1
        failure = None
        lo, hi = -1, None  # largest count known to fail, smallest known to hold
        if ok(0):  # the all-8-bit baseline is always evaluated: the curve's first point
            hi = 0
        elif k0 > 0 and ok(k0):
            lo, hi = 0, k0
        else:
            lo, step = k0, 1
            while hi is None:
                k = min(n, lo + step)
                if ok(k):
                    hi = k
                elif k == n:
                    floor = f" the --min-8bit-macs floor allows to promote ({n} of {len(layers)})" if min_8bit_macs is not None else ""
                    failure = f"the target is not met even with every layer{floor} in high precision (accuracy {candidates[n]['accuracy']:.4f}); lower the target" + (" or the floor" if floor else "")
                    break
                else:
                    lo, step = k, step * 2
        if failure is not None:
            report = _write_outputs(SolveResult(None, None, [candidates[k] for k in sorted(candidates)], order), output, metric, target_cosine, plot, quiet)
            raise SolverError(failure + (f"; the candidates evaluated are in {report}" if report else ""))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid
        chosen_k = hi
    plan = assemble_plan(float_model, base, assignment(chosen_k), ranges, reasons(chosen_k))
    chosen = dict(candidates[chosen_k])
    candidates[chosen_k]["chosen"] = True
    result = SolveResult(plan, chosen, [candidates[k] for k in sorted(candidates)], order)
    if result_sweep.smoothquant is not None:
        result.smoothquant = {"alpha": result_sweep.smoothquant, "split_outliers": result_sweep.split_outliers}
    if save_model is not None:
        proto = qdq_proto(float_proto, plan)
        modelio.save(ir.serde.deserialize_model(proto), save_model)
        result.model_path = save_model
        log(f"onnxq: wrote {save_model} (the chosen candidate)", quiet)
    result.timings = {"total": time.perf_counter() - t0, "evaluate": evaluator.seconds, "calibrate": ranges.seconds, **timings}
    _write_outputs(result, output, metric, target_cosine, plot, quiet)
    return result


def _write_outputs(result: SolveResult, output: Path | None, metric, target_cosine, plot: bool, quiet: bool) -> Path | None:
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

        label = metric[0] if metric else "output cosine vs FP32"
        target_value = metric[2] if metric else target_cosine
        result.curve_path = solver_curve(result.candidates, stem.with_name(stem.name + ".curve.png"), accuracy_label=label, target=target_value, quiet=quiet)
    return result.report_path
