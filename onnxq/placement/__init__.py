"""Target policies: rules that turn a graph into a QuantPlan."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.placement.attention import set_attention_probs
from onnxq.placement.rules import apply_filters
from onnxq.plan import QuantPlan
from onnxq.recipe import Recipe

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


def plan_for(model: ir.Model, recipe: Recipe) -> QuantPlan:
    """The placement decisions for ``recipe``: the target's policy at its precision, then its
    node filters (exclude/include by name, regex and op type) and weight granularity."""
    if recipe.dynamic:
        from onnxq.placement.dynamic import place as dynamic_place

        plan = dynamic_place(model)
    elif recipe.weight_only:
        from onnxq.placement.weight_only import place as weight_only_place

        # MatMulNBits computes in the activation's type; FP16 plans keep the DQ form the Cast pass knows
        level = recipe.ort_accuracy_level if recipe.ort_weight_form == "matmulnbits" and recipe.high_precision == "fp32" else None
        plan = weight_only_place(model, recipe.target, recipe.precision, recipe.block_size, quantize_head=recipe.quantize_head, quantize_embedding=recipe.quantize_embedding, head_bits=recipe.head_bits, accuracy_level=level)
    else:
        plan = place(model, recipe.target, precision=recipe.precision)
        set_attention_probs(model, plan, recipe.attention_probs)
    apply_filters(model, plan, exclude=recipe.exclude, exclude_op=recipe.exclude_op, include=recipe.include, include_op=recipe.include_op)
    if recipe.per_tensor_weights:
        for entry in plan.weights.values():
            entry.axis = None
    plan.high_precision = recipe.high_precision
    plan.recipe = recipe.to_json()
    return plan
