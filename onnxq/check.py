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
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from onnxq.errors import DataError, OnnxqError
from onnxq.metrics import OutputAccuracy
from onnxq.progress import progress_bar
from onnxq.runtime import ort as ort_rt

EXIT_FAILED = 1  # a threshold was not met (errors exit 2, like every onnxq command)


# --- runners ----------------------------------------------------------------------------------


PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def available_providers(requested: Sequence[str] | None = None) -> list[str]:
    """ORT execution providers to run ONNX candidates on: the requested ones (short names), or
    CPU plus CUDA/TensorRT where this onnxruntime has them."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if requested is None:
        return [p for p in ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider") if p in have]
    out = []
    for short in requested:
        full = PROVIDER_ALIASES.get(short.lower())
        if full is None:
            raise OnnxqError(f"unknown provider {short!r}; choose from {list(PROVIDER_ALIASES)}")
        if full not in have:
            raise OnnxqError(f"this onnxruntime has no {full} (it has {have}); install the onnxruntime build that provides it or drop {short!r}")
        out.append(full)
    return out


@dataclass
class Candidate:
    """One thing to compare with the reference: an ONNX model on an ORT provider, or a TensorRT engine."""

    path: Path
    kind: str  # "onnx" | "engine"
    provider: str | None = None

    @property
    def label(self) -> str:
        if self.kind == "engine":
            return f"{self.path.name} [TensorRT]"
        short = {v: k for k, v in PROVIDER_ALIASES.items()}.get(self.provider or "", self.provider)
        return f"{self.path.name} [ORT {short}]"

    def runner(self, threads: int | None):
        if self.kind == "engine":
            from onnxq.runtime.tensorrt import engine_runner

            return engine_runner(self.path, name=self.label)
        return ort_runner(self.path, providers=[self.provider, "CPUExecutionProvider"], threads=threads, name=self.label)


def ort_runner(model, *, providers: Sequence[str] | None = None, threads: int | None = None, name: str | None = None):
    """A polygraphy ``OnnxrtRunner`` over onnxq's session (FP8-safe optimization level, clear errors)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    if hasattr(model, "run"):
        session = model
    else:
        session = ort_rt.create_session(model, providers=list(dict.fromkeys(providers or ["CPUExecutionProvider"])), threads=threads)
    return OnnxrtRunner(session, name=name or "onnxrt")


def _infer(runner, feed: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    try:
        return runner.infer(feed, check_inputs=False)
    except OnnxqError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxqError(f"{runner.name} failed to run: {reason}") from None


def _output_names(runner) -> list[str] | None:
    sess = getattr(runner, "sess", None)
    return [o.name for o in sess.get_outputs()] if sess is not None else None


def accumulate(reference_runner, candidate_runners: Sequence, data: Iterable[Mapping[str, np.ndarray]], *, progress: bool = True) -> list[list[OutputAccuracy]]:
    """Run every (activated) runner on every feed; per candidate, per reference output, its accuracy."""
    names = _output_names(reference_runner)
    for runner in candidate_runners:
        cand_names = _output_names(runner)
        if names is not None and cand_names is not None and cand_names != names:
            raise OnnxqError(f"the candidate's outputs {cand_names} differ from the reference's {names}")
    results: list[list[OutputAccuracy]] | None = [[OutputAccuracy(n) for n in names] for _ in candidate_runners] if names else None
    total = len(data) if hasattr(data, "__len__") and len(data) else None
    with progress_bar(total, "comparing", enabled=progress) as bar:
        for feed in data:
            ref = _infer(reference_runner, feed)
            if results is None:
                results = [[OutputAccuracy(n) for n in ref] for _ in candidate_runners]
            for accs, runner in zip(results, candidate_runners):
                out = _infer(runner, feed)
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
    lines = [title, f"  {'output':<24} {'cosine(mean)':>12} {'cosine(min)':>12} {'SNR dB':>8} {'max|err|':>10} {'top-1':>6}"]
    for r in results:
        top1 = f"{r.top1_agreement:>6.3f}" if r.top1_agreement is not None else f"{'-':>6}"
        lines.append(
            f"  {r.name[:24]:<24} {r.cosine_mean:>12.6f} {r.cosine_min:>12.6f} {r.snr_db:>8.2f} {r.max_abs_error:>10.4g} {top1}"
        )
    return "\n".join(lines)


# --- latency ----------------------------------------------------------------------------------


@dataclass
class Latency:
    batch: int
    warmup: int
    runs: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def batched(feed: Mapping[str, np.ndarray], batch: int, input_shapes: Mapping[str, Sequence] | None = None) -> dict[str, np.ndarray]:
    """``feed`` (batch 1) repeated ``batch`` times along axis 0."""
    if batch == 1:
        return dict(feed)
    out = {}
    for name, arr in feed.items():
        dims = list((input_shapes or {}).get(name) or [])
        if dims and isinstance(dims[0], int):
            raise DataError(f"input {name!r} has a fixed batch dimension {dims[0]}; drop --batch {batch} or export with a dynamic batch axis")
        if arr.ndim == 0 or arr.shape[0] != 1:
            raise DataError(f"input {name!r} has shape {list(arr.shape)}; batched latency needs samples of batch 1")
        out[name] = np.repeat(arr, batch, axis=0)
    return out


def measure_latency(runner, feed: Mapping[str, np.ndarray], *, batch: int = 1, warmup: int = 5, runs: int = 50) -> Latency:
    """Warm up, then time ``runs`` inferences with the runner's own timer (polygraphy's inference_time)."""
    if runs < 1 or warmup < 0:
        raise OnnxqError("latency needs --runs >= 1 and --warmup >= 0")
    for _ in range(warmup):
        _infer(runner, feed)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        _infer(runner, feed)
        elapsed = time.perf_counter() - start
        inner = runner.last_inference_time()
        times[i] = inner if inner else elapsed
    ms = times * 1e3
    return Latency(batch, warmup, runs, float(np.median(ms)), float(np.percentile(ms, 90)), float(np.percentile(ms, 99)), float(ms.mean()))


# --- the check --------------------------------------------------------------------------------


@dataclass
class Thresholds:
    min_cosine: float | None = None  # on every output's mean per-sample cosine
    min_snr: float | None = None  # dB, on every output
    max_latency_ratio: float | None = None  # candidate median / reference median, at every batch size

    def failures(self, outputs: Sequence[OutputAccuracy], ratios: Mapping[int, float]) -> list[str]:
        out = []
        for acc in outputs:
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
            d["layers"] = [layer.to_json() for layer in self.layers]
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

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "reference": self.reference,
            "data": self.data,
            "samples": self.samples,
            "threads": self.threads,
            "environment": self.environment,
            "thresholds": asdict(self.thresholds),
            "reference_latency": [lat.to_json() for lat in self.reference_latency],
            "task_metric_reference": self.task_metric_reference,
            "candidates": [c.to_json() for c in self.candidates],
        }


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


def _zoo_metric(name: str, candidate: Path | None, reference: Path, n: int | None) -> dict:
    from onnxq import zoo

    try:
        model = zoo.get(name)
    except Exception as exc:
        raise OnnxqError(f"--zoo {name!r}: {exc}") from None
    result = model.evaluate(candidate if candidate is not None else reference, reference, n=n)
    return {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in result.items()}


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
    zoo: str | None = None,
    zoo_samples: int | None = None,
    layers: bool = False,
    layer_samples: int | None = None,
    progress: bool = True,
) -> CheckReport:
    """Compare the float ``reference`` (ORT, CPU) with each ONNX candidate on each provider and each
    TensorRT engine, on the same ``data``; measure latency; apply ``thresholds``."""
    from onnxq.data import open_source

    if data is None:
        raise OnnxqError("check needs data: pass --data DATA (.npz, directory of .npz, or module:function)")
    if not candidates and not engines:
        raise OnnxqError("give at least one candidate: a quantized ONNX model, or --engine ENGINE")
    if any(b < 1 for b in batch_sizes):
        raise OnnxqError("batch sizes must be positive")
    thresholds = thresholds or Thresholds()
    threads = threads or os.cpu_count() or 1
    reference = Path(reference)
    ref_session = ort_rt.create_session(reference, threads=threads)
    spec = ort_rt.input_spec(ref_session)
    source = open_source(data, spec, limit=samples, require_finite=False)
    provs = available_providers(providers)
    cands = [Candidate(Path(c), "onnx", p) for c in candidates for p in provs]
    cands += [Candidate(Path(e), "engine") for e in engines]
    for c in cands:
        if not c.path.is_file():
            raise OnnxqError(f"{c.path}: no such file")

    with contextlib.ExitStack() as stack:
        ref_runner = stack.enter_context(ort_runner(ref_session, name=f"{reference.name} [ORT cpu, reference]"))
        runners = [stack.enter_context(c.runner(threads)) for c in cands]
        accuracy = accumulate(ref_runner, runners, source, progress=progress)
        n_samples = accuracy[0][0].samples if accuracy and accuracy[0] else 0
        ref_latency: list[Latency] = []
        cand_latency: list[list[Latency]] = [[] for _ in cands]
        if latency:
            first = next(iter(source))
            for batch in batch_sizes:
                feed = batched(first, batch, {n: s for n, (_, s) in spec.items()})
                ref_latency.append(measure_latency(ref_runner, feed, batch=batch, warmup=warmup, runs=runs))
                for lats, runner in zip(cand_latency, runners):
                    lats.append(measure_latency(runner, feed, batch=batch, warmup=warmup, runs=runs))

    results = []
    for cand, outs, lats in zip(cands, accuracy, cand_latency):
        ratios = {lat.batch: lat.median_ms / ref.median_ms for lat, ref in zip(lats, ref_latency) if ref.median_ms > 0}
        results.append(CandidateResult(cand.label, str(cand.path), cand.kind, cand.provider, outs, lats, ratios))

    ref_metric = None
    if zoo:
        ref_metric = _zoo_metric(zoo, None, reference, zoo_samples)
        done: dict[Path, dict] = {}
        for cand, res in zip(cands, results):
            if cand.kind == "onnx":
                if cand.path not in done:  # the zoo metric runs in ORT on the CPU
                    done[cand.path] = _zoo_metric(zoo, cand.path, reference, zoo_samples)
                res.task_metric = done[cand.path]
    if layers:
        from onnxq.localize import layer_snr

        per_model: dict[Path, list] = {}
        for cand, res in zip(cands, results):
            if cand.kind == "onnx":
                if cand.path not in per_model:
                    layer_data = open_source(data, spec, limit=layer_samples or samples, require_finite=False)
                    per_model[cand.path] = layer_snr(reference, cand.path, layer_data, progress=progress)
                res.layers = per_model[cand.path]
    for res in results:
        res.failures = thresholds.failures(res.outputs, res.latency_ratio)
    return CheckReport(
        str(reference), source.description, n_samples, threads, _environment(threads), thresholds,
        ref_latency, results, ref_metric,
    )
