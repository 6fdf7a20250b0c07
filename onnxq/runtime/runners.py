"""Polygraphy runners over onnxq's ORT sessions and TensorRT engines, and latency measurement.

Candidates of ``onnxq check`` run through polygraphy's runners (``OnnxrtRunner``, ``TrtRunner``);
:func:`infer` turns a runner's failure into one :class:`~onnxq.errors.OnnxqError` line, and
:func:`measure_latencies` times runners with their own timers, in interleaved rounds.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from onnxq.errors import DataError, OnnxqError, one_line
from onnxq.runtime import ort as ort_rt

PROVIDER_ALIASES = ort_rt.PROVIDER_ALIASES


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
    if hasattr(model, "run"):
        session = model
    else:
        session = ort_rt.create_session(model, providers=list(dict.fromkeys(providers or ["CPUExecutionProvider"])), threads=threads)
    return _numpy_onnxrt_runner()(session, name=name or "onnxrt")


@functools.cache
def _numpy_onnxrt_runner():
    """polygraphy's OnnxrtRunner for numpy feeds. Its own ``infer_impl`` asks whether a feed is a
    torch tensor, which imports torch lazily inside a bare ``except:``: a Ctrl-C landing in that
    import (seconds long) was swallowed, and the next call imported the half-loaded torch again
    (segfaults). onnxq feeds numpy arrays only, so the question is never asked."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    class NumpyOnnxrtRunner(OnnxrtRunner):
        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            outputs = self.sess.run(None, dict(feed_dict))
            self.inference_time = time.perf_counter() - start
            return OrderedDict(zip((o.name for o in self.sess.get_outputs()), outputs))

    return NumpyOnnxrtRunner


def infer(runner, feed: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    try:
        return runner.infer(feed, check_inputs=False)
    except OnnxqError:
        raise
    except Exception as exc:
        reason = one_line(exc)
        raise OnnxqError(f"{runner.name} failed to run: {reason}") from None


def output_names(runner) -> list[str] | None:
    sess = getattr(runner, "sess", None)
    return [o.name for o in sess.get_outputs()] if sess is not None else None


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
    return measure_latencies([runner], feed, batch=batch, warmup=warmup, runs=runs)[0]


def measure_latencies(runners: Sequence, feed: Mapping[str, np.ndarray], *, batch: int = 1, warmup: int = 5, runs: int = 50) -> list[Latency]:
    """Each runner's latency, timed in interleaved rounds: every round runs each runner once
    (the order reversed every other round), so a change of machine load during the measurement
    reaches every model alike and the ratios between them hold (timed one model after another,
    two identical models measured 14 % apart on a loaded machine)."""
    if runs < 1 or warmup < 0:
        raise OnnxqError("latency needs --runs >= 1 and --warmup >= 0")
    for runner in runners:
        for _ in range(warmup):
            infer(runner, feed)
    times = np.empty((len(runners), runs))
    order = list(range(len(runners)))
    for i in range(runs):
        for k in (order if i % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            infer(runners[k], feed)
            elapsed = time.perf_counter() - start
            inner = runners[k].last_inference_time()
            times[k, i] = inner if inner else elapsed
    ms = times * 1e3
    return [Latency(batch, warmup, runs, float(np.median(m)), float(np.percentile(m, 90)), float(np.percentile(m, 99)), float(m.mean())) for m in ms]
