"""onnx_ir passes that rewrite the model: one pass per module, its rule in the docstring.

Preprocessing (run before calibration, see :mod:`onnxq.passes.preprocess`): opset upgrade,
constant lifting, constant folding, BatchNorm folding, shape inference.
"""

from __future__ import annotations

__all__ = [
    "FoldBatchNormPass",
    "FoldConstantsPass",
    "InferShapesPass",
    "LiftConstantsPass",
    "PreprocessPass",
    "UpgradeOpsetPass",
    "preprocess",
]

from onnxq.passes.fold_batchnorm import FoldBatchNormPass
from onnxq.passes.fold_constants import FoldConstantsPass
from onnxq.passes.lift_constants import LiftConstantsPass
from onnxq.passes.opset import UpgradeOpsetPass
from onnxq.passes.preprocess import PreprocessPass, preprocess
from onnxq.passes.shape_inference import InferShapesPass
