"""QuantPlan: what to quantize, where, and at which precision.

Placement policies write a plan; passes only execute it. The plan is JSON so a user can read it,
edit it (e.g. set a node's ``precision`` to ``"float"`` or ``"fp8"``) and replay it with ``--plan``.

A plan has
- ``precision``: the default precision of quantized nodes (``"int8"`` or ``"fp8"``); policies
  write every quantized node at this precision;
- ``nodes``: one decision per considered node: its precision (``"int8"``, ``"fp8"`` or
  ``"float"``, or weight-only ``"w4"`` / ``"w8"``), which of its inputs get a Q/DQ pair (by
  input index), and why. Precision is per node: a plan may mix INT8 and FP8 nodes; a weight-only
  node quantizes only its weight, whose entry holds the dtype (``int4``/``int8`` symmetric,
  ``uint4``/``uint8`` with zero points), the blocking axis (the reduction axis as the node reads
  the weight) and ``block_size``;
- ``activations``: integer-grid quantization parameters per activation tensor (``int8``
  symmetric or ``uint8`` asymmetric), used by the INT8 nodes that read it;
- ``fp8_activations``: FP8 E4M3FN parameters per activation tensor (symmetric, zero point 0,
  dtype ``float8e4m3fn``), used by the FP8 nodes that read it. A tensor read by nodes of both
  precisions has an entry in both and gets one Q/DQ pair per precision;
- ``weights``: per quantized weight input, keyed ``"<node>:<input index>"``, the per-channel
  axis of the weight as that node reads it (``null`` = per tensor; ``onnxq.plan/1`` files: keyed
  by initializer name, axis on the initializer) and the dtype at the plan's default precision (``int8`` or ``float8e4m3fn``). The precision of the
  node that reads a weight decides the dtype it is quantized to (``WEIGHT_DTYPE``): changing a
  node's precision needs no weight edit, and a weight read by nodes of two precisions is
  quantized once per precision (same axis, same per-channel amax).

Editing a plan in code (what a solver does)::

    plan.set_precision("node_name", "fp8")   # or "int8", or "float"
    plan.activation("tensor", "fp8")          # ActivationQuant or None
    plan.set_activation("tensor", "fp8", activation_params(lo, hi, "float8e4m3fn"))
    # activation_params: onnxq.passes.qdq; place(model, target, precision="fp8"): onnxq.placement

after which calibration (:func:`onnxq.calibration.plan_ranges`, or ``fill_activation_params``
with ``precisions={tensor: ("int8", "fp8")}`` to get both parameter sets from one table) fills
the parameters each node's precision needs, and ``InsertQDQPass`` executes the plan. A plan
with an FP8 node needs opset 19; ``InsertQDQPass`` raises the model's opset itself.

The plan is the whole contract: besides the per-node decisions it carries

- ``smoothquant``: the SmoothQuant groups (α, scales, where each scale goes, split channels;
  :class:`SmoothPlan`), folded into the float model before Q/DQ insertion;
- ``high_precision`` (``"fp32"`` or ``"fp16"``) and, for FP16, ``fp32_nodes``: the nodes kept in
  FP32 with the reason (decided by :mod:`onnxq.placement.fp16`);
- ``equalization``: cross-layer equalization (:class:`EqualizationPlan`: the Conv/Gemm pairs and
  their per-channel scales), folded into the float model before calibration;
- ``bias_correction``: per node, the per-output-channel amount added to its bias (the mean
  error of its quantized output, measured on calibration data), folded before Q/DQ insertion;
- ``local_snr``: per depthwise conv, the SNR of its own quantized output measured on calibration
  data (``--depthwise-min-snr``: those below the threshold were set to float in ``nodes``);
- ``rotation``: the rotation of a decoder's residual stream (:class:`RotationPlan`: Q's kind,
  size, seed and signs, and the embeddings, writers and norms it rewrites), folded into the float
  model before calibration;
- ``min_opset``: the opset the model is raised to before Q/DQ insertion (FP8: 19), if any;
- ``matmulnbits``: the weight-only MatMul/Gemm (ort target) emitted as ONNX Runtime's
  ``com.microsoft::MatMulNBits`` instead of blocked DequantizeLinear → MatMul, and the kernel's
  ``accuracy_level`` (:class:`MatMulNBitsPlan`; executed by :mod:`onnxq.passes.matmulnbits`);
- ``recipe``: the request that produced the plan (for the record; replay does not read it).

Weight entries are keyed by ``"<node>:<input index>"`` (a rewrite that renames an initializer
does not orphan them). ``onnxq quantize --plan`` executes a complete plan without calibrating
and rebuilds, byte for byte, the model whose run wrote it; decisions a plan lacks (a placement-
only plan, an edited node without ranges) are made from the recipe and the calibration data.

Old plans (``onnxq.plan/1``: weights keyed by initializer name, no SmoothQuant or FP16 entries)
load unchanged.
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from onnxq.errors import PlanError
from onnxq.grids import ACTIVATION_GRIDS, GRIDS

PLAN_FORMAT = "onnxq.plan/2"
READABLE_FORMATS = ("onnxq.plan/1", PLAN_FORMAT)
HIGH_PRECISIONS = ("fp32", "fp16")
QUANTIZED_PRECISIONS = ("int8", "fp8")
# Weight-only precisions: only the weight input is quantized (blocked INT4 / INT8 along the
# reduction axis), the activations stay float (the recipe's w4a16 / w8a16).
# "w4a8": blocked INT4 weights with FP8 activations (ModelOpt's w4a8_awq).
WEIGHT_ONLY_PRECISIONS = ("w4", "w8", "w4a8")
# The activation precision of node precisions whose activations are quantized at another name.
ACTIVATION_PRECISION = {"w4a8": "fp8"}
FLOAT = "float"
FP8_DTYPE = "float8e4m3fn"
# Weight dtype of each quantized precision.
WEIGHT_DTYPE = {"int8": "int8", "fp8": FP8_DTYPE}
PLAN_TARGETS = ("tensorrt", "ort")  # the placement policies (onnxq.placement.TARGETS)
INPUT_KINDS = ("activation", "weight", "bias", "dynamic")  # what InsertQDQPass (dynamic: DynamicQuantizePass) executes


def check_precision(precision: str, *, quantized: bool = False, source: str = "plan") -> str:
    allowed = (*QUANTIZED_PRECISIONS, *WEIGHT_ONLY_PRECISIONS)
    if not quantized:
        allowed = (*allowed, FLOAT)
    if precision not in allowed:
        raise PlanError(f"{source}: precision {precision!r} is not one of {list(allowed)}")
    return precision


def activation_precision(precision: str) -> str:
    """The precision a node of ``precision`` reads its activations at ("fp8" for "w4a8")."""
    return ACTIVATION_PRECISION.get(precision, precision)


def inputs_at(inputs: dict[int, str], precision: str) -> dict[int, str]:
    """A node's quantized inputs {index: kind} once the node is at ``precision``: an int32 bias
    (kind ``bias``) lives on an int8 node's accumulator grid (activation scale × weight scale),
    so a node moved to another quantized precision (FP8, a solver's promotion) keeps its bias
    float; a float node keeps every kind (set back to int8 in the JSON, it is a QGemm again)."""
    if precision in ("int8", FLOAT):
        return dict(inputs)
    return {index: kind for index, kind in inputs.items() if kind != "bias"}


def _high_precision(value: str, source: str) -> str:
    if value not in HIGH_PRECISIONS:
        raise PlanError(f"{source}: high_precision {value!r} is not one of {list(HIGH_PRECISIONS)}")
    return value


def _check_activation(tensor: str, a: ActivationQuant, source: str) -> None:
    grid = ACTIVATION_GRIDS.get(a.dtype)
    if grid is None:
        raise PlanError(f"{source}: activation {tensor!r} has dtype {a.dtype!r}; use one of {list(ACTIVATION_GRIDS)}")
    if a.scale is not None and (isinstance(a.scale, bool) or not isinstance(a.scale, (int, float)) or not (math.isfinite(a.scale) and a.scale > 0)):
        raise PlanError(f"{source}: activation {tensor!r} has scale {a.scale!r}; a scale is a finite number above 0")
    if isinstance(a.zero_point, bool) or not isinstance(a.zero_point, (int, float)) or not grid.qmin <= a.zero_point <= grid.qmax:
        raise PlanError(f"{source}: activation {tensor!r} has zero point {a.zero_point!r}, outside {a.dtype}'s [{grid.qmin}, {grid.qmax}]")
    for bound in (a.min, a.max):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound)):
            raise PlanError(f"{source}: activation {tensor!r} has range [{a.min!r}, {a.max!r}]; ranges are finite numbers")
    if grid.symmetric and a.zero_point != 0:
        raise PlanError(f"{source}: activation {tensor!r} is {a.dtype} (symmetric) with zero point {a.zero_point!r}; its zero point is 0")
    if a.min is not None and a.max is not None and a.min > a.max:
        raise PlanError(f"{source}: activation {tensor!r} has range [{a.min!r}, {a.max!r}]: min is above max")


@dataclass
class NodeDecision:
    op_type: str
    precision: str  # "int8", "fp8" or "float"
    # input index -> "activation" | "weight" | "bias"
    inputs: dict[int, str] = field(default_factory=dict)
    reason: str = ""

    @property
    def quantized(self) -> bool:
        return self.precision != FLOAT


@dataclass
class ActivationQuant:
    dtype: str  # "int8" (symmetric), "uint8" (asymmetric) or "float8e4m3fn" (symmetric)
    symmetric: bool = True
    min: float | None = None
    max: float | None = None
    scale: float | None = None
    zero_point: int = 0


@dataclass
class WeightQuant:
    dtype: str = "int8"  # or "float8e4m3fn"; weight-only: "int4"/"int8" (symmetric) or "uint4"/"uint8" (zero points)
    axis: int | None = 0  # weight-only: the axis the blocks run along (the reduction axis)
    block_size: int | None = None  # weight-only: values per scale along ``axis``; None: per channel
    # weight-only AWQ: per block and column (row-major [blocks, columns]) an index into
    # onnxq.grids.CLIP_RATIOS, the factor on the block's range; base64 of uint8. None: no clip
    clip: str | None = None
    # weight-only GPTQ: per weight (row-major, as the node reads it) its integer's offset from
    # round-to-nearest on the entry's blocks; int8, zlib-compressed, base64. None: RTN
    offsets: str | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        for key in ("block_size", "clip", "offsets"):
            if out[key] is None:
                del out[key]  # per-channel entries read as before
        return out

    def clip_indices(self) -> np.ndarray | None:
        """The clip indices as a flat uint8 array, or None."""
        return np.frombuffer(base64.b64decode(self.clip), dtype=np.uint8) if self.clip else None

    def offset_values(self) -> np.ndarray | None:
        """GPTQ's offsets from round-to-nearest as a flat int8 array, or None."""
        return np.frombuffer(zlib.decompress(base64.b64decode(self.offsets)), dtype=np.int8) if self.offsets else None


# --- SmoothQuant decisions (made by onnxq.smoothquant, executed by passes/smoothquant.py) ---


@dataclass
class Fold:
    """One constant input rescaled: ``input`` of ``node`` becomes ``c / s`` (``op="div"``) or
    ``c * s`` (``op="mul"``), s reshaped to ``(C, 1, ..., 1)`` with ``trailing`` ones and
    broadcast right-aligned (so ``trailing`` picks the constant's axis)."""

    node: str
    input: int
    trailing: int
    op: str


@dataclass
class SmoothGroup:
    activation: str
    consumers: list[str]
    channel_axis: int
    rank: int
    alpha: float | None = None  # None: not smoothed (auto found no gain)
    scale: list[float] = field(default_factory=list)
    absorber: dict = field(default_factory=dict)  # {"kind", "node", "op"}; kind "inserted_mul" if none
    folds: list[Fold] = field(default_factory=list)  # diag(s)⁻¹ into the producer side
    weight_folds: list[Fold] = field(default_factory=list)  # diag(s) into the consumers
    amax_before: float = 0.0
    amax_after: float = 0.0
    sim_error: dict = field(default_factory=dict)  # relative squared error of the simulated product
    split: list[int] = field(default_factory=list)  # input channels kept out of the quantized product

    @property
    def smoothed(self) -> bool:
        """The graph changes for this group: scaled, or channels split off (or both)."""
        return self.alpha is not None or bool(self.split)

    @property
    def trailing(self) -> int:
        return self.rank - 1 - self.channel_axis

    @property
    def inserts_mul(self) -> bool:
        return self.absorber.get("kind") == "inserted_mul"

    def inverse_scale(self) -> np.ndarray:
        """What the activation's channels are multiplied by: 1/s, and 0 on split channels."""
        inv = 1.0 / np.asarray(self.scale, dtype=np.float32)
        inv[self.split] = 0.0
        return inv

    def weight_scale(self) -> np.ndarray:
        """What the consumers' weight rows are multiplied by: s, and 0 on split channels."""
        s = np.asarray(self.scale, dtype=np.float32).copy()
        s[self.split] = 0.0
        return s

    @property
    def output(self) -> str:
        """The tensor the consumers read after smoothing."""
        return f"{self.activation}_smoothed" if self.inserts_mul else self.activation


@dataclass
class SmoothPlan:
    alpha: float | str
    split_outliers: int = 0
    groups: list[SmoothGroup] = field(default_factory=list)

    def active(self) -> list[SmoothGroup]:
        return [g for g in self.groups if g.smoothed]

    def to_json(self) -> dict:
        groups = []
        for g in self.groups:
            d = asdict(g)
            d["scale"] = [float(v) for v in g.scale]
            groups.append(d)
        return {"alpha": self.alpha, "split_outliers": self.split_outliers, "groups": groups, "summary": self.summary()}

    @classmethod
    def from_json(cls, data: dict) -> SmoothPlan:
        groups = []
        for g in data.get("groups", []):
            g = dict(g)
            g["folds"] = [Fold(**f) for f in g.get("folds", [])]
            g["weight_folds"] = [Fold(**f) for f in g.get("weight_folds", [])]
            groups.append(SmoothGroup(**g))
        return cls(alpha=data["alpha"], split_outliers=data.get("split_outliers", 0), groups=groups)

    def summary(self) -> dict:
        active = self.active()
        kinds: dict[str, int] = {}
        for g in active:
            kinds[g.absorber["kind"]] = kinds.get(g.absorber["kind"], 0) + 1
        return {
            "groups": len(self.groups), "smoothed": len(active), "absorbed_by": dict(sorted(kinds.items())),
            "inserted_muls": sum(g.inserts_mul for g in active), "split_channels": sum(len(g.split) for g in active),
        }

    def format(self) -> str:
        split = f", up to {self.split_outliers} outlier channels per group split off" if self.split_outliers else ""
        lines = [f"SmoothQuant (alpha {self.alpha}{split}): {len(self.active())} of {len(self.groups)} groups smoothed"]
        lines.append(f"  {'activation':<48} {'alpha':>5} {'amax before':>12} {'after':>9}  scale went to")
        for g in self.groups:
            name = g.activation if len(g.activation) <= 48 else "…" + g.activation[-47:]
            alpha = f"{g.alpha:.2f}" if g.alpha is not None else "-"
            where = f"{g.absorber['kind']} {g.absorber.get('node') or ''}".strip() if g.smoothed else "not smoothed (no gain in simulation)"
            if g.smoothed and g.absorber.get("through"):
                where += f" (through {g.absorber['through']})"
            if g.split:
                where += f"; {len(g.split)} channel{'s' if len(g.split) > 1 else ''} in float {g.split}"
            lines.append(f"  {name:<48} {alpha:>5} {g.amax_before:>12.4g} {g.amax_after:>9.4g}  {where} ({len(g.consumers)} consumers)")
        return "\n".join(lines)


# --- cross-layer equalization (decided by onnxq.equalization, executed by passes/equalize.py) ---


@dataclass
class EqualizedPair:
    """``first``'s output channels are divided by ``scale`` (weight and bias), the activations
    ``through`` it (Relu, Clip, …) follow, ``second``'s input channels are multiplied by it."""

    first: str
    second: str
    through: list[str] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)


@dataclass
class EqualizationPlan:
    iterations: int = 0
    clips: str = "skip"  # Clip between a pair: "skip" the pair, or "rescale" (per-channel bounds)
    pairs: list[EqualizedPair] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"iterations": self.iterations, "clips": self.clips, "pairs": [asdict(p) for p in self.pairs]}

    @classmethod
    def from_json(cls, data: dict) -> EqualizationPlan:
        pairs = [EqualizedPair(**p) for p in data.get("pairs", [])]
        return cls(iterations=data.get("iterations", 0), clips=data.get("clips", "skip"), pairs=pairs)


# --- rotation of the residual stream (decided by onnxq.rotation, executed by passes/rotate.py) ---


@dataclass
class RotatedNorm:
    """A norm on the residual stream: its per-channel weight (input ``scale_input`` of the Mul
    ``scale_node``; None: the norm has none) goes into ``readers`` and becomes 1, and each
    reader's weight is rotated on its input side (``Qᵀ·diag(γ)·W``)."""

    statistic: str  # the Pow node of the norm's statistic (for the report)
    scale_node: str | None = None
    scale_input: int | None = None
    readers: list[str] = field(default_factory=list)


@dataclass
class HeadRotation:
    """The per-head rotation between attention's values and its output projection: ``H``
    (``kind``/``size``/``seed``/``factors``/``signs`` as in :class:`RotationPlan`, ``size`` the
    head dimension) folded into each value projection's output columns, head by head
    (``W_v ← W_v·blockdiag(H)``, its bias too), and its transpose into the output projection's
    input rows (``W_o ← blockdiag(H)ᵀ·W_o``). One ``H`` for every head, so the heads that share
    a KV head share it."""

    kind: str
    size: int
    seed: int = 0
    factors: list[int] = field(default_factory=list)
    signs: str = ""
    values: list[str] = field(default_factory=list)  # value MatMuls: W·blockdiag(H)
    value_biases: list[str] = field(default_factory=list)  # their bias Adds
    outputs: list[str] = field(default_factory=list)  # output projections: blockdiag(H)ᵀ·W
    # online (with --rotate-online): attention's Q·Kᵀ MatMuls whose query heads get an inserted
    # MatMul by H and whose transposed keys one by Hᵀ (Q·H·Hᵀ·Kᵀ = Q·Kᵀ), both in float
    scores: list[str] = field(default_factory=list)


@dataclass
class RotationPlan:
    """``Q`` (``kind`` "hadamard": ``diag(±1)·H/√size``, H the Kronecker product of the Hadamard
    matrices of orders ``factors``, the minus signs where the bits of ``signs`` (hex) are set;
    "orthogonal": the QR of a Gaussian drawn with ``seed``) and the nodes it rewrites."""

    kind: str
    size: int
    seed: int = 0
    factors: list[int] = field(default_factory=list)
    signs: str = ""
    embeddings: list[str] = field(default_factory=list)  # Gather nodes: table · Q
    writers: list[str] = field(default_factory=list)  # MatMul nodes: W · Q
    biases: list[str] = field(default_factory=list)  # their bias Adds: b · Q
    norms: list[RotatedNorm] = field(default_factory=list)
    # online rotation: each of these writers' input is multiplied by blockdiag(H_b/√b) by an
    # inserted MatMul (b = online_block) and its weight by the transpose (0: none)
    online_block: int = 0
    online: list[str] = field(default_factory=list)
    head: HeadRotation | None = None  # per-head rotation of values / output projections

    def online_macs(self) -> dict[str, tuple[int, int]]:
        """{node: MACs per element of its inputs 0 and 1} of the float MatMuls the online rotation
        inserts before it: ``online_block`` on a down projection's input, the head size on each
        input of a ``Q·Kᵀ`` (what those nodes cost, always in float)."""
        out = {name: (self.online_block, 0) for name in self.online}
        if self.head is not None:
            out.update({name: (self.head.size, self.head.size) for name in self.head.scores})
        return out

    def to_json(self) -> dict:
        out = asdict(self)
        if self.head is None:
            del out["head"]  # plans without it read as before
        return out

    @classmethod
    def from_json(cls, data: dict) -> RotationPlan:
        data = dict(data)
        data["norms"] = [RotatedNorm(**n) for n in data.get("norms", [])]
        data["head"] = HeadRotation(**data["head"]) if data.get("head") else None
        return cls(**data)

    def summary(self) -> str:
        readers = sum(len(n.readers) for n in self.norms)
        shape = "x".join(map(str, self.factors)) if self.kind == "hadamard" else f"seed {self.seed}"
        return (
            f"residual stream of size {self.size} rotated by a {'randomized Hadamard' if self.kind == 'hadamard' else 'random orthogonal'} matrix ({shape}): "
            f"{len(self.embeddings)} embedding table(s), {len(self.writers)} writers, {len(self.norms)} norms folded into {readers} readers"
            + (f"; per-head {'Hadamard' if self.head.kind == 'hadamard' else 'orthogonal'} rotation (head dimension {self.head.size}) between {len(self.head.values)} value and output projections"
               + (f", online on the queries and keys of {len(self.head.scores)} Q·Kᵀ ({2 * self.head.size} float MACs per head channel per token)" if self.head.scores else "") if self.head else "")
            + (f"; online Hadamard (block {self.online_block}: {self.online_block} float MACs per input channel per token) before {len(self.online)} MLP down projections" if self.online else "")
        )


# --- attention probabilities (decided by onnxq.placement.attention, executed by passes/unnormalized_softmax.py) ---


@dataclass
class AttentionPlan:
    """``unnormalized``: [Softmax, P·V] pairs whose Softmax becomes ``exp(s - rowmax(s))`` and
    whose P·V output is divided by that exp's row sums (``--attention-probs unnormalized``)."""

    unnormalized: list[list[str]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"unnormalized": [list(pair) for pair in self.unnormalized]}

    @classmethod
    def from_json(cls, data: dict) -> AttentionPlan:
        pairs = [list(pair) for pair in data.get("unnormalized", [])]
        if not all(len(pair) == 2 and all(isinstance(name, str) for name in pair) for pair in pairs):
            raise ValueError("attention.unnormalized is a list of [softmax, pv] node name pairs")
        return cls(unnormalized=pairs)


# --- weight-only form on ONNX Runtime (decided by onnxq.placement.weight_only, executed by passes/matmulnbits.py) ---

# MatMulNBits' accuracy_level: 0 unset (float compute), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
MATMULNBITS_ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass
class MatMulNBitsPlan:
    """``nodes``: weight-only MatMul/Gemm whose blocked DequantizeLinear → node becomes
    ``com.microsoft::MatMulNBits``, at ``accuracy_level`` when its weight is 4-bit and at
    ``accuracy_level_8bit`` when it is 8-bit."""

    accuracy_level: int = 0
    nodes: list[str] = field(default_factory=list)
    accuracy_level_8bit: int = 4

    def to_json(self) -> dict:
        return {"accuracy_level": self.accuracy_level, "accuracy_level_8bit": self.accuracy_level_8bit, "nodes": list(self.nodes)}

    @classmethod
    def from_json(cls, data: dict) -> MatMulNBitsPlan:
        levels = {key: data.get(key, default) for key, default in (("accuracy_level", 0), ("accuracy_level_8bit", 4))}
        for key, level in levels.items():
            if isinstance(level, bool) or level not in MATMULNBITS_ACCURACY_LEVELS:
                raise ValueError(f"matmulnbits.{key} is one of {list(MATMULNBITS_ACCURACY_LEVELS)}, got {level!r}")
        nodes = list(data.get("nodes", []))
        if not all(isinstance(name, str) for name in nodes):
            raise ValueError("matmulnbits.nodes is a list of node names")
        return cls(nodes=nodes, **levels)


@dataclass
class QuantPlan:
    target: str
    precision: str = "int8"
    nodes: dict[str, NodeDecision] = field(default_factory=dict)
    activations: dict[str, ActivationQuant] = field(default_factory=dict)
    weights: dict[str, WeightQuant] = field(default_factory=dict)
    # extra tensors the policy wants quantized for every consumer (e.g. ORT's Conv outputs),
    # at the plan's precision
    outputs: list[str] = field(default_factory=list)
    fp8_activations: dict[str, ActivationQuant] = field(default_factory=dict)
    smoothquant: SmoothPlan | None = None
    high_precision: str = "fp32"
    # FP16 plans: nodes kept in FP32 and why (None: not decided yet)
    fp32_nodes: dict[str, str] | None = None
    min_opset: int | None = None
    recipe: dict | None = None
    equalization: EqualizationPlan | None = None
    # node -> per-output-channel amount added to its bias (None: not decided)
    bias_correction: dict[str, list[float]] | None = None
    # depthwise conv -> its own quantized output's SNR (dB) on the calibration data (None: not measured)
    local_snr: dict[str, float] | None = None
    rotation: RotationPlan | None = None
    attention: AttentionPlan | None = None
    matmulnbits: MatMulNBitsPlan | None = None

    def quantized_nodes(self) -> dict[str, NodeDecision]:
        return {name: d for name, d in self.nodes.items() if d.quantized}

    def precisions(self) -> set[str]:
        """The quantized precisions the plan uses (its nodes' and, for ``outputs``, its own)."""
        used = {d.precision for d in self.nodes.values() if d.quantized}
        if self.outputs:
            used.add(self.precision)
        return used

    def uses_fp8(self) -> bool:
        return "fp8" in {activation_precision(p) for p in self.precisions()}

    def _activation_store(self, precision: str) -> dict[str, ActivationQuant]:
        check_precision(precision, quantized=True)
        return self.fp8_activations if precision == "fp8" else self.activations

    def activation(self, tensor: str, precision: str) -> ActivationQuant | None:
        """The parameters of ``tensor`` for readers at ``precision`` ("int8" or "fp8")."""
        return self._activation_store(precision).get(tensor)

    def set_activation(self, tensor: str, precision: str, params: ActivationQuant) -> None:
        self._activation_store(precision)[tensor] = params

    def set_precision(self, node: str, precision: str) -> None:
        """Set one node's precision ("int8", "fp8" or "float").

        Setting a quantized precision on a node the policy kept in float with no quantizable
        inputs is an error: there is nothing to quantize (the policy's reason says why).
        """
        check_precision(precision)
        decision = self.nodes.get(node)
        if decision is None:
            raise PlanError(f"the plan has no decision for node {node!r}; it is not a quantization candidate")
        if precision != FLOAT and not decision.inputs:
            raise PlanError(f"node {node!r} has no quantizable inputs in the plan ({decision.reason}); it stays float")
        decision.precision = precision
        decision.inputs = inputs_at(decision.inputs, precision)

    # --- weights, keyed by the node and input that read them ---------------------------------
    @staticmethod
    def weight_key(node: str, index: int) -> str:
        return f"{node}:{index}"

    def weight(self, node: str, index: int, initializer: str | None = None) -> WeightQuant | None:
        """The weight entry of input ``index`` of ``node`` (old plans: by initializer name)."""
        found = self.weights.get(self.weight_key(node, index))
        if found is None and initializer is not None:
            found = self.weights.get(initializer)
        return found

    def set_weight(self, node: str, index: int, params: WeightQuant) -> None:
        self.weights[self.weight_key(node, index)] = params

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
            "fp8_activations": {name: asdict(a) for name, a in self.fp8_activations.items()},
            "weights": {name: w.to_json() for name, w in self.weights.items()},
            "outputs": list(self.outputs),
            "smoothquant": self.smoothquant.to_json() if self.smoothquant is not None else None,
            "high_precision": self.high_precision,
            "fp32_nodes": self.fp32_nodes,
            "min_opset": self.min_opset,
            "recipe": self.recipe,
            **({"equalization": self.equalization.to_json()} if self.equalization is not None else {}),
            **({"bias_correction": self.bias_correction} if self.bias_correction is not None else {}),
            **({"local_snr": self.local_snr} if self.local_snr is not None else {}),
            **({"rotation": self.rotation.to_json()} if self.rotation is not None else {}),
            **({"attention": self.attention.to_json()} if self.attention is not None else {}),
            **({"matmulnbits": self.matmulnbits.to_json()} if self.matmulnbits is not None else {}),
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "plan") -> QuantPlan:
        if not isinstance(data, dict) or data.get("format") not in READABLE_FORMATS:
            raise PlanError(f"{source} is not an onnxq plan (expected \"format\": \"{PLAN_FORMAT}\"); write one with --save-plan")
        try:
            nodes = {}
            for name, d in data["nodes"].items():
                check_precision(d["precision"], source=f"{source}: node {name!r}")
                nodes[name] = NodeDecision(
                    op_type=d["op_type"],
                    precision=d["precision"],
                    # a plan written before the bias rule lived here may give an FP8 node a bias
                    # (the pass then kept it float): read it as that node's inputs are now
                    inputs=inputs_at({int(k): v for k, v in d.get("inputs", {}).items()}, d["precision"]),
                    reason=d.get("reason", ""),
                )
            check_precision(data.get("precision", "int8"), quantized=True, source=source)
            plan = cls(
                target=data["target"],
                precision=data.get("precision", "int8"),
                nodes=nodes,
                activations={n: ActivationQuant(**a) for n, a in data.get("activations", {}).items()},
                weights={n: WeightQuant(**w) for n, w in data.get("weights", {}).items()},
                outputs=list(data.get("outputs", [])),
                fp8_activations={n: ActivationQuant(**a) for n, a in data.get("fp8_activations", {}).items()},
                smoothquant=SmoothPlan.from_json(data["smoothquant"]) if data.get("smoothquant") else None,
                high_precision=_high_precision(data.get("high_precision", "fp32"), source),
                fp32_nodes=data.get("fp32_nodes"),
                min_opset=data.get("min_opset"),
                recipe=data.get("recipe"),
                equalization=EqualizationPlan.from_json(data["equalization"]) if data.get("equalization") else None,
                bias_correction=data.get("bias_correction"),
                local_snr=data.get("local_snr"),
                rotation=RotationPlan.from_json(data["rotation"]) if data.get("rotation") else None,
                attention=AttentionPlan.from_json(data["attention"]) if data.get("attention") else None,
                matmulnbits=MatMulNBitsPlan.from_json(data["matmulnbits"]) if data.get("matmulnbits") else None,
            )
            plan.check_values(source)
            return plan
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # AttributeError: a list or null where a mapping belongs
            raise PlanError(f"{source} is malformed ({type(exc).__name__}: {exc}); regenerate it with --save-plan") from None

    def check_values(self, source: str = "plan") -> None:
        """Every value the passes execute is one they can: a known target, known input kinds and
        dtypes, finite positive scales, zero points on their grid, whole-number axes."""
        if self.target not in PLAN_TARGETS:
            raise PlanError(f"{source}: target {self.target!r} is not one of {list(PLAN_TARGETS)}")
        self._check_fields(source)
        for name, d in self.nodes.items():
            bad = [kind for kind in d.inputs.values() if kind not in INPUT_KINDS]
            if bad:
                raise PlanError(f"{source}: node {name!r} has input kind {bad[0]!r}; use one of {list(INPUT_KINDS)}")
        for store in (self.activations, self.fp8_activations):
            for tensor, a in store.items():
                _check_activation(tensor, a, source)
        for key, w in self.weights.items():
            if w.dtype not in GRIDS:  # weight-only entries use the 4-bit and unsigned grids too
                raise PlanError(f"{source}: weight {key!r} has dtype {w.dtype!r}; use one of {list(GRIDS)}")
            if w.axis is not None and (isinstance(w.axis, bool) or not isinstance(w.axis, int)):
                raise PlanError(f"{source}: weight {key!r} has axis {w.axis!r}; an axis is a whole number or null (per tensor)")

    def _check_fields(self, source: str) -> None:
        """The plan-wide fields have their types: an opset number, names, reasons."""
        if self.min_opset is not None and (isinstance(self.min_opset, bool) or not isinstance(self.min_opset, int) or not 1 <= self.min_opset <= 100):
            raise PlanError(f"{source}: min_opset {self.min_opset!r} is not an opset number")
        if not all(isinstance(t, str) for t in self.outputs):
            raise PlanError(f"{source}: outputs is a list of tensor names, got {self.outputs!r}")
        if self.fp32_nodes is not None and not (isinstance(self.fp32_nodes, dict) and all(isinstance(v, str) for v in self.fp32_nodes.values())):
            raise PlanError(f"{source}: fp32_nodes maps node names to reasons, got {type(self.fp32_nodes).__name__}")
        for name, d in self.nodes.items():
            if not isinstance(d.op_type, str) or not isinstance(d.reason, str) or not all(isinstance(k, int) for k in d.inputs):
                raise PlanError(f"{source}: node {name!r} needs an op_type and a reason (strings) and inputs by index")
        for tensor, a in [*self.activations.items(), *self.fp8_activations.items()]:
            if not isinstance(a.symmetric, bool):
                raise PlanError(f"{source}: activation {tensor!r} has symmetric {a.symmetric!r}; true or false")

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
