"""Target policies: rules that turn a graph into a QuantPlan."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.plan import QuantPlan

TARGETS = ("tensorrt", "ort")


def place(model: ir.Model, target: str, *, exclude: Sequence[str] = (), precision: str = "int8") -> QuantPlan:
    """The plan of ``target``'s policy for ``model`` at ``precision`` ("int8" or "fp8"), with
    ``exclude`` patterns applied."""
    from onnxq.plan import check_precision

    check_precision(precision, quantized=True, source="place")
    if target == "tensorrt":
        from onnxq.placement.tensorrt import place as policy
    elif target == "ort":
        from onnxq.placement.ort import place as policy
    else:
        raise OnnxqError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    return policy(model, exclude=exclude, precision=precision)
