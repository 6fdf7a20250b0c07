"""QuantPlan: what to quantize, where, and at which precision.

Placement policies write a plan; passes only execute it. The plan is JSON so a user can read it,
edit it (e.g. set a node's ``precision`` to ``"float"``) and replay it with ``--plan``.

A plan has
- ``nodes``: one decision per considered node: its precision, which of its inputs get a Q/DQ pair
  (by input index), and why;
- ``activations``: quantization parameters per activation tensor (filled from calibration);
- ``weights``: per weight initializer, the dtype and the per-channel axis (``null`` = per tensor).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onnxq.errors import PlanError

PLAN_FORMAT = "onnxq.plan/1"
QUANTIZED_PRECISIONS = ("int8",)
FLOAT = "float"


@dataclass
class NodeDecision:
    op_type: str
    precision: str  # "int8" or "float"
    # input index -> "activation" | "weight" | "bias"
    inputs: dict[int, str] = field(default_factory=dict)
    reason: str = ""

    @property
    def quantized(self) -> bool:
        return self.precision != FLOAT


@dataclass
class ActivationQuant:
    dtype: str  # "int8" (symmetric) or "uint8" (asymmetric)
    symmetric: bool = True
    min: float | None = None
    max: float | None = None
    scale: float | None = None
    zero_point: int = 0


@dataclass
class WeightQuant:
    dtype: str = "int8"
    axis: int | None = 0


@dataclass
class QuantPlan:
    target: str
    precision: str = "int8"
    nodes: dict[str, NodeDecision] = field(default_factory=dict)
    activations: dict[str, ActivationQuant] = field(default_factory=dict)
    weights: dict[str, WeightQuant] = field(default_factory=dict)
    # extra tensors the policy wants quantized for every consumer (e.g. ORT's Conv outputs)
    outputs: list[str] = field(default_factory=list)

    def quantized_nodes(self) -> dict[str, NodeDecision]:
        return {name: d for name, d in self.nodes.items() if d.quantized}

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for d in self.nodes.values():
            key = f"{d.op_type}:{d.precision}"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    # --- JSON --------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "target": self.target,
            "precision": self.precision,
            "summary": self.summary(),
            "nodes": {
                name: {**asdict(d), "inputs": {str(k): v for k, v in d.inputs.items()}}
                for name, d in self.nodes.items()
            },
            "activations": {name: asdict(a) for name, a in self.activations.items()},
            "weights": {name: asdict(w) for name, w in self.weights.items()},
            "outputs": list(self.outputs),
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "plan") -> QuantPlan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source} is not an onnxq plan (expected \"format\": \"{PLAN_FORMAT}\"); write one with --save-plan")
        try:
            nodes = {}
            for name, d in data["nodes"].items():
                if d["precision"] not in (*QUANTIZED_PRECISIONS, FLOAT):
                    raise PlanError(
                        f"{source}: node {name!r} has precision {d['precision']!r}; use one of "
                        f"{[*QUANTIZED_PRECISIONS, FLOAT]}"
                    )
                nodes[name] = NodeDecision(
                    op_type=d["op_type"],
                    precision=d["precision"],
                    inputs={int(k): v for k, v in d.get("inputs", {}).items()},
                    reason=d.get("reason", ""),
                )
            return cls(
                target=data["target"],
                precision=data.get("precision", "int8"),
                nodes=nodes,
                activations={n: ActivationQuant(**a) for n, a in data.get("activations", {}).items()},
                weights={n: WeightQuant(**w) for n, w in data.get("weights", {}).items()},
                outputs=list(data.get("outputs", [])),
            )
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{source} is malformed ({type(exc).__name__}: {exc}); regenerate it with --save-plan") from None

    def save(self, path: str | Path) -> None:
        from onnxq.modelio import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> QuantPlan:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"{path}: no such plan file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{path} is not valid JSON ({exc}); regenerate it with --save-plan") from None
        return cls.from_json(data, source=str(path))
