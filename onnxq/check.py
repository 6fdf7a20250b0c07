"""Accuracy and latency of candidate models against a float reference, on the same inputs.

The reference is the float model in ONNX Runtime. A candidate is a (quantized) ONNX model run by ONNX
Runtime on one execution provider (CPU; CUDA/TensorRT where installed), or a TensorRT engine. All
of them are driven through polygraphy's runners (``OnnxrtRunner``, ``TrtRunner``). Polygraphy's
``Comparator.run`` keeps every output of every iteration in memory, so the comparison loop is ours:
each sample runs through the reference once and through every candidate, the statistics below are
accumulated, and the outputs are dropped — memory does not grow with the number of samples.

Per output: mean and minimum per-sample cosine similarity, SNR in dB over all samples
(10·log10(Σref² / Σ(ref−cand)²)), the maximum absolute error, the maximum relative error
(elementwise ``|cand−ref| / |ref|`` over elements with ``|ref| ≥ 1e-3·max|ref|``), a fixed-bin
histogram of log10 |cand−ref|, and, for classifier-shaped outputs (a float output whose name says
logits/probabilities/scores and whose last axis has ≥ 10 classes), top-1 agreement (argmax equal)
and top-5 agreement (the reference's argmax among the candidate's five largest), per row of the
last axis.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from onnxq.data import open_source
from onnxq.errors import OnnxqError
from onnxq.localize import layer_snr
from onnxq.metrics import NONFINITE_NOTE, OutputAccuracy
from onnxq.progress import progress_bar
from onnxq.runtime import ort as ort_rt
from onnxq.runtime.runners import Candidate, Latency, available_providers, batched, infer, measure_latencies, ort_runner, output_names
from onnxq.task_metric import TaskMetric, load_metric

EXIT_FAILED = 1  # a threshold was not met (errors exit 2, like every onnxq command)




def accumulate(reference_runner, candidate_runners: Sequence, data: Iterable[Mapping[str, np.ndarray]], *, progress: bool = True) -> list[list[OutputAccuracy]]:
    """Run every (activated) runner on every feed; per candidate, per reference output, its accuracy."""
    names = output_names(reference_runner)
    for runner in candidate_runners:
        cand_names = output_names(runner)
        if names is not None and cand_names is not None and cand_names != names:
            raise OnnxqError(f"the candidate's outputs {cand_names} differ from the reference's {names}")
    results: list[list[OutputAccuracy]] | None = [[OutputAccuracy(n) for n in names] for _ in candidate_runners] if names else None
    total = len(data) if hasattr(data, "__len__") and len(data) else None
    with progress_bar(total, "comparing", enabled=progress) as bar:
        for feed in data:
            ref = infer(reference_runner, feed)
            if results is None:
                results = [[OutputAccuracy(n) for n in ref] for _ in candidate_runners]
            for accs, runner in zip(results, candidate_runners):
                out = infer(runner, feed)
                for acc in accs:
                    if acc.name not in out:
                        raise OnnxqError(f"{runner.name} has no output {acc.name!r}; it has {list(out)}")
                    acc.update(ref[acc.name], out[acc.name])
            bar.update(1)
    return results or [[] for _ in candidate_runners]


def compare(reference, candidate, data: Iterable[dict[str, np.ndarray]], *, progress: bool = True) -> list[OutputAccuracy]:
    """Run reference and candidate (paths, ir.Models or sessions) on every feed of ``data`` in ORT."""
    with ort_runner(reference, name="reference") as ref, ort_runner(candidate, name="candidate") as cand:
        return accumulate(ref, [cand], data, progress=progress)[0]


def format_table(results: list[OutputAccuracy], title: str) -> str:
    lines = [title, f"  {'output':<24} {'cosine(mean)':>12} {'cosine(min)':>12} {'SNR dB':>8} {'max|err|':>10} {'top-1':>6}  worst slice SNR dB"]
    notes = []
    for r in results:
        top1 = f"{r.top1_agreement:>6.3f}" if r.top1_agreement is not None else f"{'-':>6}"
        worst = f"  {r.worst_slice_snr_db:.2f} ({r.worst_slice})" if r.worst_slice_snr_db is not None else "  -"
        lines.append(
            f"  {r.name[:24]:<24} {r.cosine_mean:>12.6f} {r.cosine_min:>12.6f} {r.snr_db:>8.2f} {r.max_abs_error:>10.4g} {top1}{worst}"
        )
        if r.nonfinite_reference or r.nonfinite_candidate:
            notes.append(f"  note: {r.name}: left out, non-finite: {r.nonfinite_reference} samples in the reference, {r.nonfinite_candidate} in the candidate only; metrics over {r.samples} finite samples")
        notes += [f"  note: {r.name}: {n}" for n in r.notes if n != NONFINITE_NOTE]
    return "\n".join(lines + notes)


# --- the check --------------------------------------------------------------------------------


@dataclass
class Thresholds:
    min_cosine: float | None = None  # on every output's mean per-sample cosine
    min_snr: float | None = None  # dB, on every output
    max_latency_ratio: float | None = None  # candidate median / reference median, at every batch size

    def describe(self) -> str:
        """The thresholds applied, in words (printed next to every PASS/FAIL)."""
        parts = []
        if self.min_cosine is not None:
            parts.append(f"mean cosine >= {self.min_cosine} on every output")
        if self.min_snr is not None:
            parts.append(f"SNR >= {self.min_snr} dB on every output")
        if self.max_latency_ratio is not None:
            parts.append(f"latency <= {self.max_latency_ratio} x FP32 at every batch size")
        if not parts:
            return "no thresholds given (--min-cosine, --min-snr, --max-latency-ratio): PASS only says every model ran"
        return "; ".join(parts)

    def failures(self, outputs: Sequence[OutputAccuracy], ratios: Mapping[int, float]) -> list[str]:
        out = []
        for acc in outputs:
            if (self.min_cosine is not None or self.min_snr is not None) and acc.nonfinite_candidate:
                out.append(f"{acc.name}: {acc.nonfinite_candidate} samples non-finite in the candidate only")
            if self.min_cosine is not None and not acc.cosine_mean >= self.min_cosine:
                out.append(f"{acc.name}: cosine {acc.cosine_mean:.6f} < {self.min_cosine}")
            if self.min_snr is not None and not acc.snr_db >= self.min_snr:
                out.append(f"{acc.name}: SNR {acc.snr_db:.2f} dB < {self.min_snr} dB")
        if self.max_latency_ratio is not None:
            for batch, ratio in sorted(ratios.items()):
                if ratio > self.max_latency_ratio:
                    out.append(f"batch {batch}: latency ratio {ratio:.3f} > {self.max_latency_ratio}")
        return out


@dataclass
class CandidateResult:
    label: str
    path: str
    kind: str
    provider: str | None
    outputs: list[OutputAccuracy]
    latency: list[Latency] = field(default_factory=list)
    latency_ratio: dict[int, float] = field(default_factory=dict)
    task_metric: dict | None = None
    layers: list | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        d = {
            "label": self.label, "path": self.path, "kind": self.kind, "provider": self.provider,
            "passed": self.passed, "failures": self.failures,
            "outputs": [{**a.to_json(), "error_histogram": a.error_histogram()} for a in self.outputs],
            "latency": [lat.to_json() for lat in self.latency],
            "latency_ratio": {str(b): round(r, 4) for b, r in self.latency_ratio.items()},
        }
        if self.task_metric is not None:
            d["task_metric"] = self.task_metric
        if self.layers is not None:
            d["layers"] = [layer.to_json() for layer in self.layers.stats]
            d["layers_matched"] = self.layers.to_json()
        return d


@dataclass
class CheckReport:
    reference: str
    data: str
    samples: int
    threads: int
    environment: dict
    thresholds: Thresholds
    reference_latency: list[Latency]
    candidates: list[CandidateResult]
    task_metric_reference: dict | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.candidates)

    def verdict(self, candidate: CandidateResult) -> str:
        """PASS or FAIL with the failures, and the thresholds applied."""
        result = "PASS" if candidate.passed else "FAIL: " + "; ".join(candidate.failures)
        return f"{result} (thresholds: {self.thresholds.describe()})"

    def metric_table(self) -> tuple[list[str], list[list[str]]]:
        """The task metric as a table: a column per metric value, a row per model (the reference first)."""
        named = ([(Path(self.reference).name + " (reference)", self.task_metric_reference)] if self.task_metric_reference is not None else [])
        named += [(c.label, c.task_metric) for c in self.candidates if c.task_metric is not None]
        keys = list(dict.fromkeys(k for _, values in named for k in values))
        rows = [[label, *(_metric_cell(values.get(k)) for k in keys)] for label, values in named]
        return ["model", *keys], rows

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "thresholds_applied": self.thresholds.describe(),
            "reference": self.reference,
            "data": self.data,
            "samples": self.samples,
            "threads": self.threads,
            "environment": self.environment,
            "thresholds": asdict(self.thresholds),
            "reference_latency": [lat.to_json() for lat in self.reference_latency],
            "task_metric_reference": self.task_metric_reference,
            "candidates": [{**c.to_json(), "verdict": self.verdict(c)} for c in self.candidates],
        }


def _metric_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4f}" if isinstance(value, float) and abs(value) < 1e4 else f"{value:.6g}"
    return json.dumps(value)


def format_metric_table(report: CheckReport) -> str:
    """The task metric table for the terminal ("" without a task metric)."""
    header, rows = report.metric_table()
    if not rows:
        return ""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["task metric:"] + ["  " + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _environment(threads: int) -> dict:
    import platform

    import onnxruntime as ort
    import polygraphy

    from onnxq.runtime.tensorrt import environment as trt_env

    return {
        "onnxruntime": ort.__version__,
        "polygraphy": polygraphy.__version__,
        "ort_providers": ort.get_available_providers(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "intra_op_threads": threads,
        **trt_env(),
    }


def _candidates(candidates, engines, providers) -> list[Candidate]:
    """Every ONNX candidate on every provider, then every engine; each file must exist."""
    provs = available_providers(providers)
    cands = [Candidate(Path(c), "onnx", p) for c in candidates for p in provs]
    cands += [Candidate(Path(e), "engine") for e in engines]
    for c in cands:
        if not c.path.is_file():
            raise OnnxqError(f"{c.path}: no such file")
    return cands


def _latencies(ref_runner, runners: Sequence, first_feed, spec, batch_sizes: Sequence[int], warmup: int, runs: int) -> tuple[list[Latency], list[list[Latency]]]:
    """Latency of the reference and of each candidate at each batch size, on the first sample."""
    ref_latency: list[Latency] = []
    cand_latency: list[list[Latency]] = [[] for _ in runners]
    for batch in batch_sizes:
        feed = batched(first_feed, batch, {n: s for n, (_, s) in spec.items()})
        ref, *cands = measure_latencies([ref_runner, *runners], feed, batch=batch, warmup=warmup, runs=runs)
        ref_latency.append(ref)
        for lats, lat in zip(cand_latency, cands):
            lats.append(lat)
    return ref_latency, cand_latency


def _run_all(reference: Path, ref_session, cands: list[Candidate], source, spec, threads: int, latency: tuple | None, progress: bool):
    """Accuracy of every candidate and, with ``latency`` = (batch sizes, warmup, runs), the latencies."""
    with contextlib.ExitStack() as stack:
        ref_runner = stack.enter_context(ort_runner(ref_session, name=f"{reference.name} [ORT cpu, reference]"))
        runners = [stack.enter_context(c.runner(threads)) for c in cands]
        accuracy = accumulate(ref_runner, runners, source, progress=progress)
        timings = ([], [[] for _ in cands])
        if latency is not None:
            timings = _latencies(ref_runner, runners, next(iter(source)), spec, *latency)
    return accuracy, timings


def _onnx_once(cands: list[Candidate], results: list[CandidateResult], measure):
    """(result, ``measure(path)``) for each ONNX candidate's result, measured once per file (the
    measurement runs in ORT on the CPU whatever the candidate's provider)."""
    done: dict[Path, object] = {}
    for cand, res in zip(cands, results):
        if cand.kind == "onnx":
            if cand.path not in done:
                done[cand.path] = measure(cand.path)
            yield res, done[cand.path]


def _add_task_metric(metric: TaskMetric, reference: Path, cands, results, samples: int | None) -> dict:
    """The metric of every ONNX candidate (in its result) and of the reference (returned)."""
    for res, values in _onnx_once(cands, results, lambda path: metric.evaluate(path, reference, samples)):
        res.task_metric = values
    return metric.evaluate(reference, reference, samples)


def _add_layers(reference: Path, cands, results, open_data, progress: bool) -> None:
    """Per-layer SNR of every ONNX candidate through its Q/DQ pairs."""
    for res, stats in _onnx_once(cands, results, lambda path: layer_snr(reference, path, open_data(), progress=progress)):
        res.layers = stats


def check(
    reference: str | os.PathLike,
    candidates: Sequence[str | os.PathLike] = (),
    data=None,
    *,
    engines: Sequence[str | os.PathLike] = (),
    providers: Sequence[str] | None = None,
    samples: int | None = None,
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 5,
    runs: int = 50,
    latency: bool = True,
    threads: int | None = None,
    thresholds: Thresholds | None = None,
    metric: str | None = None,
    metric_samples: int | None = None,
    layers: bool = False,
    layer_samples: int | None = None,
    progress: bool = True,
) -> CheckReport:
    """Compare the float ``reference`` (ORT, CPU) with each ONNX candidate on each provider and each
    TensorRT engine, on the same ``data``; measure latency; apply ``thresholds``. ``metric``: a task
    metric spec (:mod:`onnxq.task_metric`) also reported for the reference and each ONNX candidate."""
    if data is None:
        raise OnnxqError("check needs data: pass --data DATA (.npz, directory of .npz, or module:function)")
    if not candidates and not engines:
        raise OnnxqError("give at least one candidate: a quantized ONNX model, or --engine ENGINE")
    if any(b < 1 for b in batch_sizes):
        raise OnnxqError("batch sizes must be positive")
    task_metric = load_metric(metric) if metric else None
    thresholds = thresholds or Thresholds()
    threads = threads or os.cpu_count() or 1
    reference = Path(reference)
    ref_session = ort_rt.create_session(reference, threads=threads)
    spec = ort_rt.input_spec(ref_session)
    source = open_source(data, spec, limit=samples, require_finite=False)
    cands = _candidates(candidates, engines, providers)
    accuracy, (ref_latency, cand_latency) = _run_all(reference, ref_session, cands, source, spec, threads, (batch_sizes, warmup, runs) if latency else None, progress)
    results = []
    for cand, outs, lats in zip(cands, accuracy, cand_latency):
        ratios = {lat.batch: lat.median_ms / ref.median_ms for lat, ref in zip(lats, ref_latency) if ref.median_ms > 0}
        results.append(CandidateResult(cand.label, str(cand.path), cand.kind, cand.provider, outs, lats, ratios))
    ref_metric = _add_task_metric(task_metric, reference, cands, results, metric_samples) if task_metric else None
    if layers:
        _add_layers(reference, cands, results, lambda: open_source(data, spec, limit=layer_samples or samples, require_finite=False), progress)
    for res in results:
        res.failures = thresholds.failures(res.outputs, res.latency_ratio)
    n_samples = accuracy[0][0].samples if accuracy and accuracy[0] else 0
    return CheckReport(str(reference), source.description, n_samples, threads, _environment(threads), thresholds, ref_latency, results, ref_metric)
