"""Activation ranges for every candidate precision, from one calibration pass."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.calibration import MethodArg, activation_tensors, fill_activation_params, resolve_methods, tensor_methods
from onnxq.calibrators import collect
from onnxq.calibrators.methods import HISTOGRAM_METHODS
from onnxq.plan import WEIGHT_DTYPE, ActivationQuant, NodeDecision, QuantPlan, WeightQuant


def uniform_plan(base: QuantPlan, precision: str) -> QuantPlan:
    """``base`` with every quantized node at ``precision`` (ranges not filled)."""
    nodes = {
        name: NodeDecision(d.op_type, precision if d.quantized else d.precision, dict(d.inputs), d.reason)
        for name, d in base.nodes.items()
    }
    weights = {name: WeightQuant(WEIGHT_DTYPE[precision], w.axis) for name, w in base.weights.items()}
    return QuantPlan(target=base.target, precision=precision, nodes=nodes, weights=weights, outputs=list(base.outputs))


@dataclass
class Ranges:
    """Activation quantization parameters per precision and tensor, from one calibration pass."""

    params: dict[str, dict[str, ActivationQuant]]
    num_samples: int
    seconds: float


def calibrate_ranges(
    model: ir.Model,
    base: QuantPlan,
    data: Iterable[Mapping[str, np.ndarray]],
    precisions: Sequence[str],
    *,
    method: MethodArg = None,
    percentile: float | None = None,
) -> Ranges:
    """One streaming pass over ``data``; scales for every tensor ``base`` quantizes, per precision."""
    t0 = time.perf_counter()
    tensors = activation_tensors(model, base)
    methods = tensor_methods(model, base, tensors, resolve_methods(method, base.target))
    needs_hist = {t for t, m in methods.items() if m in HISTOGRAM_METHODS}
    table = collect(model, tensors, data, progress=True, histograms=needs_hist)
    plan = uniform_plan(base, precisions[0])
    fill_activation_params(plan, table, methods, percentile, precisions=dict.fromkeys(table.tensors, tuple(precisions)))
    params = {p: {t: plan.activation(t, p) for t in table.tensors} for p in precisions}
    return Ranges(params, table.num_samples, time.perf_counter() - t0)
