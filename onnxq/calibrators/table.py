"""CalibrationTable: what one pass over the calibration data learned about each tensor."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field


@dataclass
class TensorStats:
    """Running statistics of one float tensor over every calibration sample."""

    min: float = math.inf
    max: float = -math.inf

    @property
    def amax(self) -> float:
        return max(abs(self.min), abs(self.max))

    def update(self, lo: float, hi: float) -> None:
        self.min = min(self.min, float(lo))
        self.max = max(self.max, float(hi))


@dataclass
class CalibrationTable:
    method: str = "minmax"
    num_samples: int = 0
    tensors: dict[str, TensorStats] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "num_samples": self.num_samples,
            "tensors": {name: asdict(s) for name, s in self.tensors.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> CalibrationTable:
        return cls(
            method=data["method"],
            num_samples=int(data["num_samples"]),
            tensors={name: TensorStats(**s) for name, s in data["tensors"].items()},
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)
