"""onnxq: post-training quantization of ONNX models for TensorRT and ONNX Runtime."""

from onnxq.errors import OnnxqError
from onnxq.calibration import calibrate
from onnxq.export import export  # the function; the module stays importable as onnxq.export's names
from onnxq.pipeline import QuantizeResult, quantize
from onnxq.plan import QuantPlan
from onnxq.mixed_precision.sweep import sweep
from onnxq.mixed_precision.solver import solve

__version__ = "0.1.0"
__all__ = ["OnnxqError", "QuantPlan", "QuantizeResult", "__version__", "calibrate", "export", "quantize", "solve", "sweep"]
