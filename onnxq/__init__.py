"""onnxq: post-training quantization of ONNX models for TensorRT and ONNX Runtime.

The public API is imported lazily (``import onnxq`` loads neither ONNX Runtime nor onnx_ir):
:func:`quantize`, :func:`calibrate`, :func:`export`, :func:`sweep`, :func:`solve`, and the
:class:`Recipe` / :class:`QuantPlan` / :class:`OnnxqError` types.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# eager: the submodule onnxq.export would otherwise shadow the function of the same name
from onnxq.export import export  # noqa: E402

_LAZY = {
    "OnnxqError": "onnxq.errors",
    "Recipe": "onnxq.recipe",
    "QuantPlan": "onnxq.plan",
    "QuantizeResult": "onnxq.pipeline",
    "quantize": "onnxq.pipeline",
    "calibrate": "onnxq.calibration",
    "sweep": "onnxq.mixed_precision.sweep",
    "solve": "onnxq.mixed_precision.solver",
}
__all__ = ["__version__", "export", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'onnxq' has no attribute {name!r}")
