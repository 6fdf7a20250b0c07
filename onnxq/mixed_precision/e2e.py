"""End-to-end evaluation: each candidate plan built into a whole quantized model and measured.

A candidate's accuracy is its outputs' cosine/SNR against the float model on held-out data and,
with a task metric (:mod:`onnxq.task_metric`), that metric against the float model. The e2e sweep
builds one model per layer and precision, with only that layer quantized: the expensive baseline
the local sweep stands in for.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxq.metrics import OutputAccuracy
from onnxq.plan import QuantPlan
from onnxq.progress import progress_bar
from onnxq.runtime import ort as ort_rt
from onnxq.task_metric import TaskMetric

from .candidates import assemble_plan, qdq_proto
from .groups import Layer
from .options import SweepError
from .ranges import Ranges


class Evaluator:
    """Accuracy of candidate plans on held-out data: output cosine/SNR vs the float model (its
    outputs computed once and kept), and the task metric when one is given (run on the candidate
    written to a temporary file, against the float model at ``model_path``). ``outputs=False``
    skips the output comparison when only the task metric is wanted."""

    def __init__(self, float_proto: onnx.ModelProto, model_path: str | os.PathLike, data, metric: TaskMetric | None = None, outputs: bool = True):
        self.float_proto = float_proto
        self.model_path = Path(model_path)
        self.feeds = list(data) if outputs else []
        if outputs and not self.feeds:
            raise SweepError("the evaluation data has no samples; pass --eval DATA with at least one sample")
        self.metric = metric
        self.evaluations = 0
        self.seconds = 0.0
        if self.feeds:
            reference = ort_rt.create_session(model_path)
            self.output_names = [o.name for o in reference.get_outputs()]
            self.references = [ort_rt.run(reference, f) for f in self.feeds]

    def evaluate(self, plan: QuantPlan) -> dict:
        """{cosine, snr_db, outputs} (None without outputs) and, with a metric, {metric: {...}}."""
        t0 = time.perf_counter()
        proto = qdq_proto(self.float_proto, plan)
        out: dict = {"cosine": None, "snr_db": None}
        if self.feeds:
            out = self._output_accuracy(proto)
        if self.metric is not None:
            out["metric"] = self._task_metric(proto)
        self.evaluations += 1
        self.seconds += time.perf_counter() - t0
        return out

    def _output_accuracy(self, proto: onnx.ModelProto) -> dict:
        session = ort_rt.create_session(proto)
        results = [OutputAccuracy(n) for n in self.output_names]
        for feed, refs in zip(self.feeds, self.references):
            for acc, r, c in zip(results, refs, ort_rt.run(session, feed)):
                acc.update(r, c)
        return {"cosine": min(r.cosine_mean for r in results), "snr_db": min(r.snr_db for r in results), "outputs": [r.to_json() for r in results]}

    def _task_metric(self, proto: onnx.ModelProto) -> dict[str, float]:
        with tempfile.TemporaryDirectory(prefix="onnxq-candidate-") as tmp:
            path = Path(tmp) / "candidate.onnx"
            onnx.save_model(proto, str(path))
            return self.metric.evaluate(path, self.model_path)


def e2e_sweep(model: ir.Model, base: QuantPlan, layers: Sequence[Layer], ranges: Ranges, evaluator: Evaluator, precisions: Sequence[str]) -> tuple[dict, float]:
    """{layer: {precision: {cosine, snr_db, [metric]}}} with only that layer quantized."""
    t0 = time.perf_counter()
    results: dict[str, dict[str, dict]] = {}
    with progress_bar(len(layers) * len(precisions), "e2e sweep", unit="model") as bar:
        for layer in layers:
            results[layer.name] = {}
            for p in precisions:
                plan = assemble_plan(model, base, {n: p for n in layer.nodes}, ranges)
                r = evaluator.evaluate(plan)
                r.pop("outputs", None)
                results[layer.name][p] = r
                bar.update(1)
    return results, time.perf_counter() - t0
