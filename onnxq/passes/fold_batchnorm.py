"""Fold inference-mode BatchNormalization into the Conv / ConvTranspose / Gemm before it.

Rule: ``BatchNormalization(Op(x, W, B))`` with ``Op`` one of Conv, ConvTranspose, Gemm becomes
``Op(x, W', B')`` where, per output channel c, ``s[c] = gamma[c] / sqrt(var[c] + epsilon)``,
``W'`` is ``W`` scaled by ``s`` along the output-channel axis (Conv: 0; ConvTranspose: 1, per
group; Gemm: 0 if ``transB`` else 1) and ``B' = (beta_gemm * B - mean) * s + beta`` (B = 0 when
absent). Nodes left unused by the rewrite (the BatchNormalization, dead initializers) are then
removed. Quantizing the folded weight is what TensorRT and ORT execute, so calibration must see it.

The fold applies only when it is exact:

- W, B and the four BatchNormalization parameters are initializers with values, none of them a
  graph input (a caller could override it);
- W and B are used by no other node, and the Op's output feeds only the BatchNormalization;
- the BatchNormalization runs in inference mode: ``training_mode`` unset or 0 (opset 14+), a
  single output (opsets 9-13, where extra outputs select training mode, which normalises with
  batch statistics), and not ``spatial=0`` (opsets < 9);
- its parameters are 1-D of length C, the Op's output-channel count.

Anything else is left as it is.

Built on onnxscript's rewrite rules ``fuse_batchnorm_into_conv_rule``,
``fuse_batchnorm_into_conv_transpose_rule`` and ``fuse_batchnorm_into_gemm_rule`` (applied as one
:class:`onnxscript.rewriter.RewriteRuleSet` with :class:`onnxscript.rewriter.RewritePass`),
followed by :class:`onnx_ir.passes.common.RemoveUnusedNodesPass`. The library rules check the
first two conditions; they fold training-mode BatchNormalization as well (which changes the
model's output), so this pass uses the rules' classes with the inference-mode and shape checks
added to their ``check``.
"""

from __future__ import annotations

__all__ = ["FoldBatchNormPass"]

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import RewritePass, RewriteRuleSet
from onnxscript.rewriter.rules.common import _fuse_batchnorm as _lib

from onnxq.ops import weight_output_axis


def _inference_mode_failure(batchnorm: ir.Node) -> str | None:
    """Why ``batchnorm`` cannot be folded as a per-channel affine map, or None if it can."""
    training_mode = batchnorm.attributes.get("training_mode")
    if training_mode is not None and (training_mode.is_ref() or training_mode.as_int() != 0):
        return "BatchNormalization runs in training mode (training_mode != 0)"
    if sum(1 for out in batchnorm.outputs if out.name) > 1:
        return "BatchNormalization has training-mode outputs (running/saved mean and variance)"
    spatial = batchnorm.attributes.get("spatial")
    if spatial is not None and (spatial.is_ref() or spatial.as_int() != 1):
        return "BatchNormalization has spatial=0 (per-activation statistics)"
    return None


def _shape_failure(inbound: ir.Node, batchnorm: ir.Node, channel_axis: int) -> str | None:
    weight = inbound.inputs[1]
    if weight is None or weight.const_value is None:
        return None  # the library check reports it
    channels = weight.const_value.shape[channel_axis]
    if inbound.op_type == "ConvTranspose":
        group = inbound.attributes.get_int("group", 1)
        channels = channels * group
    for param in batchnorm.inputs[1:5]:
        if param is None or param.const_value is None:
            return None  # the library check reports it
        if tuple(param.const_value.shape) != (channels,):
            return (
                f"BatchNormalization parameter {param.name!r} has shape "
                f"{list(param.const_value.shape)}, expected [{channels}]"
            )
    return None


class _InferenceOnlyMixin:
    """Adds the inference-mode and parameter-shape checks to a library fusion rule."""

    def check(self, context, x, inbound_out: ir.Value, batchnorm_out: ir.Value):
        result = super().check(context, x, inbound_out, batchnorm_out)  # type: ignore[misc]
        if not result:
            return result
        inbound = inbound_out.producer()
        batchnorm = batchnorm_out.producer()
        assert inbound is not None and batchnorm is not None
        reason = _inference_mode_failure(batchnorm) or _shape_failure(
            inbound, batchnorm, weight_output_axis(inbound)
        )
        if reason is not None:
            return result.fail(reason)
        return result


class _FoldIntoConv(_InferenceOnlyMixin, _lib.FuseBatchNormIntoConv):
    pass


class _FoldIntoConvTranspose(_InferenceOnlyMixin, _lib.FuseBatchNormIntoConvTranspose):
    pass


class _FoldIntoGemm(_InferenceOnlyMixin, _lib.FuseBatchNormIntoGemm):
    pass


def _rules() -> RewriteRuleSet:
    # Same rules as onnxscript.rewriter.rules.common.fuse_batchnorm_into_{conv,
    # conv_transpose,gemm}_rule, built from their classes with the checks above.
    return RewriteRuleSet(
        [_FoldIntoConv.rule(), _FoldIntoConvTranspose.rule(), _FoldIntoGemm.rule()]
    )


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold inference-mode BatchNormalization into a preceding Conv, ConvTranspose or Gemm."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # The rewrite builds a new node; keep the original Conv/Gemm name, which users name in
        # --exclude and plans, and diffs match on. The new node produces the BN's output value.
        names = {
            node.outputs[0].name: node.inputs[0].producer().name
            for node in model.graph
            if node.op_type == "BatchNormalization"
            and node.inputs[0] is not None
            and node.inputs[0].producer() is not None
            and node.inputs[0].producer().op_type in ("Conv", "ConvTranspose", "Gemm")
        }
        rewritten = RewritePass(_rules())(model).modified
        if rewritten:
            taken = {node.name for node in model.graph}
            for node in model.graph:
                original = names.get(node.outputs[0].name) if node.outputs else None
                if original and node.op_type != "BatchNormalization" and original not in taken:
                    node.name = original
                    taken.add(original)
        cleaned = RemoveUnusedNodesPass()(model).modified if rewritten else False
        return ir.passes.PassResult(model, modified=rewritten or cleaned)
