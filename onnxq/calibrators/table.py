"""CalibrationTable: what one pass over the calibration data learned about each tensor.

Per tensor: min and max; optionally a histogram (:mod:`onnxq.calibrators.histogram`) and, for the
inputs of MatMul/Gemm/Conv, the per-channel abs-max along the channel axis. The table can be
written to JSON (``onnxq calibrate``) and read back to quantize without calibrating again
(``onnxq quantize --table``). A saved table records

- ``model_sha256``: a hash of the *preprocessed* model (:func:`model_hash`): the graph the tensor
  names refer to, weights included. Hashing the preprocessed graph rather than the file's bytes
  means a model re-saved with its weights in a side file (or without) still matches, external
  weights are covered (the ``.onnx`` bytes alone do not hold them), and a change of onnxq's
  preprocessing that would rename tensors is caught as a mismatch;
- ``method`` / ``percentile``: the range method(s) asked for at calibration time, the default
  when the table is used;
- ``num_samples``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxq.calibrators.histogram import Histogram, range_for
from onnxq.errors import OnnxqError

TABLE_FORMAT = "onnxq.calibration/1"


class CalibrationTableError(OnnxqError):
    """A calibration table file is unreadable, corrupt, or made for another model."""


@dataclass
class TensorStats:
    """Running statistics of one float tensor over every calibration sample."""

    min: float = math.inf
    max: float = -math.inf
    histogram: Histogram | None = None
    channel_axis: int | None = None
    channel_amax: np.ndarray | None = None
    # signed per-channel range (SmoothQuant: the range of x / s follows from it without recalibrating)
    channel_min: np.ndarray | None = None
    channel_max: np.ndarray | None = None

    @property
    def amax(self) -> float:
        return max(abs(self.min), abs(self.max))

    def update(self, lo: float, hi: float) -> None:
        self.min = min(self.min, float(lo))
        self.max = max(self.max, float(hi))

    def update_channels(self, amax: np.ndarray) -> None:
        amax = np.asarray(amax, dtype=np.float32).reshape(-1)
        if self.channel_amax is None:
            self.channel_amax = amax.copy()
        elif self.channel_amax.shape != amax.shape:
            raise OnnxqError(
                f"the channel count of a tensor changed between samples ({self.channel_amax.size} vs {amax.size}); "
                "calibration data must keep the channel dimension fixed"
            )
        else:
            np.maximum(self.channel_amax, amax, out=self.channel_amax)

    def update_channel_range(self, lo: np.ndarray, hi: np.ndarray) -> None:
        lo = np.asarray(lo, dtype=np.float32).reshape(-1)
        hi = np.asarray(hi, dtype=np.float32).reshape(-1)
        if self.channel_min is None or self.channel_min.shape != lo.shape:
            self.channel_min, self.channel_max = lo.copy(), hi.copy()
        else:
            np.minimum(self.channel_min, lo, out=self.channel_min)
            np.maximum(self.channel_max, hi, out=self.channel_max)

    def to_json(self) -> dict:
        out: dict = {"min": self.min, "max": self.max}
        if self.histogram is not None:
            out["histogram"] = self.histogram.to_json()
        if self.channel_amax is not None:
            out["channel_axis"] = self.channel_axis
            out["channel_amax"] = [float(v) for v in self.channel_amax]
        if self.channel_min is not None:
            out["channel_min"] = [float(v) for v in self.channel_min]
            out["channel_max"] = [float(v) for v in self.channel_max]
        return out

    def _check_range(self) -> None:
        """A finite, ordered range, or the collector's "never reached" state (+inf, -inf)."""
        unreached = self.min == math.inf and self.max == -math.inf
        if not unreached and not (math.isfinite(self.min) and math.isfinite(self.max)):
            raise ValueError(f"range [{self.min}, {self.max}] is not finite (an infinite scale would make every output NaN)")
        if not unreached and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")

    def _check_histogram(self) -> None:
        """The histogram's range is the one the collector gives this tensor's largest |x|."""
        if self.histogram.zeros < 0:
            raise ValueError(f"histogram zeros {self.histogram.zeros} is negative")
        expected = range_for(self.amax) if math.isfinite(self.amax) else 0.0
        if self.histogram.range != expected:
            raise ValueError(f"histogram range {self.histogram.range} does not fit the tensor's range [{self.min}, {self.max}] (the collector writes {expected})")

    @classmethod
    def from_json(cls, data: dict) -> TensorStats:
        stats = cls(min=float(data["min"]), max=float(data["max"]))
        stats._check_range()
        if "histogram" in data:
            stats.histogram = Histogram.from_json(data["histogram"])
            stats._check_histogram()
        if "channel_amax" in data:
            stats.channel_axis = int(data["channel_axis"])
            stats.channel_amax = np.asarray(data["channel_amax"], dtype=np.float32)
        if "channel_min" in data:
            stats.channel_min = np.asarray(data["channel_min"], dtype=np.float32)
            stats.channel_max = np.asarray(data["channel_max"], dtype=np.float32)
        return stats


@dataclass
class CalibrationTable:
    method: str | dict[str, str] = "minmax"
    num_samples: int = 0
    tensors: dict[str, TensorStats] = field(default_factory=dict)
    percentile: float | None = None
    model_sha256: str | None = None

    def to_json(self) -> dict:
        return {
            "format": TABLE_FORMAT,
            "model_sha256": self.model_sha256,
            "method": self.method,
            "percentile": self.percentile,
            "num_samples": self.num_samples,
            "tensors": {name: s.to_json() for name, s in self.tensors.items()},
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "calibration table") -> CalibrationTable:
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise CalibrationTableError(
                f"{source} is not an onnxq calibration table (expected \"format\": \"{TABLE_FORMAT}\"); "
                "write one with onnxq calibrate"
            )
        try:
            tensors = {}
            for name, s in data["tensors"].items():
                try:
                    tensors[name] = TensorStats.from_json(s)
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"tensor {name!r}: {exc}") from None
            return cls(
                method=data["method"],
                num_samples=int(data["num_samples"]),
                tensors=tensors,
                percentile=data.get("percentile"),
                model_sha256=data.get("model_sha256"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CalibrationTableError(
                f"{source} is corrupt ({type(exc).__name__}: {exc}); write it again with onnxq calibrate"
            ) from None

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    def save(self, path: str | Path) -> None:
        from onnxq.modelio import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(self.dumps())

    @classmethod
    def load(cls, path: str | Path) -> CalibrationTable:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise CalibrationTableError(f"{path}: no such calibration table; write one with onnxq calibrate") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationTableError(f"{path} cannot be read ({exc}); write it again with onnxq calibrate") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CalibrationTableError(f"{path} is not valid JSON ({exc}); write it again with onnxq calibrate") from None
        return cls.from_json(data, source=str(path))

    def check_model(self, sha256: str, source: str = "the calibration table") -> None:
        if self.model_sha256 != sha256:
            raise CalibrationTableError(
                f"{source} was made for another model (model hash {str(self.model_sha256)[:12]}…, this model "
                f"{sha256[:12]}…); calibrate this model: onnxq calibrate MODEL --calib DATA -o TABLE"
            )

    def require(self, tensors, *, histograms: set[str] = frozenset(), source: str = "the calibration table") -> None:
        missing = [t for t in tensors if t not in self.tensors]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise CalibrationTableError(
                f"{source} has no statistics for {', '.join(map(repr, missing[:3]))}{more}, which the plan quantizes; "
                "recalibrate: onnxq calibrate MODEL --calib DATA -o TABLE"
            )
        no_hist = [t for t in histograms if self.tensors[t].histogram is None]
        if no_hist:
            raise CalibrationTableError(
                f"{source} holds no histogram for {no_hist[0]!r}, which a histogram method needs; "
                "recalibrate with onnxq calibrate"
            )


def model_hash(model: ir.Model) -> str:
    """sha256 of a (preprocessed) model's graph: nodes, inputs, outputs and initializer contents."""
    h = hashlib.sha256()
    graph = model.graph

    def put(text: str) -> None:
        data = text.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    put(str(sorted(model.opset_imports.items())))
    for v in graph.inputs:
        put(f"in:{v.name}:{v.dtype}:{v.shape}")
    for v in graph.outputs:
        put(f"out:{v.name}")
    for node in graph:
        data = ir.serde.serialize_node(node).SerializeToString(deterministic=True)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    for name in sorted(graph.initializers):
        value = graph.initializers[name]
        put(f"init:{name}:{value.dtype}:{value.shape}")
        if value.const_value is not None:
            h.update(value.const_value.tobytes())
    return h.hexdigest()
