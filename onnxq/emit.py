"""Execute a QuantPlan on the preprocessed float model: the one emit pipeline.

Stages, each an onnx_ir ``PassManager`` of passes that only execute the plan:

0. ``rotate``: the rotation of a decoder's residual stream (``plan.rotation``), before
   calibration like ``equalize`` (it changes every range after it), and the unnormalized
   attention probabilities (``plan.attention``: calibration must see E, not P);
   ``equalize``: cross-layer equalization (``plan.equalization``); a stage of its own because it
   runs before calibration (it changes the activations' ranges; SmoothQuant's fold needs them);
1. ``fold``: SmoothQuant scales and split-off outlier channels (``plan.smoothquant``);
2. ``quantize``: bias corrections (``plan.bias_correction``), the opset the plan asks for (``plan.min_opset``), then Q/DQ (nodes, activations,
   weights), then ONNX Runtime's MatMulNBits for the weight-only products it names
   (``plan.matmulnbits``);
3. ``finish``: FP16 casts for the high-precision regions (``plan.high_precision``,
   ``plan.fp32_nodes``), unused nodes removed, topological order, the provenance metadata
   (:mod:`onnxq.passes.provenance`).

``onnxq quantize`` makes its decisions between the stages (ranges of smoothed tensors after
``fold``, the FP16 regions after ``quantize``) and then runs the next stage, so the model it
writes is exactly what :func:`emit` builds from the same plan on a fresh copy of the model: a
saved plan replays byte for byte. The sweep's candidates and the solver's model are built here
too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import onnx
import onnx_ir as ir

from onnxq import modelio
from onnxq.errors import ModelLoadError, OnnxqError, PlanError, UnsupportedModelError, one_line
from onnxq.passes.bias_correction import BiasCorrectionPass
from onnxq.passes.cast_fp16 import CastFloat16Pass
from onnxq.passes.dynamic import DynamicQuantizePass, dynamic_nodes
from onnxq.passes.equalize import EqualizePass
from onnxq.passes.matmulnbits import MatMulNBitsPass
from onnxq.passes.opset import RequireOpsetPass
from onnxq.passes.provenance import RecordProvenancePass
from onnxq.passes.qdq import InsertQDQPass
from onnxq.passes.rotate import RotatePass
from onnxq.passes.smoothquant import SmoothQuantPass
from onnxq.passes.unnormalized_softmax import UnnormalizedSoftmaxPass
from onnxq.plan import QuantPlan

STAGES = ("rotate", "equalize", "fold", "quantize", "finish")


def stage_passes(plan: QuantPlan, stage: str) -> list[ir.passes.PassBase]:
    """The passes of one emit stage for ``plan``."""
    if stage == "rotate":
        rotate = [RotatePass(plan.rotation)] if plan.rotation is not None else []
        return [*rotate, *([UnnormalizedSoftmaxPass(plan.attention)] if plan.attention is not None and plan.attention.unnormalized else [])]
    if stage == "equalize":
        return [EqualizePass(plan.equalization)] if plan.equalization is not None and plan.equalization.pairs else []
    if stage == "fold":
        return [SmoothQuantPass(plan.smoothquant)] if plan.smoothquant is not None and plan.smoothquant.active() else []
    if stage == "quantize":
        corrections = [BiasCorrectionPass(plan.bias_correction)] if plan.bias_correction else []
        dynamic = [DynamicQuantizePass(plan)] if dynamic_nodes(plan) else []
        nbits = [MatMulNBitsPass(plan)] if plan.matmulnbits is not None and plan.matmulnbits.nodes else []
        return [*corrections, *([RequireOpsetPass(plan.min_opset)] if plan.min_opset else []), *dynamic, InsertQDQPass(plan), *nbits]
    if stage == "finish":
        cast = []
        if plan.high_precision == "fp16":
            if plan.fp32_nodes is None:
                raise PlanError("the plan asks for FP16 high precision but has no FP32 decisions (fp32_nodes); make it with onnxq quantize --high-precision fp16")
            cast = [CastFloat16Pass(plan.fp32_nodes)]
        return [*cast, ir.passes.common.RemoveUnusedNodesPass(), ir.passes.common.TopologicalSortPass(), RecordProvenancePass(plan)]
    raise ValueError(f"unknown emit stage {stage!r}; stages are {STAGES}")


def emit(model: ir.Model, plan: QuantPlan, stages: Sequence[str] = STAGES) -> ir.Model:
    """Run ``stages`` of the emit pipeline on ``model`` in place; returns it."""
    for stage in stages:
        passes = stage_passes(plan, stage)
        if passes:
            try:
                ir.passes.PassManager(passes)(model)
            except ir.passes.PassError as exc:
                raise _user_error(exc) or exc
    return model


def _user_error(exc: BaseException) -> OnnxqError | None:
    """The OnnxqError (a plan that does not fit, say) that PassManager wrapped in its PassError."""
    while exc is not None:
        if isinstance(exc, OnnxqError):
            return exc
        exc = exc.__cause__
    return None


def check_model(model: ir.Model, source: str | os.PathLike | None = None) -> None:
    """Raise when ``model`` (at its ORT-compatible IR version) fails onnx.checker; when the input
    file ``source`` fails the checker too, the input is what is reported.

    The checker reads the model from a temporary file whose weights are in a side file, so no
    in-memory proto holds a copy of the weights (0.5B decoder: +0.9 GB RSS for a full proto)."""
    with tempfile.TemporaryDirectory(prefix="onnxq-check-") as folder:
        path = modelio.save_with_external_data(model, os.path.join(folder, "model.onnx"))
        try:
            onnx.checker.check_model(path, full_check=False)
        except onnx.checker.ValidationError as exc:
            input_reason = modelio.checker_reason(source) if source is not None else None
            if input_reason is not None:
                raise ModelLoadError(f"the input model {source} does not pass onnx.checker ({input_reason}); fix or re-export it") from None
            raise UnsupportedModelError(f"the quantized model does not pass onnx.checker ({one_line(exc)}); please report this with the model") from None
