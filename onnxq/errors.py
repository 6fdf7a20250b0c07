"""The one exception family users see.

Every error a user can cause (bad file, bad data, unsupported op, wrong shapes) is an
:class:`OnnxqError` whose message says what to do. The CLI prints it on one line and exits 2.
"""

from __future__ import annotations


class OnnxqError(Exception):
    """Base class of user-facing errors; the message must be actionable."""


class ModelLoadError(OnnxqError):
    """The model file is missing, truncated, or not ONNX."""


class DataError(OnnxqError):
    """Calibration or evaluation data does not match the model, or is unusable."""


class UnsupportedModelError(OnnxqError):
    """The model uses something onnxq or ONNX Runtime cannot run."""


class PlanError(OnnxqError):
    """A QuantPlan is malformed or does not fit the model."""


class OutputPathError(OnnxqError):
    """The output path cannot be written (e.g. it is the input)."""


class ZooError(OnnxqError):
    """A zoo asset could not be fetched, exported or evaluated."""


def one_line(message: object) -> str:
    """A message (an exception's, e.g. ONNX Runtime's) whole, on one line: its lines joined with
    " | ", so the part that names the index or the size is not cut off."""
    text = str(message)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(message).__name__ if isinstance(message, BaseException) else ""
    return " | ".join(lines)
