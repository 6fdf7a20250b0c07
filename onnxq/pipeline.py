"""The quantize job: load → preprocess → place → calibrate → insert Q/DQ → verify → compare."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import modelio
from onnxq.calibrators import CalibrationTable, collect
from onnxq.check import OutputAccuracy, compare, format_table
from onnxq.data import open_source
from onnxq.errors import OnnxqError, PlanError, UnsupportedModelError
from onnxq.placement import TARGETS, place
from onnxq.plan import QuantPlan
from onnxq.runtime import ort as ort_rt

DataArg = str | os.PathLike | Iterable[Mapping[str, np.ndarray]]

ACTIVATION_DTYPE = {"tensorrt": "int8", "ort": "uint8"}
PRECISIONS = ("int8",)


@dataclass
class QuantizeResult:
    output: Path
    plan: QuantPlan
    table: CalibrationTable
    accuracy: list[OutputAccuracy]
    eval_source: str
    report_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "output": str(self.output),
            "target": self.plan.target,
            "precision": self.plan.precision,
            "plan_summary": self.plan.summary(),
            "quantized_nodes": len(self.plan.quantized_nodes()),
            "calibration_samples": self.table.num_samples,
            "evaluation": {"data": self.eval_source, "outputs": [a.to_json() for a in self.accuracy]},
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


def activation_tensors(model: ir.Model, plan: QuantPlan) -> list[str]:
    """Names of the activation tensors the plan quantizes, in graph order."""
    by_name = {n.name: n for n in model.graph}
    names: dict[str, None] = {}
    for node_name, decision in plan.nodes.items():
        if not decision.quantized:
            continue
        node = by_name.get(node_name)
        if node is None:
            raise PlanError(f"the plan names node {node_name!r}, which the model does not have; was it made for another model?")
        for index, kind in decision.inputs.items():
            if kind == "activation":
                names[node.inputs[index].name] = None
    for tensor in plan.outputs:
        names[tensor] = None
    return list(names)


def fill_activation_params(plan: QuantPlan, table: CalibrationTable) -> None:
    from onnxq.passes.qdq import activation_params

    dtype = ACTIVATION_DTYPE[plan.target]
    for name, stats in table.tensors.items():
        plan.activations[name] = activation_params(stats.min, stats.max, dtype)


def prepare(model_path: str | os.PathLike) -> ir.Model:
    """Load and preprocess a model for quantization (the file itself is not touched)."""
    from onnxq.passes import preprocess

    model = modelio.load(model_path)
    model = preprocess(model)
    ir.passes.common.NameFixPass()(model)
    return model


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def quantize(
    model: str | os.PathLike,
    output: str | os.PathLike,
    calib: DataArg | None = None,
    *,
    target: str = "tensorrt",
    precision: str = "int8",
    eval: DataArg | None = None,
    exclude: Sequence[str] = (),
    plan: str | os.PathLike | QuantPlan | None = None,
    save_plan: str | os.PathLike | None = None,
    calib_samples: int | None = None,
    report: bool = True,
    evaluate: bool = True,
    quiet: bool = False,
) -> QuantizeResult:
    """Quantize ``model`` to Q/DQ ONNX at ``output`` and compare it with the float model in ORT.

    ``calib``/``eval`` are an .npz file, a directory of .npz files, ``module:function``, or an
    iterable of feed dicts. Without ``eval`` the comparison runs on the calibration data and the
    report says so. The report is written as JSON beside the output (``<output>.report.json``).
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if target not in TARGETS:
        raise OnnxqError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    if precision not in PRECISIONS:
        raise OnnxqError(f"precision {precision!r} is not available yet; choose one of {list(PRECISIONS)}")
    if calib is None:
        raise OnnxqError("quantization needs calibration data: pass --calib DATA (.npz, directory of .npz, or module:function)")
    output = modelio.check_output_path(output, model)
    report_path = output.with_name(output.name.removesuffix(".onnx") + ".report.json")
    plan_path = Path(save_plan) if save_plan else None
    for extra in (report_path if report else None, plan_path):
        if extra is not None:
            modelio.check_output_path(extra, model)

    float_model = prepare(model)
    spec = ort_rt.model_input_spec(float_model)
    calib_data = open_source(calib, spec, limit=calib_samples)
    timings["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    if plan is None:
        the_plan = place(float_model, target, exclude=exclude)
    else:
        the_plan = plan if isinstance(plan, QuantPlan) else QuantPlan.load(plan)
        if the_plan.target != target:
            _log(f"onnxq: using the plan's target {the_plan.target!r}", quiet)
        if exclude:
            from onnxq.placement.rules import apply_exclusions

            apply_exclusions(float_model, the_plan, exclude)
    n_quant = len(the_plan.quantized_nodes())
    _log(f"onnxq: plan for {the_plan.target}: {n_quant} of {len(the_plan.nodes)} candidate nodes quantized", quiet)
    timings["place"] = time.perf_counter() - t

    t = time.perf_counter()
    tensors = activation_tensors(float_model, the_plan)
    table = collect(float_model, tensors, calib_data, progress=not quiet)
    fill_activation_params(the_plan, table)
    _log(f"onnxq: calibrated {len(table.tensors)} tensors on {table.num_samples} samples", quiet)
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    from onnxq.passes.qdq import InsertQDQPass

    InsertQDQPass(the_plan)(float_model)
    ir.passes.common.RemoveUnusedNodesPass()(float_model)
    ir.passes.common.TopologicalSortPass()(float_model)
    proto = modelio.to_proto(float_model)
    try:
        onnx.checker.check_model(proto, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise UnsupportedModelError(f"the quantized model does not pass onnx.checker ({str(exc).splitlines()[0]}); please report this with the model") from None
    quant_session = ort_rt.create_session(proto)
    del proto
    modelio.save(float_model, output)
    del float_model  # the float weights are no longer needed; evaluation loads the user's file
    if plan_path is not None:
        the_plan.save(plan_path)
    timings["insert_qdq"] = time.perf_counter() - t

    t = time.perf_counter()
    if not evaluate:
        eval_data, eval_source = [], "skipped"
    elif eval is not None:
        eval_data = open_source(eval, spec, require_finite=False)
        eval_source = eval_data.description
    else:
        eval_data = open_source(calib, spec, limit=calib_samples, require_finite=False)
        eval_source = f"{eval_data.description} (calibration data, not held out: pass --eval)"
    # The float reference is the user's own file, as they would run it.
    accuracy = compare(model, quant_session, eval_data, progress=not quiet) if evaluate else []
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    result = QuantizeResult(output, the_plan, table, accuracy, eval_source, timings=timings)
    if report:
        with modelio.atomic_path(report_path) as tmp:
            tmp.write_text(json.dumps(result.to_json(), indent=1))
        result.report_path = report_path
    if not quiet and accuracy:
        print(format_table(accuracy, f"ORT FP32 vs ORT {the_plan.precision} ({the_plan.target}) on {eval_source}:"))
    return result
