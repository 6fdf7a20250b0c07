"""Per-layer localisation: where a quantized model loses accuracy against its float model.

Matching goes through the quantized graph's Q/DQ pairs. An activation ``X`` of the float graph is read
in the quantized graph as ``X → QuantizeLinear → DequantizeLinear → consumer``; both graphs keep the
name ``X``. For every such pair (weights, whose Q/DQ has no float input, are skipped) two SNRs are
accumulated against the float model's ``X``:

- ``snr_input_db``: the quantized model's ``X`` (the float value feeding Q) — the error that
  arrives from upstream layers;
- ``snr_dq_db``: the DQ output — that error plus this tensor's own rounding and clipping, i.e.
  what the consumer actually reads;

and one within the quantized model:

- ``snr_local_db``: the DQ output against the quantized model's own ``X`` — the noise this Q/DQ
  pair adds by itself, whatever arrived from upstream. Rows are sorted by it, ascending: the first
  rows are the quantizers that lose the most (the accumulated SNRs fall along the graph and would
  mostly name the last layers).

Tensors the quantized graph carries rescaled or recast are matched to their float source and
compared after undoing that: an FP16 region's ``Cast`` is looked through; a SmoothQuant ``Mul``
by a constant inserted before the Q (``X_smoothed = X · m``) is looked through and the float ``X``
multiplied by ``m``; a tensor whose channels were rescaled in place (SmoothQuant folded into a
norm, cross-layer equalization) is compared with the float tensor times the per-channel multiplier
recorded in the model's ``onnxq.rescaled`` metadata (:mod:`onnxq.passes.provenance`). A tensor
the rotation of ``--rotate`` put in another basis (``onnxq.rotated`` metadata) has no float
counterpart to compare with and is listed as unmatched. A Q/DQ pair
whose input still has no float counterpart is listed as unmatched with the reason, and the report
says how many of all the activation pairs were matched.

When a ReLU/Clip was folded into the quantization (the float graph has ``X → Relu → Y`` and the
quantized graph has ``X → Q → DQ`` with ``Y`` gone), the DQ output stands for ``Y`` and is compared
with the float ``Y``, not with the pre-activation ``X`` (ORT's qdq_loss_debug compares with ``X``).

Both models run one sample at a time with the matched tensors exposed as outputs; only per-tensor
sums (Σref², Σerr²) are kept, so memory is one sample's activations, whatever the number of samples.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq import modelio
from onnxq.metrics import snr_db
from onnxq.progress import progress_bar
from onnxq.runtime import ort as ort_rt

_FOLDABLE = ("Relu", "Clip")


@dataclass
class LayerPair:
    tensor: str  # the quantized activation's name (in both graphs)
    float_ref: str  # the float tensor the DQ output is compared with (differs after a folded ReLU)
    dq_output: str
    consumers: list[str]
    folded: str | None = None  # "Relu"/"Clip" when the DQ output stands for that op's output
    clip: tuple[float, float] | None = None
    float_tensor: str = ""  # the float graph's name of the Q input (``tensor`` unless recast or rescaled)
    multiplier: np.ndarray | None = None  # the float tensors times this is what the quantized graph carries

    def __post_init__(self):
        self.float_tensor = self.float_tensor or self.tensor

    def rescaled(self, float_value: np.ndarray) -> np.ndarray:
        return float_value if self.multiplier is None else float_value * self.multiplier


@dataclass
class LayerComparison:
    """The per-layer statistics, lowest local SNR first, and the activation Q/DQ pairs that could
    not be matched to a float tensor: (tensor, reason)."""

    stats: list[LayerStat]
    unmatched: list[tuple[str, str]]

    def __iter__(self):  # reads as the list of statistics
        return iter(self.stats)

    def __len__(self) -> int:
        return len(self.stats)

    def __getitem__(self, index):
        return self.stats[index]

    @property
    def matched(self) -> int:
        return len(self.stats)

    @property
    def total(self) -> int:
        return len(self.stats) + len(self.unmatched)

    def summary(self) -> str:
        return f"{self.matched} of {self.total} quantized activations matched to the float model"

    def to_json(self) -> dict:
        return {"matched": self.matched, "total": self.total,
                "unmatched": [{"tensor": t, "reason": r} for t, r in self.unmatched]}


@dataclass
class LayerStat:
    pair: LayerPair
    samples: int = 0
    _ref_sq: float = 0.0
    _input_err_sq: float = 0.0
    _dq_err_sq: float = 0.0
    _ref_pre_sq: float = 0.0
    _local_sq: float = 0.0
    _local_err_sq: float = 0.0

    _snr = staticmethod(snr_db)

    @property
    def snr_input_db(self) -> float:
        return self._snr(self._ref_pre_sq, self._input_err_sq)

    @property
    def snr_dq_db(self) -> float:
        return self._snr(self._ref_sq, self._dq_err_sq)

    @property
    def snr_local_db(self) -> float:
        return self._snr(self._local_sq, self._local_err_sq)

    def update(self, float_x: np.ndarray, float_ref: np.ndarray, quant_x: np.ndarray, dq: np.ndarray) -> None:
        fx = float_x.astype(np.float64).ravel()
        fr = float_ref.astype(np.float64).ravel()
        e_in = fx - quant_x.astype(np.float64).ravel()
        e_dq = fr - dq.astype(np.float64).ravel()
        self._ref_pre_sq += float(fx @ fx)
        self._ref_sq += float(fr @ fr)
        self._input_err_sq += float(e_in @ e_in)
        self._dq_err_sq += float(e_dq @ e_dq)
        qx = quant_x.astype(np.float64).ravel()
        if self.pair.folded == "Relu":
            qx = np.maximum(qx, 0.0)
        elif self.pair.folded == "Clip" and self.pair.clip is not None:
            qx = np.clip(qx, *self.pair.clip)
        e_local = qx - dq.astype(np.float64).ravel()
        self._local_sq += float(qx @ qx)
        self._local_err_sq += float(e_local @ e_local)
        self.samples += 1

    def to_json(self) -> dict:
        def num(v: float):
            return round(v, 3) if math.isfinite(v) else ("inf" if v > 0 else "-inf")

        return {
            "tensor": self.pair.tensor,
            "compared_with": self.pair.float_ref + (" (rescaled as the quantized graph)" if self.pair.multiplier is not None else ""),
            "consumers": self.pair.consumers,
            "snr_local_db": num(self.snr_local_db),
            "snr_dq_db": num(self.snr_dq_db),
            "snr_input_db": num(self.snr_input_db),
            "samples": self.samples,
        }


def match_pairs(float_model: ir.Model, quant_model: ir.Model) -> list[LayerPair]:
    """The quantized graph's activation Q→DQ pairs matched to a float tensor (see the module doc)."""
    return match_all(float_model, quant_model)[0]


def match_all(float_model: ir.Model, quant_model: ir.Model) -> tuple[list[LayerPair], list[tuple[str, str]]]:
    """The matched activation Q→DQ pairs, and the unmatched ones as (tensor, reason)."""
    float_values = {v.name: v for n in float_model.graph for v in n.outputs}
    float_values.update({v.name: v for v in float_model.graph.inputs})
    quant_names = {v.name for n in quant_model.graph for v in n.outputs} | {v.name for v in quant_model.graph.inputs}
    rescaled = recorded_rescaling(quant_model)
    rotated = set(json.loads(quant_model.metadata_props.get("onnxq.rotated", "[]")))
    pairs: dict[str, LayerPair] = {}
    unmatched: dict[str, str] = {}
    for q in quant_model.graph:
        if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx"):
            continue
        x = q.inputs[0]
        if x is None or x.const_value is not None:
            continue  # a weight
        source, multiplier, reason = _float_source(x, float_values, rescaled)
        if x.name in rotated:
            source, reason = None, "rotated by --rotate: the float model has this tensor in another basis"
        for dq in (u for u, _ in q.outputs[0].uses() if u.op_type == "DequantizeLinear"):
            if source is None:
                unmatched.setdefault(x.name, reason)
                continue
            ref, folded, clip = source, None, None
            users = [u for u, _ in float_values[source].uses()]
            if len(users) == 1 and users[0].op_type in _FOLDABLE and users[0].outputs[0].name not in quant_names:
                # ReLU/Clip folded into the quantization
                ref, folded, clip = users[0].outputs[0].name, users[0].op_type, _clip_bounds(users[0])
            consumers = sorted({u.name or u.op_type for u, _ in dq.outputs[0].uses()})
            pairs.setdefault(dq.outputs[0].name, LayerPair(x.name, ref, dq.outputs[0].name, consumers, folded, clip, source, multiplier))
    return list(pairs.values()), sorted(unmatched.items())


def recorded_rescaling(model: ir.Model) -> dict[str, np.ndarray]:
    """{tensor: multiplier, broadcastable against it}: the channels the quantizer rescaled in
    place, from the model's ``onnxq.rescaled`` metadata (empty without it)."""
    text = model.metadata_props.get("onnxq.rescaled")
    if not text:
        return {}
    out = {}
    for tensor, entry in json.loads(text).items():
        m = np.frombuffer(base64.b64decode(entry["multiplier_f32"]), dtype="<f4").astype(np.float64)
        out[tensor] = m.reshape((-1,) + (1,) * (-1 - entry["axis"]))
    return out


def _float_source(x: ir.Value, float_values: Mapping[str, ir.Value], rescaled: Mapping[str, np.ndarray]):
    """(float tensor, multiplier or None, None) for the quantized graph's tensor ``x``, looking
    through Casts and constant Muls the float graph does not have; (None, None, reason) when
    there is no float counterpart."""
    multiplier, value = None, x
    for _ in range(8):
        if value.name in float_values:
            m = rescaled.get(value.name)
            multiplier = m if multiplier is None else (multiplier if m is None else multiplier * m)
            return value.name, multiplier, None
        producer = value.producer()
        if producer is None:
            return None, None, f"{value.name!r} is an input the float model does not have"
        inputs = [v for v in producer.inputs if v is not None]
        constants = [v for v in inputs if v.const_value is not None]
        if producer.op_type == "Cast" and inputs:
            value = inputs[0]
        elif producer.op_type == "Mul" and len(inputs) == 2 and len(constants) == 1:
            c = constants[0].const_value.numpy().astype(np.float64)
            multiplier = c if multiplier is None else multiplier * c
            value = inputs[0] if inputs[1] is constants[0] else inputs[1]
        else:
            return None, None, f"made by {producer.op_type} {producer.name!r}, which the float model does not have"
    return None, None, "more than 8 inserted Cast/Mul nodes before the quantizer"


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """A Clip's constant (min, max), from its inputs (opset ≥ 11) or attributes; None otherwise."""
    if node.op_type != "Clip":
        return None
    bounds = [-math.inf, math.inf]
    for i in (1, 2):
        if len(node.inputs) > i and node.inputs[i] is not None:
            const = node.inputs[i].const_value
            if const is None:
                return None
            bounds[i - 1] = float(const.numpy())
    for i, key in enumerate(("min", "max")):
        if key in node.attributes:
            bounds[i] = node.attributes[key].as_float()
    return bounds[0], bounds[1]


def _expose(model: ir.Model, names: Iterable[str]):
    """A session computing ``names`` (as extra graph outputs) besides the model's own outputs."""
    values = {v.name: v for n in model.graph for v in n.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    existing = {v.name for v in model.graph.outputs}
    for name in dict.fromkeys(names):
        if name not in existing and name in values and values[name] not in model.graph.inputs:
            model.graph.outputs.append(values[name])
    return ort_rt.create_session(model)


def _fetch(session, feed: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """``names`` after one run; graph inputs come from the feed itself."""
    computed = [n for n in names if n not in feed]
    out = dict(zip(computed, ort_rt.run(session, feed, computed)))
    out.update({n: np.asarray(feed[n]) for n in names if n in feed})
    return out


def layer_snr(
    reference: str | os.PathLike | ir.Model,
    candidate: str | os.PathLike | ir.Model,
    data: Iterable[Mapping[str, np.ndarray]],
    *,
    progress: bool = True,
) -> list[LayerStat]:
    """Per quantized activation, the SNR of the candidate against the float model (see module doc)."""
    float_model = reference if isinstance(reference, ir.Model) else modelio.load(reference)
    quant_model = candidate if isinstance(candidate, ir.Model) else modelio.load(candidate)
    pairs, unmatched = match_all(float_model, quant_model)
    if not pairs:
        return LayerComparison([], unmatched)
    float_names = list(dict.fromkeys([p.float_tensor for p in pairs] + [p.float_ref for p in pairs]))
    quant_names = list(dict.fromkeys([p.tensor for p in pairs] + [p.dq_output for p in pairs]))
    float_session = _expose(float_model, float_names)
    del float_model
    quant_session = _expose(quant_model, quant_names)
    del quant_model
    stats = [LayerStat(p) for p in pairs]
    total = len(data) if hasattr(data, "__len__") and len(data) else None
    with progress_bar(total, "layers", enabled=progress) as bar:
        for feed in data:
            f = _fetch(float_session, feed, float_names)
            q = _fetch(quant_session, feed, quant_names)
            for s in stats:
                p = s.pair
                s.update(p.rescaled(f[p.float_tensor]), p.rescaled(f[p.float_ref]), q[p.tensor], q[p.dq_output])
            del f, q
            bar.update(1)
    stats.sort(key=lambda s: (s.snr_local_db, s.snr_dq_db))
    return LayerComparison(stats, unmatched)


def format_layers(layers: LayerComparison, top: int | None = 10) -> str:
    rows = layers.stats[:top] if top else layers.stats
    lines = [f"  {layers.summary()}", f"  {'local dB':>9} {'at DQ dB':>9} {'Q in dB':>9}  tensor → consumers"]
    for s in rows:
        lines.append(f"  {s.snr_local_db:>9.2f} {s.snr_dq_db:>9.2f} {s.snr_input_db:>9.2f}  {s.pair.tensor} → {', '.join(s.pair.consumers)}")
    lines += [f"  unmatched: {tensor} ({reason})" for tensor, reason in layers.unmatched]
    return "\n".join(lines)
