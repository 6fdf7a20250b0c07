"""The task metric as a plug-in: a function that scores a candidate model against its reference.

A metric is named by a spec, ``module:function`` or ``path/to/file.py:function``. The function
takes ``(candidate_model_path, reference_model_path, samples)`` (``samples``: how many evaluation
samples to use, None for the function's default) and returns ``{metric name: number}``. An
attribute ``lower_is_better`` on the function (a collection of metric names, e.g. perplexity, kl)
marks the metrics where smaller is better; every other one is higher-is-better.

The zoo provides one such function per model (``onnxq.zoo.metrics``); the core loads whatever spec
it is given and never imports the zoo.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from onnxq.data import _import_callable
from onnxq.errors import OnnxqError

MetricFunction = Callable[[str, str, "int | None"], Mapping[str, float]]


class MetricError(OnnxqError):
    """A task metric cannot be loaded or did not return {name: number}."""


@dataclass(frozen=True)
class TaskMetric:
    spec: str
    function: MetricFunction
    lower_is_better: frozenset[str] = frozenset()

    def evaluate(self, candidate: str | os.PathLike, reference: str | os.PathLike, samples: int | None = None) -> dict[str, float]:
        """{metric name: value} of ``candidate`` against ``reference`` (model paths)."""
        try:
            result = self.function(str(candidate), str(reference), samples)
        except (OnnxqError, ModuleNotFoundError):
            raise  # already actionable, or a missing extra the CLI names
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise MetricError(f"metric {self.spec!r} raised {type(exc).__name__}: {reason}") from None
        return self._as_floats(result)

    def _as_floats(self, result) -> dict[str, float]:
        if not isinstance(result, Mapping):
            raise MetricError(f"metric {self.spec!r} returned {type(result).__name__}; a metric function returns {{metric name: number}}")
        out = {}
        for name, value in result.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise MetricError(f"metric {self.spec!r} returned {value!r} for {name!r}; a metric function returns {{metric name: number}}")
            out[str(name)] = float(value)
        return out


def load_metric(spec: str) -> TaskMetric:
    """The metric function named by ``spec`` (``module:function`` or ``path/to/file.py:function``)."""
    module, sep, function = str(spec).rpartition(":")
    if not sep or not module or not function:
        raise MetricError(f"--metric {spec!r} is not MODULE:FUNCTION or FILE.py:FUNCTION (e.g. onnxq.zoo.metrics:minilm_l6_v2)")
    func = _import_callable(spec, "--metric", MetricError)
    return TaskMetric(spec, func, frozenset(getattr(func, "lower_is_better", ())))
