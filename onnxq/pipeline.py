"""The quantize job: load → preprocess → place → calibrate → insert Q/DQ → verify → compare."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxq import modelio
from onnxq.calibration import DataArg, MethodArg, plan_ranges, resolve_methods
from onnxq.calibrators import CalibrationTable
from onnxq.check import OutputAccuracy, compare, format_table
from onnxq.data import open_source
from onnxq.errors import OnnxqError, UnsupportedModelError
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.placement import TARGETS, place
from onnxq.plan import QuantPlan
from onnxq.progress import log
from onnxq.runtime import ort as ort_rt
from onnxq.smoothquant import SmoothPlan

PRECISIONS = ("int8", "fp8")
HIGH_PRECISIONS = ("fp32", "fp16")


@dataclass
class QuantizeResult:
    output: Path
    plan: QuantPlan
    table: CalibrationTable
    accuracy: list[OutputAccuracy]
    eval_source: str
    report_path: Path | None = None
    high_precision: str = "fp32"
    timings: dict[str, float] = field(default_factory=dict)
    smoothquant: SmoothPlan | None = None

    def to_json(self) -> dict:
        return {
            "output": str(self.output),
            "target": self.plan.target,
            "precision": self.plan.precision,
            "high_precision": self.high_precision,
            "plan_summary": self.plan.summary(),
            "quantized_nodes": len(self.plan.quantized_nodes()),
            "calibration_samples": self.table.num_samples,
            "calibration_method": self.table.method,
            "evaluation": {"data": self.eval_source, "outputs": [a.to_json() for a in self.accuracy]},
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            **({"smoothquant": self.smoothquant.to_json()} if self.smoothquant is not None else {}),
        }


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
    method: MethodArg = None,
    percentile: float | None = None,
    table: str | os.PathLike | CalibrationTable | None = None,
    report: bool = True,
    evaluate: bool = True,
    quiet: bool = False,
    high_precision: str = "fp32",
    smoothquant: float | str | None = None,
    split_outliers: int = 0,
) -> QuantizeResult:
    """Quantize ``model`` to Q/DQ ONNX at ``output`` and compare it with the float model in ORT.

    ``calib``/``eval`` are an .npz file, a directory of .npz files, ``module:function``, or an
    iterable of feed dicts. Without ``eval`` the comparison runs on the calibration data and the
    report says so. The report is written as JSON beside the output (``<output>.report.json``).

    ``method``: the range method (``minmax``, ``percentile``, ``entropy``, ``mse``), or a mapping
    by the reading node's op type, e.g. ``{"matmul": "entropy", "default": "minmax"}``;
    ``percentile`` for the percentile method (default 99.99). ``table``: a calibration table from
    :func:`calibrate` (path or object) used instead of calibrating; its method and percentile are
    the defaults then.

    ``precision``: ``int8`` or ``fp8`` (E4M3FN) for the quantized nodes (a ``plan`` may mix them
    per node). ``high_precision``: ``fp32`` keeps the non-quantized regions as they are; ``fp16``
    converts them to FP16 with explicit Casts (:class:`~onnxq.passes.cast_fp16.CastFloat16Pass`),
    keeping in FP32 the norms, softmax inputs, rotary angles and every tensor that overflows FP16
    on the calibration data.
    ``smoothquant``: a migration strength α in [0, 1], or ``"auto"`` (α per group from a grid, by
    simulated W8A8 error on rows sampled during calibration); the scales are folded into the
    graph (:mod:`onnxq.smoothquant`) before Q/DQ insertion. ``split_outliers``: with
    ``smoothquant``, up to this many input channels per MatMul/Gemm group (those whose smoothed
    range dominates, as many as the simulated error says pay) leave the quantized product for a
    float side product.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if target not in TARGETS:
        raise OnnxqError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    if high_precision not in HIGH_PRECISIONS:
        raise OnnxqError(f"high precision {high_precision!r} is not one of {list(HIGH_PRECISIONS)}")
    if precision not in PRECISIONS:
        raise OnnxqError(f"precision {precision!r} is not available; choose one of {list(PRECISIONS)}")
    if calib is None and table is None:
        raise OnnxqError("quantization needs calibration data: pass --calib DATA (.npz, directory of .npz, or module:function) or --table TABLE")
    from onnxq.calibrators.methods import check_percentile

    if percentile is not None:
        percentile = check_percentile(percentile)
    resolve_methods(method, target)  # fail on a bad method before any work
    if split_outliers and smoothquant is None:
        raise OnnxqError("--split-outliers is part of SmoothQuant's per-channel treatment: pass --smoothquant ALPHA|auto with it")
    if smoothquant is not None:
        from onnxq.smoothquant import check_alpha, check_split

        smoothquant = check_alpha(smoothquant)
        split_outliers = check_split(split_outliers)
        if calib is None:
            raise OnnxqError("--smoothquant needs calibration data: pass --calib DATA (it samples activation rows and per-channel ranges)")
    if table is not None and not isinstance(table, CalibrationTable):
        table_source = str(table)
        table = CalibrationTable.load(table)
    else:
        table_source = "the calibration table"
    output = modelio.check_output_path(output, model)
    report_path = output.with_name(output.name.removesuffix(".onnx") + ".report.json")
    plan_path = Path(save_plan) if save_plan else None
    for extra in (report_path if report else None, plan_path):
        if extra is not None:
            modelio.check_output_path(extra, model)

    float_model = load_and_preprocess(model)
    spec = ort_rt.model_input_spec(float_model)
    calib_data = open_source(calib, spec, limit=calib_samples) if calib is not None else None
    timings["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    if plan is None:
        the_plan = place(float_model, target, exclude=exclude, precision=precision)
    else:
        the_plan = plan if isinstance(plan, QuantPlan) else QuantPlan.load(plan)
        if the_plan.target != target:
            log(f"onnxq: using the plan's target {the_plan.target!r}", quiet)
        if exclude:
            from onnxq.placement.rules import apply_exclusions

            apply_exclusions(float_model, the_plan, exclude)
    n_quant = len(the_plan.quantized_nodes())
    log(f"onnxq: plan for {the_plan.target}: {n_quant} of {len(the_plan.nodes)} candidate nodes quantized", quiet)
    timings["place"] = time.perf_counter() - t

    t = time.perf_counter()
    fp16_tensors = []
    if high_precision == "fp16":
        from onnxq.passes.cast_fp16 import float_tensor_names

        fp16_tensors = float_tensor_names(float_model.graph)
    sq_groups, sq_request = [], {}
    if smoothquant is not None:
        from onnxq import smoothquant as sq

        sq_groups = sq.find_groups(float_model, the_plan)
        sq_request = sq.calibration_request(sq_groups, smoothquant, split_outliers=split_outliers)
        if table is not None:
            log("onnxq: --table is not used with --smoothquant: calibrating on --calib (SmoothQuant needs activation rows)", quiet)
        table = None
    table = plan_ranges(
        float_model, the_plan, calib_data, table, method=method, percentile=percentile,
        table_source=table_source, quiet=quiet, extra_tensors=fp16_tensors, **sq_request,
    )
    timings["calibrate"] = time.perf_counter() - t
    smooth_plan = None
    if smoothquant is not None:
        t = time.perf_counter()
        smooth_plan = sq.smooth(
            float_model, the_plan, sq_groups, table, smoothquant, sq_request.get("reservoirs"), calib_data,
            method=method, percentile=percentile, quiet=quiet, split_outliers=split_outliers,
        )
        timings["smoothquant"] = time.perf_counter() - t

    t = time.perf_counter()
    from onnxq.passes.qdq import InsertQDQPass

    InsertQDQPass(the_plan)(float_model)
    if high_precision == "fp16":
        from onnxq.passes.cast_fp16 import CastFloat16Pass

        cast_pass = CastFloat16Pass(ranges={n: s.amax for n, s in table.tensors.items()})
        cast_pass(float_model)
        log(f"onnxq: FP16 high-precision regions; {len(cast_pass.kept)} nodes kept in FP32", quiet)
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
    run_eval = evaluate
    if not evaluate:
        eval_data, eval_source = [], "skipped"
    elif eval is not None:
        eval_data = open_source(eval, spec, require_finite=False)
        eval_source = eval_data.description
    elif calib is None:
        run_eval = False
        eval_data, eval_source = [], "skipped (ranges from a calibration table and no --eval data)"
    else:
        eval_data = open_source(calib, spec, limit=calib_samples, require_finite=False)
        eval_source = f"{eval_data.description} (calibration data, not held out: pass --eval)"
    # The float reference is the user's own file, as they would run it.
    accuracy = compare(model, quant_session, eval_data, progress=not quiet) if run_eval else []
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    result = QuantizeResult(
        output, the_plan, table, accuracy, eval_source, timings=timings, high_precision=high_precision, smoothquant=smooth_plan
    )
    if report:
        with modelio.atomic_path(report_path) as tmp:
            tmp.write_text(json.dumps(result.to_json(), indent=1))
        result.report_path = report_path
    if not quiet and accuracy:
        print(format_table(accuracy, f"ORT FP32 vs ORT {the_plan.precision} ({the_plan.target}) on {eval_source}:"))
    return result
