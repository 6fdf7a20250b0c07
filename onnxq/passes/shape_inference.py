"""Give every value in the graph its dtype, and its shape where onnx can infer it.

Rule: run ONNX shape inference with data propagation (so shapes computed by Shape/Gather/Concat
chains become static where the inputs are) and write the inferred dtype and shape onto every
value of the model, subgraphs included. Calibration relies on ``value.dtype`` being set for every
float intermediate, and on shapes wherever they are static.

Built on :class:`onnx_ir.passes.common.ShapeInferencePass`. What it handles, and what this pass
adds around it:

- Models over 2 GB: the library serializes the model with every main-graph initializer larger
  than 1 KB stripped (turned into a typed graph input for the duration of the call), so protobuf's
  2 GB limit applies only to the graph's structure. Weights in ``Constant`` nodes are not stripped:
  run :class:`~onnxq.passes.lift_constants.LiftConstantsPass` first. Data propagation therefore
  sees only initializers of at most 1 KB, which covers shape tensors.
- Failure: the library logs a warning and leaves the model unchanged when inference raises. In
  strict mode one node onnx cannot infer (a custom-domain op without a schema, an existing
  annotation that conflicts) aborts inference for the whole model, so when strict inference leaves
  values untyped this pass runs it again in non-strict mode, which skips such nodes and infers the
  rest. Values still without a dtype afterwards are logged as a warning;
  :func:`values_without_type` lists them for callers that need every type. Strict mode does not
  fail on an op without a schema: its outputs just stay untyped.
- Data propagation is onnx's: it reaches ``Reshape`` only from opset 14 (``Reshape``-13's
  inference reads its shape from an initializer only, and gives the output not even a rank
  otherwise). Static shape chains are folded into initializers by
  :class:`~onnxq.passes.fold_constants.FoldConstantsPass` first, so this matters only for
  dynamic ones.
"""

from __future__ import annotations

__all__ = ["InferShapesPass", "values_without_type"]

import contextlib
import logging
from collections.abc import Iterator

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

logger = logging.getLogger(__name__)


def values_without_type(model: ir.Model) -> list[ir.Value]:
    """Graph inputs and node outputs (subgraphs included) that have no dtype."""
    missing = [v for v in model.graph.inputs if v.dtype is None]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for out in node.outputs:
            if out.name and out.dtype is None:
                missing.append(out)
    return missing


class InferShapesPass(ir.passes.InPlacePass):
    """Infer dtypes and shapes of all values with ONNX shape inference (data propagation on).

    Attributes:
        data_prop: Propagate constant shape data through shape-computing ops (default True).
    """

    def __init__(self, data_prop: bool = True) -> None:
        super().__init__()
        self.data_prop = data_prop

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        with _capture_library_warnings() as strict_failures:
            modified = ShapeInferencePass(
                check_type=True, strict_mode=True, data_prop=self.data_prop
            )(model).modified
        missing = values_without_type(model)
        if missing:
            logger.debug(
                "strict shape inference left %d values untyped (%s); retrying in non-strict mode",
                len(missing),
                strict_failures[-1] if strict_failures else "no error",
            )
            modified |= ShapeInferencePass(
                check_type=False, strict_mode=False, data_prop=self.data_prop
            )(model).modified
            missing = values_without_type(model)
        if missing:
            names = ", ".join(repr(v.name) for v in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            reason = f"; strict inference failed: {strict_failures[-1]}" if strict_failures else ""
            logger.warning(
                "ONNX shape inference could not type %d values (%s%s): outputs of ops onnx has "
                "no schema for (custom domains) and everything computed only from them stay "
                "untyped%s",
                len(missing),
                names,
                more,
                reason,
            )
        return ir.passes.PassResult(model, modified=modified)


class _Collect(logging.Filter):
    def __init__(self, sink: list[str]) -> None:
        super().__init__()
        self.sink = sink

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        text = str(exc).strip() if exc is not None else record.getMessage()
        self.sink.append(text.splitlines()[-1] if text else type(exc).__name__)
        return False


@contextlib.contextmanager
def _capture_library_warnings() -> Iterator[list[str]]:
    """Keep the library's "Shape inference failed" traceback for our own message instead."""
    sink: list[str] = []
    lib_logger = logging.getLogger(ShapeInferencePass.__module__)
    collect = _Collect(sink)
    lib_logger.addFilter(collect)
    try:
        yield sink
    finally:
        lib_logger.removeFilter(collect)
