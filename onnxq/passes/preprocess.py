"""The preprocessing pipeline every model goes through before calibration.

Order, and why:

1. :class:`~onnxq.passes.opset.UpgradeOpsetPass` first: every later pass reasons about the ops
   at the opset the quantized model will have (the converter may rewrite ops, e.g. move
   ``Unsqueeze`` axes from an attribute to a ``Constant`` input).
2. Inline model-local functions (:class:`onnx_ir.passes.common.InlinePass`): calibration, folding
   and Q/DQ insertion see no function bodies (If/Loop/Scan bodies they do see; NameFixPass, last,
   makes node names unique across every graph, so the plan keys body nodes by name).
3. :class:`~onnxq.passes.lift_constants.LiftConstantsPass`: ``Constant`` nodes (including those
   the converter just emitted) become initializers, the one place later passes read constants.
4. :class:`~onnxq.passes.fold_constants.FoldConstantsPass`: constant subgraphs (shape
   arithmetic, ``Transpose``/``Cast`` of weights) collapse to initializers, so that weights reach
   Conv/Gemm/MatMul directly as initializers.
5. :class:`~onnxq.passes.fold_batchnorm.FoldBatchNormPass`: needs the weights as initializers,
   hence after folding.
6. :class:`onnx_ir.passes.common.RemoveUnusedNodesPass` and
   :class:`onnx_ir.passes.common.TopologicalSortPass`: drop what folding left dead, keep the node
   order valid.
7. :class:`~onnxq.passes.shape_inference.InferShapesPass` last, on the final graph, so every
   intermediate value carries its dtype (and its shape where static) for calibration.

All passes are in place: they change the ``ir.Model`` they are given. Callers pass a model they
loaded (``onnxq.modelio.load``), so the user's file is never touched; to keep an unprocessed copy,
load the file twice.
"""

from __future__ import annotations

__all__ = ["PreprocessPass", "load_and_preprocess", "preprocess"]

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, NameFixPass, RemoveUnusedNodesPass, TopologicalSortPass

from onnxq.errors import OnnxqError
from onnxq.passes.fold_batchnorm import FoldBatchNormPass
from onnxq.passes.fold_constants import FoldConstantsPass
from onnxq.passes.lift_constants import LiftConstantsPass
from onnxq.passes.opset import UpgradeOpsetPass
from onnxq.passes.shape_inference import InferShapesPass


class PreprocessPass(ir.passes.PassManager):
    """The preprocessing passes in order (see the module docstring), as one in-place pass.

    Attributes:
        min_opset: Models whose default-domain opset is below this are upgraded.
        target_opset: The opset upgraded models end at; defaults to ``min_opset``.
    """

    def __init__(self, *, min_opset: int = 13, target_opset: int | None = None) -> None:
        super().__init__(
            [
                UpgradeOpsetPass(min_opset=min_opset, target_opset=target_opset),
                InlinePass(),
                LiftConstantsPass(),
                FoldConstantsPass(),
                FoldBatchNormPass(),
                RemoveUnusedNodesPass(),
                TopologicalSortPass(),
                InferShapesPass(),
                NameFixPass(),
            ],
            steps=1,
        )
        self.min_opset = min_opset
        self.target_opset = target_opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            return super().call(model)
        except ir.passes.PassError as exc:
            # The pass manager wraps every error in PassError; a user-facing error raised by one
            # of the passes is re-raised as itself so the CLI can print its message.
            cause: BaseException | None = exc
            while cause is not None:
                if isinstance(cause, OnnxqError):
                    raise cause from None
                cause = cause.__cause__
            raise


def preprocess(
    model: ir.Model, *, min_opset: int = 13, target_opset: int | None = None
) -> ir.Model:
    """Run the preprocessing passes on ``model`` in place and return it.

    Upgrades the opset if below ``min_opset`` (to ``target_opset``, default ``min_opset``),
    inlines functions, lifts constants, folds constants and BatchNormalization, removes dead
    nodes and infers every value's dtype and shape. Raises
    :class:`~onnxq.errors.UnsupportedModelError` when the model cannot be upgraded.
    """
    return PreprocessPass(min_opset=min_opset, target_opset=target_opset)(model).model


def load_and_preprocess(path) -> ir.Model:
    """Read a model file and preprocess it for quantization (the file itself is not touched)."""
    from onnxq import modelio

    return preprocess(modelio.load(path))
