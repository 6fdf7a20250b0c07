"""Range estimation: the streaming statistics collector, the histogram, the range methods, the table."""

from onnxq.calibrators.collector import collect
from onnxq.calibrators.histogram import Histogram
from onnxq.calibrators.methods import METHODS, compute_range
from onnxq.calibrators.table import (
    CalibrationTable,
    CalibrationTableError,
    TensorStats,
    model_hash,
)

__all__ = [
    "METHODS",
    "CalibrationTable",
    "CalibrationTableError",
    "Histogram",
    "TensorStats",
    "collect",
    "compute_range",
    "model_hash",
]
