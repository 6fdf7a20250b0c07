"""Errors and request checks shared by the sweep and the solver."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from onnxq.errors import OnnxqError
from onnxq.plan import QUANTIZED_PRECISIONS


class SweepError(OnnxqError):
    """A sweep request or a sweep file is unusable."""


class SolverError(OnnxqError):
    """A solver request cannot be met or is malformed."""


class TargetNotMetError(SolverError):
    """The solver ran but no candidate within the limits meets the target; ``report`` is the
    ``.solve.json`` holding every candidate evaluated (None without an output path)."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


def check_precisions(precisions: str | Sequence[str]) -> tuple[str, ...]:
    """Candidate precisions as a tuple; an unknown one is an error naming the known ones."""
    if isinstance(precisions, str):
        precisions = [p.strip() for p in precisions.split(",") if p.strip()]
    out = tuple(dict.fromkeys(precisions))
    if not out:
        raise SweepError(f"no candidate precision given; choose from {list(QUANTIZED_PRECISIONS)}")
    for p in out:
        if p not in QUANTIZED_PRECISIONS:
            raise SweepError(f"unknown precision {p!r}; choose from {list(QUANTIZED_PRECISIONS)}")
    return out


def read_json(path: Path, what: str, error: type[OnnxqError], hint: str):
    """The JSON in ``path``; ``error`` saying what to do when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file; {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); {hint}") from None
