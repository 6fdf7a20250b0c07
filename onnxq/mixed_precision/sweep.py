"""The per-layer sensitivity sweep: the error of quantizing one layer alone, per candidate precision.

A layer is a group of plan nodes that must share a precision (:mod:`.groups`). Two modes:

- ``local`` (:mod:`.local`): one ORT pass over the data measures every layer through quantized
  twins of its linear nodes; the error is the layer's own, not accumulated from layers before it;
- ``e2e`` (:mod:`.e2e`): for each layer and precision, a model with only that layer quantized; the
  error of the model's output against FP32 (cosine, SNR) and, with a task metric, that metric.
  One model and one evaluation per layer per precision: the expensive baseline the local mode
  stands in for.

When both run, the Spearman rank correlation between the two modes' SNRs says how well the local
ranking predicts the end-to-end one.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from onnxq import modelio
from onnxq.calibration import DataArg, MethodArg
from onnxq.calibrators import model_hash
from onnxq.data import DataSource, open_source
from onnxq.metrics import spearman
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.pipeline import fold_equalization, fold_rotation, make_recipe
from onnxq.placement import plan_for
from onnxq.plan import QUANTIZED_PRECISIONS, QuantPlan
from onnxq.progress import log, quiet_option
from onnxq.recipe import Recipe
from onnxq.runtime import ort as ort_rt
from onnxq.smoothquant import split_fractions
from onnxq.task_metric import load_metric

from .candidates import apply_smoothing, prepare_opset
from .costs import fill_costs
from .e2e import Evaluator, e2e_sweep
from .groups import Layer, layer_groups
from .local import local_sweep
from .options import SweepError, check_precisions, read_json
from .ranges import Ranges, calibrate_ranges

SWEEP_FORMAT = "onnxq.sweep/1"
MODES = ("local", "e2e", "both")
# Sweep files written before the metric plug-in name a zoo model instead of a metric spec; the
# zoo's metric functions are named after its models (a string: the core does not import the zoo).
_ZOO_METRICS = "onnxq.zoo.metrics"


# --------------------------------------------------------------------------------------------
# The result


@dataclass
class SweepResult:
    model_sha256: str
    target: str
    precisions: list[str]
    mode: str
    layers: list[Layer]
    local: dict = field(default_factory=dict)
    e2e: dict = field(default_factory=dict)
    spearman: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    metric: str | None = None  # the task metric spec (onnxq.task_metric) the e2e mode measured
    samples: dict = field(default_factory=dict)
    smoothquant: float | str | None = None
    split_outliers: int = 0
    method: str | dict | None = None  # the range method asked for (None: the target's default)
    recipe: dict | None = None  # the request the sweep measured (onnxq.recipe); solve repeats it

    def sensitivity(self, layer: str, precision: str) -> float:
        """Noise-to-signal ratio of quantizing ``layer`` alone at ``precision``: end to end when
        measured, else at the layer's output. Higher is more sensitive."""
        source = self.e2e if self.e2e else self.local
        snr = source[layer][precision]["snr_db"]
        return 10 ** (-snr / 10) if math.isfinite(snr) else (0.0 if snr > 0 else math.inf)

    def to_json(self) -> dict:
        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        return clean({
            "format": SWEEP_FORMAT,
            "model_sha256": self.model_sha256,
            "target": self.target,
            "precisions": self.precisions,
            "mode": self.mode,
            "metric": self.metric,
            "samples": self.samples,
            "smoothquant": self.smoothquant,
            "split_outliers": self.split_outliers,
            "calibration_method": self.method,
            "recipe": self.recipe,
            "layers": [layer.to_json() for layer in self.layers],
            "local": self.local,
            "e2e": self.e2e,
            "spearman": self.spearman,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        })

    @classmethod
    def load(cls, path: str | os.PathLike) -> SweepResult:
        path = Path(path)
        data = read_json(path, "sweep", SweepError, "write one with onnxq sweep")

        def unclean(x):
            if isinstance(x, str) and x in ("inf", "-inf", "nan"):
                return float(x)
            if isinstance(x, dict):
                return {k: unclean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [unclean(v) for v in x]
            return x

        if not isinstance(data, dict) or data.get("format") != SWEEP_FORMAT:
            raise SweepError(f"{path} is not an onnxq sweep (expected \"format\": \"{SWEEP_FORMAT}\"); write one with onnxq sweep")
        try:
            data = unclean(data)
            return cls(
                model_sha256=data["model_sha256"], target=data["target"], precisions=list(data["precisions"]),
                mode=data["mode"], layers=[Layer.from_json(d) for d in data["layers"]], local=data.get("local", {}),
                e2e=data.get("e2e", {}), spearman=data.get("spearman", {}), timings=data.get("timings_s", {}),
                metric=_recorded_metric(data), samples=data.get("samples", {}),
                smoothquant=data.get("smoothquant"), split_outliers=int(data.get("split_outliers") or 0),
                method=data.get("calibration_method"), recipe=data.get("recipe"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SweepError(f"{path} is malformed ({type(exc).__name__}: {exc}); write it again with onnxq sweep") from None

    def the_recipe(self) -> Recipe:
        """The request the sweep measured (older sweep files: from their target, SmoothQuant
        settings and range method)."""
        if self.recipe is not None:
            return Recipe.from_options(self.recipe, source="the sweep's recipe")
        old = {"target": self.target, "smoothquant": self.smoothquant, "split_outliers": self.split_outliers, "calib_method": self.method}
        return Recipe.from_options({k: v for k, v in old.items() if v is not None}, source="the sweep")

    def to_markdown(self) -> str:
        cols = []
        for p in self.precisions:
            if self.local:
                cols += [(f"local SNR dB ({p})", "local", p, "snr_db")]
            if self.e2e:
                cols += [(f"e2e cosine ({p})", "e2e", p, "cosine"), (f"e2e SNR dB ({p})", "e2e", p, "snr_db")]
        head = "| layer | nodes | MMACs | " + " | ".join(c[0] for c in cols) + " |"
        lines = [head, "|" + "---|" * (3 + len(cols))]
        for layer in sorted(self.layers, key=lambda la: -max(self.sensitivity(la.name, p) for p in self.precisions)):
            cells = []
            for _, src, p, key in cols:
                v = getattr(self, src)[layer.name][p][key]
                cells.append(f"{v:.4f}" if key == "cosine" else f"{v:.2f}")
            lines.append(f"| {layer.name} | {len(layer.nodes)} | {layer.macs / 1e6:.2f} | " + " | ".join(cells) + " |")
        if self.spearman:
            lines.append("")
            lines.append("Spearman rank correlation, local vs e2e SNR: " + ", ".join(f"{k}: {v:.3f}" if v is not None else f"{k}: n/a" for k, v in self.spearman.items()))
        return "\n".join(lines) + "\n"


@dataclass
class _Prepared:
    """The preprocessed float model (SmoothQuant folded in when asked), its placement and layers,
    and the data, as both the local and the e2e sweep use them."""

    model: ir.Model
    base: QuantPlan
    layers: list[Layer]
    calib: DataSource
    eval: DataSource
    sha256: str
    smooth_plan: object | None


def _check_request(mode: str, precisions) -> tuple[str, ...]:
    """The validated precisions; SweepError on an unknown mode or precision."""
    if mode not in MODES:
        raise SweepError(f"unknown sweep mode {mode!r}; choose one of {list(MODES)}")
    return check_precisions(precisions)


def _select_layers(layers: list[Layer], names: Sequence[str] | None, target: str) -> list[Layer]:
    """``layers`` restricted to ``names`` (all of them when None)."""
    if not layers:
        raise SweepError(f"the {target} policy quantizes no node of this model: nothing to sweep")
    if not names:
        return layers
    known = {la.name for la in layers}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SweepError(f"no layer named {unknown}; layers are named after their first node, e.g. {[la.name for la in layers[:3]]}")
    return [la for la in layers if la.name in names]


def _prepare(model, calib, eval, recipe: Recipe, eval_samples: int | None, layers_only, timings: dict) -> _Prepared:
    float_model = load_and_preprocess(model)
    spec = ort_rt.model_input_spec(float_model)
    calib_data = open_source(calib, spec, limit=recipe.calib_samples)
    eval_limit = eval_samples if eval is not None else (eval_samples or recipe.calib_samples)
    eval_data = open_source(eval if eval is not None else calib, spec, limit=eval_limit, require_finite=False)
    base = plan_for(float_model, recipe)
    sha = model_hash(float_model)
    fold_rotation(float_model, base, recipe)
    fold_equalization(float_model, base, recipe)
    smooth_plan = apply_smoothing(float_model, base, calib_data, recipe.smoothquant, recipe.split_outliers, timings)
    layers = _select_layers(layer_groups(float_model, base), list(layers_only or []), recipe.target)
    return _Prepared(float_model, base, layers, calib_data, eval_data, sha, smooth_plan)


def _run_local(result: SweepResult, prep: _Prepared, ranges: Ranges, float_proto, timings: dict) -> None:
    log(f"onnxq: local sweep of {len(prep.layers)} layers x {len(result.precisions)} precisions in one pass")
    t = time.perf_counter()
    twin_model = ir.serde.deserialize_model(float_proto)
    result.local, timings["local_pass"], result.samples["local"] = local_sweep(twin_model, prep.base, prep.layers, ranges, prep.eval, result.precisions)
    timings["local"] = time.perf_counter() - t
    timings["local_build"] = timings["local"] - timings["local_pass"]


def _run_e2e(result: SweepResult, prep: _Prepared, ranges: Ranges, float_proto, model_path, timings: dict) -> None:
    log(f"onnxq: end-to-end sweep: {len(prep.layers) * len(result.precisions)} quantized models")
    t = time.perf_counter()
    metric = load_metric(result.metric) if result.metric else None
    evaluator = Evaluator(float_proto, model_path, prep.eval, metric=metric)
    result.samples["e2e"] = len(evaluator.feeds)
    result.e2e, _ = e2e_sweep(prep.model, prep.base, prep.layers, ranges, evaluator, result.precisions)
    timings["e2e"] = time.perf_counter() - t


def rank_correlations(result: SweepResult) -> dict[str, float | None]:
    """Spearman correlation of local and e2e SNRs per precision (and over all, for several)."""
    if not (result.local and result.e2e):
        return {}
    layers, precisions = result.layers, result.precisions
    out = {p: spearman([result.local[la.name][p]["snr_db"] for la in layers], [result.e2e[la.name][p]["snr_db"] for la in layers]) for p in precisions}
    if len(precisions) > 1:
        out["all"] = spearman(
            [result.local[la.name][p]["snr_db"] for la in layers for p in precisions],
            [result.e2e[la.name][p]["snr_db"] for la in layers for p in precisions],
        )
    return out


def _recorded_metric(data: dict) -> str | None:
    """The metric spec a sweep file records (older files: the zoo model whose metric it used)."""
    if data.get("metric"):
        return data["metric"]
    zoo = data.get("zoo")
    return f"{_ZOO_METRICS}:{zoo.replace('-', '_')}" if zoo else None


@quiet_option
def sweep(
    model: str | os.PathLike,
    calib: DataArg,
    output: str | os.PathLike | None = None,
    *,
    eval: DataArg | None = None,
    recipe: Recipe | str | os.PathLike | None = None,
    mode: str = "local",
    precisions: str | Sequence[str] = QUANTIZED_PRECISIONS,
    target: str | None = None,
    metric: str | None = None,
    calib_samples: int | None = None,
    eval_samples: int | None = None,
    method: MethodArg = None,
    percentile: float | None = None,
    layers_only: Sequence[str] | None = None,
    smoothquant: float | str | None = None,
    split_outliers: int | None = None,
    equalize: bool | None = None,
    rotate: bool | None = None,
    rotate_online: int | None = None,
    plot: bool = True,
) -> SweepResult:
    """Measure every layer's sensitivity to quantization; write JSON, Markdown and a PNG chart.

    ``output``: the JSON path; ``<stem>.md`` and ``<stem>.png`` are written beside it. Ranges come
    from one calibration pass over ``calib``; errors are measured on ``eval`` (default: ``calib``).
    ``metric``: a task metric spec (:mod:`onnxq.task_metric`) the e2e mode also measures; the
    sweep records it and the solver repeats it.
    ``layers_only``: measure only these layers (names as in a sweep's table); default: all.
    ``recipe`` (a :class:`~onnxq.recipe.Recipe` or file) with ``target``, ``method``,
    ``percentile``, ``calib_samples``, ``smoothquant``, ``split_outliers``, ``equalize``, ``rotate``, ``rotate_online`` overriding it: the
    placement, ranges and SmoothQuant (folded in first, decided for all quantizable layers in
    INT8) the sweep measures; the sweep records the recipe and the solver repeats it.
    """
    precisions = _check_request(mode, precisions)
    recipe_file = recipe if isinstance(recipe, (str, os.PathLike)) else None
    recipe = make_recipe(recipe, {"target": target, "calib_method": method, "percentile": percentile, "calib_samples": calib_samples, "smoothquant": smoothquant, "split_outliers": split_outliers, "equalize": equalize, "rotate": rotate, "rotate_online": rotate_online})
    if metric is not None:
        load_metric(metric)  # a bad spec fails before any work
    with modelio.transaction(sweep_outputs(output, plot), [model, calib, eval, recipe_file, metric]):
        return _measure(model, calib, eval, output, recipe, mode, precisions, metric, eval_samples, layers_only, plot)


def _measure(model, calib, eval, output, recipe, mode, precisions, metric, eval_samples, layers_only, plot) -> SweepResult:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prep = _prepare(model, calib, eval, recipe, eval_samples, layers_only, timings)
    prepare_opset(prep.model, prep.base, precisions)
    timings["load"] = time.perf_counter() - t0
    ranges = calibrate_ranges(prep.model, prep.base, prep.calib, precisions, method=recipe.calib_method, percentile=recipe.percentile)
    timings["calibrate"] = ranges.seconds
    result = SweepResult(
        prep.sha256, recipe.target, list(precisions), mode, prep.layers, metric=metric, samples={"calibration": ranges.num_samples},
        smoothquant=recipe.smoothquant, split_outliers=recipe.split_outliers, method=recipe.calib_method, recipe=recipe.to_json(),
    )
    float_proto = modelio.to_proto(prep.model)
    if mode in ("local", "both"):
        _run_local(result, prep, ranges, float_proto, timings)
    fill_costs(prep.model, prep.base, prep.layers, next(iter(prep.eval)), split_fractions(prep.smooth_plan))
    if mode in ("e2e", "both"):
        _run_e2e(result, prep, ranges, float_proto, model, timings)
    result.spearman = rank_correlations(result)
    timings["total"] = time.perf_counter() - t0
    result.timings = timings
    if output is not None:
        write_sweep(result, output, plot=plot)
    return result


def sweep_outputs(output: str | os.PathLike | None, plot: bool = True) -> list[Path]:
    """The sweep JSON and the ``.md`` (and ``.png``) beside it."""
    if output is None:
        return []
    output = Path(output)
    stem = output.with_suffix("") if output.suffix == ".json" else output
    return [output, stem.with_suffix(".md"), *([stem.with_suffix(".png")] if plot else [])]


def write_sweep(result: SweepResult, output: str | os.PathLike, *, plot: bool = True) -> list[Path]:
    output = Path(output)
    stem = output.with_suffix("") if output.suffix == ".json" else output
    written = []
    with modelio.atomic_path(output) as tmp:
        tmp.write_text(json.dumps(result.to_json(), indent=1))
    written.append(output)
    md = stem.with_suffix(".md")
    with modelio.atomic_path(md) as tmp:
        tmp.write_text(result.to_markdown())
    written.append(md)
    if plot:
        from onnxq.plots import sweep_chart

        png = sweep_chart(result, stem.with_suffix(".png"))
        if png is not None:
            written.append(png)
    return written
