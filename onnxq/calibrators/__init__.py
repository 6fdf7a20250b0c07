"""Range estimation: the streaming statistics collector and the range methods built on it."""

from onnxq.calibrators.collector import collect
from onnxq.calibrators.table import CalibrationTable, TensorStats

__all__ = ["CalibrationTable", "TensorStats", "collect"]
