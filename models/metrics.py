"""The zoo's task metrics as plug-ins for ``--metric`` (see :mod:`onnxq.task_metric`).

One function per zoo model, named after it with ``-`` as ``_`` (``onnxq.zoo.metrics:smollm2_6l``),
taking (candidate model path, reference model path, samples or None) and returning the model's
:meth:`~onnxq.zoo.ZooModel.evaluate` metrics. ``onnxq --zoo NAME`` stands for
``--metric`` :func:`metric_spec` ``(NAME)``.
"""

from __future__ import annotations

from collections.abc import Callable

from . import ZOO, get

LOWER_IS_BETTER = frozenset({"perplexity", "perplexity_fp32", "kl"})


def task_metric(name: str) -> Callable[[str, str, int | None], dict[str, float]]:
    """The metric function of zoo model ``name``."""
    model = get(name)

    def evaluate(candidate: str, reference: str, samples: int | None = None) -> dict[str, float]:
        return {k: float(v) for k, v in model.evaluate(candidate, reference, n=samples).items()}

    evaluate.__name__ = evaluate.__qualname__ = attribute(name)
    evaluate.__doc__ = f"{name}'s task metrics ({model.description})."
    evaluate.lower_is_better = LOWER_IS_BETTER
    return evaluate


def attribute(name: str) -> str:
    """The name of zoo model ``name``'s metric function in this module."""
    return name.replace("-", "_")


def metric_spec(name: str) -> str:
    """The ``--metric`` spec of zoo model ``name`` (ZooError for an unknown name)."""
    get(name)
    return f"{__name__}:{attribute(name)}"


globals().update({attribute(_name): task_metric(_name) for _name in ZOO})
