"""Per-layer sensitivity sweep: the error of quantizing one layer alone, for each candidate precision.

A layer is a group of plan nodes that must share a precision (:mod:`onnxq.layer_groups`). Two modes:

- ``local``: one ORT pass over the data measures every layer. The float model is augmented with
  a quantized *twin* of each linear node per precision: a copy of the node that reads the very
  float tensors the original reads, through Q/DQ (activation scales from the calibration table,
  weights per channel), inserted by :class:`~onnxq.passes.qdq.InsertQDQPass` from a plan that
  quantizes the twins only (one Q/DQ pair per tensor and precision), so a twin is what the real
  pass would build. ``ReduceSumSquare`` of (twin − original)
  and of the original are graph outputs: two scalars per layer per sample come back, summed in
  float64, so memory does not grow with the data. SNR = 10·log10(Σref²/Σ(twin−ref)²) and
  MSE = Σ(twin−ref)²/elements per layer. The twin sees the float model's input, so the error is
  the layer's own, not accumulated from quantized layers before it.
- ``e2e``: for each layer and precision, a model with only that layer quantized; the error of
  the model's output against FP32 (cosine, SNR) and, with ``zoo``, the zoo task metric. One model
  and one evaluation per layer per precision: the expensive baseline the local mode stands in for.

When both run, the Spearman rank correlation between the two modes' SNRs says how well the local
ranking predicts the end-to-end one.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import modelio
from onnxq.calibration import DataArg, MethodArg, activation_tensors, fill_activation_params, resolve_methods, tensor_methods
from onnxq.data import open_source
from onnxq.errors import OnnxqError
from onnxq.layer_groups import Layer, layer_groups
from onnxq.metrics import OutputAccuracy, snr_db, spearman
from onnxq.ops import LINEAR_OPS, MATMUL_OPS, static_macs
from onnxq.placement import TARGETS, place
from onnxq.plan import FLOAT, QUANTIZED_PRECISIONS, WEIGHT_DTYPE, ActivationQuant, NodeDecision, QuantPlan, WeightQuant
from onnxq.progress import log, progress_bar
from onnxq.runtime import ort as ort_rt
from onnxq.smoothquant import split_fractions
from onnxq.weights import weight_source

SWEEP_FORMAT = "onnxq.sweep/1"
MODES = ("local", "e2e", "both")


class SweepError(OnnxqError):
    """A sweep request or a sweep file is unusable."""


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


# --------------------------------------------------------------------------------------------
# Plans per precision


def uniform_plan(base: QuantPlan, precision: str) -> QuantPlan:
    """``base`` with every quantized node at ``precision`` (ranges not filled)."""
    nodes = {
        name: NodeDecision(d.op_type, precision if d.quantized else d.precision, dict(d.inputs), d.reason)
        for name, d in base.nodes.items()
    }
    weights = {name: WeightQuant(WEIGHT_DTYPE[precision], w.axis) for name, w in base.weights.items()}
    return QuantPlan(target=base.target, precision=precision, nodes=nodes, weights=weights, outputs=list(base.outputs))


@dataclass
class Ranges:
    """Activation quantization parameters per precision and tensor, from one calibration pass."""

    params: dict[str, dict[str, ActivationQuant]]
    num_samples: int
    seconds: float


def calibrate_ranges(
    model: ir.Model,
    base: QuantPlan,
    data: Iterable[Mapping[str, np.ndarray]],
    precisions: Sequence[str],
    *,
    method: MethodArg = None,
    percentile: float | None = None,
    quiet: bool = False,
) -> Ranges:
    """One streaming pass over ``data``; scales for every tensor ``base`` quantizes, per precision."""
    from onnxq.calibrators import collect
    from onnxq.calibrators.methods import HISTOGRAM_METHODS

    t0 = time.perf_counter()
    tensors = activation_tensors(model, base)
    methods = tensor_methods(model, base, tensors, resolve_methods(method, base.target))
    needs_hist = {t for t, m in methods.items() if m in HISTOGRAM_METHODS}
    table = collect(model, tensors, data, progress=not quiet, histograms=needs_hist)
    plan = uniform_plan(base, precisions[0])
    fill_activation_params(plan, table, methods, percentile, precisions=dict.fromkeys(table.tensors, tuple(precisions)))
    params = {p: {t: plan.activation(t, p) for t in table.tensors} for p in precisions}
    return Ranges(params, table.num_samples, time.perf_counter() - t0)


def _conv_output_owner(model: ir.Model, tensor: str) -> str | None:
    """The Conv whose (Relu/Clip'd) output ``tensor`` is: plan.outputs entries belong to it."""
    for node in model.graph:
        if any(o.name == tensor for o in node.outputs):
            if node.op_type in ("Relu", "Clip") and node.inputs[0] is not None and node.inputs[0].producer() is not None:
                return node.inputs[0].producer().name
            return node.name
    return None


def assemble_plan(model: ir.Model, base: QuantPlan, assignment: Mapping[str, str], ranges: Ranges, reasons: Mapping[str, str] | None = None) -> QuantPlan:
    """The plan with each node of ``assignment`` at its precision and every other node in float.

    Float nodes keep their ``inputs``, so setting one back to a quantized precision in the JSON
    and replaying it (which calibrates again) is all a user needs to do.
    """
    counts: dict[str, int] = {}
    for p in assignment.values():
        if p != FLOAT:
            counts[p] = counts.get(p, 0) + 1
    default = max(counts, key=counts.__getitem__) if counts else base.precision
    plan = QuantPlan(target=base.target, precision=default)
    by_name = {n.name: n for n in model.graph}
    for name, d in base.nodes.items():
        p = assignment.get(name, FLOAT) if d.quantized else d.precision
        plan.nodes[name] = NodeDecision(d.op_type, p, dict(d.inputs), (reasons or {}).get(name, d.reason))
        if not d.quantized:
            continue
        node = by_name[name]
        for index, kind in d.inputs.items():
            value = node.inputs[index]
            if kind == "activation" and p != FLOAT:
                plan.set_activation(value.name, p, ActivationQuant(**vars(ranges.params[p][value.name])))
            elif kind == "weight":
                source = weight_source(value)
                init = source.initializer.name if source else value.name
                axis = base.weights[init].axis if init in base.weights else None
                plan.weights[init] = WeightQuant(WEIGHT_DTYPE[default], axis)  # the reader's precision picks the dtype
    for tensor in base.outputs:
        owner = _conv_output_owner(model, tensor)
        if owner and assignment.get(owner, FLOAT) != FLOAT:
            plan.outputs.append(tensor)
            plan.set_activation(tensor, default, ActivationQuant(**vars(ranges.params[default][tensor])))
    return plan


def check_smoothing(smoothquant: float | str | None, split_outliers: int | None) -> tuple[float | str | None, int]:
    """SmoothQuant options of the sweep and the solver, validated as ``onnxq quantize`` does."""
    from onnxq.smoothquant import check_alpha, check_split

    split_outliers = check_split(split_outliers)
    if smoothquant is None:
        if split_outliers:
            raise SweepError("--split-outliers is part of SmoothQuant's per-channel treatment: pass --smoothquant ALPHA|auto with it")
        return None, 0
    return check_alpha(smoothquant), split_outliers


def apply_smoothing(model: ir.Model, base: QuantPlan, data, smoothquant, split_outliers: int, timings: dict, quiet: bool):
    """SmoothQuant folded into the float ``model`` for ``base`` (every quantizable layer), or None."""
    if smoothquant is None:
        return None
    from onnxq.smoothquant import smooth_float

    t = time.perf_counter()
    smooth_plan = smooth_float(model, base, data, smoothquant, split_outliers=split_outliers, quiet=quiet)
    timings["smoothquant"] = time.perf_counter() - t
    summary = smooth_plan.summary()
    log(f"onnxq: SmoothQuant ({smoothquant}) folded in: {summary['smoothed']} of {summary['groups']} groups, {summary['split_channels']} channels split off", quiet)
    return smooth_plan


def prepare_opset(model: ir.Model, precisions: Iterable[str]) -> None:
    """Raise the opset once to what the precisions need (FP8: 19), so that each quantized copy
    made from the model does not convert it again."""
    if "fp8" in precisions:
        from onnxq.passes.lift_constants import LiftConstantsPass
        from onnxq.passes.opset import UpgradeOpsetPass
        from onnxq.passes.qdq import FP8_MIN_OPSET

        if UpgradeOpsetPass(min_opset=FP8_MIN_OPSET)(model).modified:
            LiftConstantsPass()(model)


def qdq_proto(float_proto: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """The float model with ``plan`` applied, as a proto (``float_proto`` is not modified)."""
    from onnxq.passes.qdq import InsertQDQPass

    model = ir.serde.deserialize_model(float_proto)
    InsertQDQPass(plan)(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.TopologicalSortPass()(model)
    return modelio.to_proto(model)


# --------------------------------------------------------------------------------------------
# Local mode: one augmented graph


def _scalar_out(op: str, inputs: list[ir.Value], name: str, dtype=ir.DataType.FLOAT) -> tuple[list[ir.Node], ir.Value]:
    node = ir.node(op, inputs, attributes={"keepdims": 0} if op.startswith("Reduce") else {}, name=name)
    node.outputs[0].name = name
    node.outputs[0].dtype = dtype
    return [node], node.outputs[0]


class _TwinBuilder:
    """Adds quantized twins of linear nodes to a float model, plus their error reductions."""

    def __init__(self, model: ir.Model, base: QuantPlan, ranges: Ranges):
        self.model = model
        self.graph = model.graph
        self.base = base
        self.ranges = ranges
        self.twin_plan = QuantPlan(target=base.target, precision=base.precision)
        self.outputs: list[ir.Value] = []

    def add_layer(self, layer: Layer, precisions: Sequence[str]) -> dict:
        """Twins of the layer's linear nodes; returns the output names of its reductions."""
        by_name = {n.name: n for n in self.graph}
        names: dict = {"signal": [], "size": [], "noise": {p: [] for p in precisions}, "shapes": {}}
        for node_name in layer.nodes:
            node = by_name[node_name]
            if node.op_type not in LINEAR_OPS:
                continue  # companions (Pad, residual Add) move the linear node's quantizers
            decision = self.base.nodes[node_name]
            inputs = dict(decision.inputs)
            scale_from = {i: node.inputs[i].name for i in inputs}
            if 0 not in inputs:  # activation Q/DQ placed before a companion Pad: same range + zeros
                pad = node.inputs[0].producer()
                if pad is not None and pad.name in layer.nodes:
                    inputs[0] = "activation"
                    scale_from[0] = pad.inputs[0].name
            ref = node.outputs[0]
            tail: list[ir.Node] = []
            for p in precisions:
                for index, kind in inputs.items():
                    if kind == "activation":
                        self.twin_plan.set_activation(node.inputs[index].name, p, ActivationQuant(**vars(self.ranges.params[p][scale_from[index]])))
                    else:
                        source = weight_source(node.inputs[index])
                        init = source.initializer.name
                        self.twin_plan.weights[init] = WeightQuant(WEIGHT_DTYPE[p], self.base.weights[init].axis if init in self.base.weights else None)
                twin = ir.Node(node.domain, node.op_type, list(node.inputs), attributes=list(node.attributes.values()), name=f"{node_name}/twin_{p}")
                twin.outputs[0].name = f"{ref.name}/twin_{p}"
                twin.outputs[0].dtype, twin.outputs[0].shape = ref.dtype, ref.shape
                self.twin_plan.nodes[twin.name] = NodeDecision(node.op_type, p, inputs, f"sweep twin of {node_name}")
                diff = ir.node("Sub", [twin.outputs[0], ref], name=f"{node_name}/diff_{p}")
                diff.outputs[0].name = f"{node_name}/diff_{p}"
                nodes, noise = _scalar_out("ReduceSumSquare", [diff.outputs[0]], f"{node_name}/noise_{p}")
                tail += [twin, diff, *nodes]
                names["noise"][p].append(noise.name)
                self.outputs.append(noise)
            nodes, signal = _scalar_out("ReduceSumSquare", [ref], f"{node_name}/signal")
            tail += nodes
            size_nodes, size = _scalar_out("Size", [ref], f"{node_name}/size", ir.DataType.INT64)
            tail += size_nodes
            names["signal"].append(signal.name)
            names["size"].append(size.name)
            self.outputs += [signal, size]
            shape_names = []
            for v in (node.inputs[0], node.inputs[1], ref):
                s = ir.node("Shape", [v], name=f"{node_name}/shape_{len(shape_names)}")
                s.outputs[0].name = f"{node_name}/shape_{len(shape_names)}"
                s.outputs[0].dtype = ir.DataType.INT64
                tail.append(s)
                shape_names.append(s.outputs[0].name)
                self.outputs.append(s.outputs[0])
            names["shapes"][node_name] = shape_names
            self.graph.insert_after(node, tail)
        return names

    def finish(self) -> onnx.ModelProto:
        from onnxq.passes.qdq import InsertQDQPass

        for v in self.outputs:
            self.graph.outputs.append(v)
        InsertQDQPass(self.twin_plan)(self.model)
        ir.passes.common.RemoveUnusedNodesPass()(self.model)
        ir.passes.common.TopologicalSortPass()(self.model)
        return modelio.to_proto(self.model)


def local_sweep(
    model: ir.Model,
    base: QuantPlan,
    layers: Sequence[Layer],
    ranges: Ranges,
    data: Iterable[Mapping[str, np.ndarray]],
    precisions: Sequence[str],
    *,
    quiet: bool = False,
) -> tuple[dict[str, dict[str, dict]], float, int]:
    """{layer: {precision: {snr_db, mse, noise, signal}}}, the seconds of the pass, samples.

    ``model`` is modified (twins are added): pass a copy you do not need any more.
    """
    builder = _TwinBuilder(model, base, ranges)
    outputs = {layer.name: builder.add_layer(layer, precisions) for layer in layers}
    proto = builder.finish()
    names = [v.name for v in builder.outputs]
    del model, builder
    session = ort_rt.create_session(proto)
    del proto
    fetch = [n for n in names if not n.split("/")[-1].startswith("shape_")]
    shape_fetch = [n for n in names if n.split("/")[-1].startswith("shape_")]
    sums = dict.fromkeys(fetch, 0.0)
    shapes: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    samples = 0
    total = len(data) if hasattr(data, "__len__") else None
    with progress_bar(total, "local sweep", enabled=not quiet) as bar:
        for feed in data:
            wanted = fetch + (shape_fetch if samples == 0 else [])
            values = ort_rt.run(session, feed, wanted)
            for n, v in zip(wanted, values):
                if n in sums:
                    sums[n] += float(np.asarray(v, dtype=np.float64))
                else:
                    shapes[n] = [int(d) for d in np.asarray(v).reshape(-1)]
            samples += 1
            bar.update(1)
    seconds = time.perf_counter() - t0
    if samples == 0:
        raise SweepError("the sweep data has no samples; pass --eval DATA with at least one sample")
    results: dict[str, dict[str, dict]] = {}
    for layer in layers:
        o = outputs[layer.name]
        signal = sum(sums[n] for n in o["signal"])
        size = sum(sums[n] for n in o["size"])
        results[layer.name] = {}
        for p in precisions:
            noise = sum(sums[n] for n in o["noise"][p])
            results[layer.name][p] = {"snr_db": snr_db(signal, noise), "mse": noise / size if size else 0.0, "noise": noise, "signal": signal}
        layer.extra["shapes"] = {node: [shapes.get(n) for n in s] for node, s in o["shapes"].items()}
    return results, seconds, samples


def read_json(path: Path, what: str, error: type[OnnxqError], hint: str):
    """The JSON in ``path``; ``error`` saying what to do when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file; {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); {hint}") from None




def fill_costs(model: ir.Model, base: QuantPlan, layers: Sequence[Layer], feed: Mapping[str, np.ndarray] | None = None, split: Mapping[str, float] | None = None) -> None:
    """MACs and element counts per layer for one sample, from the shapes the model runs with.

    Uses the shapes a local sweep recorded; otherwise runs ``feed`` once through a copy of the
    model with Shape outputs. ``split``: {node: share of its input channels in a float side
    product} (SmoothQuant's split outliers), whose MACs are the layer's ``split_macs``.
    """
    by_name = {n.name: n for n in model.graph}
    if any("shapes" not in layer.extra for layer in layers) and feed is not None:
        _record_shapes(model, layers, feed)
    for layer in layers:
        recorded = layer.extra.get("shapes", {})
        layer.macs = layer.matmul_macs = layer.split_macs = layer.weight_elements = layer.activation_elements = layer.output_elements = 0
        for name in layer.nodes:
            node = by_name[name]
            if node.op_type not in LINEAR_OPS:
                continue
            sa, sb, so = recorded.get(name, [None, None, None])
            shapes = {v.name: s for v, s in zip((node.inputs[0], node.inputs[1], node.outputs[0]), (sa, sb, so)) if s is not None}
            macs = static_macs(node, shapes)
            layer.macs += macs
            if node.op_type in MATMUL_OPS:
                layer.matmul_macs += macs
                layer.split_macs += round(macs * (split or {}).get(name, 0.0))
            for index, kind in base.nodes[name].inputs.items():
                value = node.inputs[index]
                shape = shapes.get(value.name) or ([d for d in value.shape] if value.shape is not None and all(isinstance(d, int) for d in value.shape) else None)
                count = int(np.prod(shape)) if shape else 0
                if kind == "weight":
                    layer.weight_elements += count
                else:
                    layer.activation_elements += count
            if 0 not in base.nodes[name].inputs and sa:  # quantized before a companion Pad
                layer.activation_elements += int(np.prod(sa))
            if so:
                layer.output_elements += int(np.prod(so))


def _record_shapes(model: ir.Model, layers: Sequence[Layer], feed: Mapping[str, np.ndarray]) -> None:
    proto = modelio.to_proto(model)
    by_name = {n.name: n for n in model.graph}
    wanted: dict[str, list[str]] = {}
    extra_nodes, extra_outputs = [], []
    for layer in layers:
        for name in layer.nodes:
            node = by_name[name]
            if node.op_type not in LINEAR_OPS:
                continue
            names = []
            for i, v in enumerate((node.inputs[0], node.inputs[1], node.outputs[0])):
                out = f"{name}/shape_{i}"
                extra_nodes.append(onnx.helper.make_node("Shape", [v.name], [out], name=out))
                extra_outputs.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.INT64, None))
                names.append(out)
            wanted[name] = names
    proto.graph.node.extend(extra_nodes)
    proto.graph.output.extend(extra_outputs)
    session = ort_rt.create_session(proto)
    flat = [n for names in wanted.values() for n in names]
    values = dict(zip(flat, ort_rt.run(session, feed, flat)))
    for layer in layers:
        layer.extra["shapes"] = {
            name: [[int(d) for d in values[n]] for n in wanted[name]] for name in layer.nodes if name in wanted
        }


# --------------------------------------------------------------------------------------------
# End-to-end mode


class Evaluator:
    """Accuracy of candidate plans on held-out data: output cosine/SNR vs the float model (its
    outputs computed once and kept), and the zoo task metric when a zoo model is named (one
    float reference session kept for it). ``outputs=False`` skips the output comparison when
    only the task metric is wanted."""

    def __init__(self, float_proto: onnx.ModelProto, model_path: str | os.PathLike, data, zoo: str | None = None, quiet: bool = False, outputs: bool = True):
        self.float_proto = float_proto
        self.feeds = list(data) if outputs else []
        if outputs and not self.feeds:
            raise SweepError("the evaluation data has no samples; pass --eval DATA with at least one sample")
        self.reference = ort_rt.create_session(model_path)
        self.output_names = [o.name for o in self.reference.get_outputs()]
        self.references = [ort_rt.run(self.reference, f) for f in self.feeds]
        self.zoo = None
        if zoo is not None:
            from onnxq import zoo as zoo_registry

            self.zoo = zoo_registry.get(zoo)
        self.quiet = quiet
        self.evaluations = 0
        self.seconds = 0.0

    def evaluate(self, plan: QuantPlan) -> dict:
        t0 = time.perf_counter()
        session = ort_rt.create_session(qdq_proto(self.float_proto, plan))
        out: dict = {"cosine": None, "snr_db": None}
        if self.feeds:
            results = [OutputAccuracy(n) for n in self.output_names]
            for feed, refs in zip(self.feeds, self.references):
                for acc, r, c in zip(results, refs, ort_rt.run(session, feed)):
                    acc.update(r, c)
            out = {"cosine": min(r.cosine_mean for r in results), "snr_db": min(r.snr_db for r in results), "outputs": [r.to_json() for r in results]}
        if self.zoo is not None:
            out["metric"] = self.zoo.evaluate(session, self.reference)
        self.evaluations += 1
        self.seconds += time.perf_counter() - t0
        return out


def e2e_sweep(model: ir.Model, base: QuantPlan, layers: Sequence[Layer], ranges: Ranges, evaluator: Evaluator, precisions: Sequence[str], *, quiet: bool = False) -> tuple[dict, float]:
    """{layer: {precision: {cosine, snr_db, [metric]}}} with only that layer quantized."""
    t0 = time.perf_counter()
    results: dict[str, dict[str, dict]] = {}
    with progress_bar(len(layers) * len(precisions), "e2e sweep", unit="model", enabled=not quiet) as bar:
        for layer in layers:
            results[layer.name] = {}
            for p in precisions:
                plan = assemble_plan(model, base, {n: p for n in layer.nodes}, ranges)
                r = evaluator.evaluate(plan)
                r.pop("outputs", None)
                results[layer.name][p] = r
                bar.update(1)
    return results, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# The result


@dataclass
class SweepResult:
    model_sha256: str
    target: str
    precisions: list[str]
    mode: str
    layers: list[Layer]
    local: dict = field(default_factory=dict)
    e2e: dict = field(default_factory=dict)
    spearman: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    zoo: str | None = None
    samples: dict = field(default_factory=dict)
    smoothquant: float | str | None = None
    split_outliers: int = 0
    method: str | dict | None = None  # the range method asked for (None: the target's default)

    def sensitivity(self, layer: str, precision: str) -> float:
        """Noise-to-signal ratio of quantizing ``layer`` alone at ``precision``: end to end when
        measured, else at the layer's output. Higher is more sensitive."""
        source = self.e2e if self.e2e else self.local
        snr = source[layer][precision]["snr_db"]
        return 10 ** (-snr / 10) if math.isfinite(snr) else (0.0 if snr > 0 else math.inf)

    def to_json(self) -> dict:
        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        return clean({
            "format": SWEEP_FORMAT,
            "model_sha256": self.model_sha256,
            "target": self.target,
            "precisions": self.precisions,
            "mode": self.mode,
            "zoo": self.zoo,
            "samples": self.samples,
            "smoothquant": self.smoothquant,
            "split_outliers": self.split_outliers,
            "calibration_method": self.method,
            "layers": [layer.to_json() for layer in self.layers],
            "local": self.local,
            "e2e": self.e2e,
            "spearman": self.spearman,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        })

    @classmethod
    def load(cls, path: str | os.PathLike) -> SweepResult:
        path = Path(path)
        data = read_json(path, "sweep", SweepError, "write one with onnxq sweep")

        def unclean(x):
            if isinstance(x, str) and x in ("inf", "-inf", "nan"):
                return float(x)
            if isinstance(x, dict):
                return {k: unclean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [unclean(v) for v in x]
            return x

        if not isinstance(data, dict) or data.get("format") != SWEEP_FORMAT:
            raise SweepError(f"{path} is not an onnxq sweep (expected \"format\": \"{SWEEP_FORMAT}\"); write one with onnxq sweep")
        try:
            data = unclean(data)
            return cls(
                model_sha256=data["model_sha256"], target=data["target"], precisions=list(data["precisions"]),
                mode=data["mode"], layers=[Layer.from_json(d) for d in data["layers"]], local=data.get("local", {}),
                e2e=data.get("e2e", {}), spearman=data.get("spearman", {}), timings=data.get("timings_s", {}),
                zoo=data.get("zoo"), samples=data.get("samples", {}),
                smoothquant=data.get("smoothquant"), split_outliers=int(data.get("split_outliers") or 0),
                method=data.get("calibration_method"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SweepError(f"{path} is malformed ({type(exc).__name__}: {exc}); write it again with onnxq sweep") from None

    def to_markdown(self) -> str:
        cols = []
        for p in self.precisions:
            if self.local:
                cols += [(f"local SNR dB ({p})", "local", p, "snr_db")]
            if self.e2e:
                cols += [(f"e2e cosine ({p})", "e2e", p, "cosine"), (f"e2e SNR dB ({p})", "e2e", p, "snr_db")]
        head = "| layer | nodes | MMACs | " + " | ".join(c[0] for c in cols) + " |"
        lines = [head, "|" + "---|" * (3 + len(cols))]
        for layer in sorted(self.layers, key=lambda la: -max(self.sensitivity(la.name, p) for p in self.precisions)):
            cells = []
            for _, src, p, key in cols:
                v = getattr(self, src)[layer.name][p][key]
                cells.append(f"{v:.4f}" if key == "cosine" else f"{v:.2f}")
            lines.append(f"| {layer.name} | {len(layer.nodes)} | {layer.macs / 1e6:.2f} | " + " | ".join(cells) + " |")
        if self.spearman:
            lines.append("")
            lines.append("Spearman rank correlation, local vs e2e SNR: " + ", ".join(f"{k}: {v:.3f}" if v is not None else f"{k}: n/a" for k, v in self.spearman.items()))
        return "\n".join(lines) + "\n"


def sweep(
    model: str | os.PathLike,
    calib: DataArg,
    output: str | os.PathLike | None = None,
    *,
    eval: DataArg | None = None,
    mode: str = "local",
    precisions: str | Sequence[str] = QUANTIZED_PRECISIONS,
    target: str = "tensorrt",
    zoo: str | None = None,
    calib_samples: int | None = None,
    eval_samples: int | None = None,
    method: MethodArg = None,
    percentile: float | None = None,
    layers_only: Sequence[str] | None = None,
    smoothquant: float | str | None = None,
    split_outliers: int = 0,
    plot: bool = True,
    quiet: bool = False,
) -> SweepResult:
    """Measure every layer's sensitivity to quantization; write JSON, Markdown and a PNG chart.

    ``output``: the JSON path; ``<stem>.md`` and ``<stem>.png`` are written beside it. Ranges come
    from one calibration pass over ``calib``; errors are measured on ``eval`` (default: ``calib``).
    ``layers_only``: measure only these layers (names as in a sweep's table); default: all.
    ``smoothquant``/``split_outliers``: measure the model with SmoothQuant folded in first (as
    :func:`onnxq.quantize` would, decided for all quantizable layers in INT8); the sweep records
    them and the solver repeats them.
    """
    from onnxq.calibrators import model_hash
    from onnxq.passes.preprocess import load_and_preprocess

    if mode not in MODES:
        raise SweepError(f"unknown sweep mode {mode!r}; choose one of {list(MODES)}")
    if target not in TARGETS:
        raise SweepError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    precisions = check_precisions(precisions)
    resolve_methods(method, target)
    smoothquant, split_outliers = check_smoothing(smoothquant, split_outliers)
    if output is not None:
        output = modelio.check_output_path(output, model)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    float_model = load_and_preprocess(model)
    spec = ort_rt.model_input_spec(float_model)
    calib_data = open_source(calib, spec, limit=calib_samples)
    eval_data = open_source(eval if eval is not None else calib, spec, limit=eval_samples if eval is not None else (eval_samples or calib_samples), require_finite=False)
    base = place(float_model, target)
    sha = model_hash(float_model)
    smooth_plan = apply_smoothing(float_model, base, calib_data, smoothquant, split_outliers, timings, quiet)
    layers = layer_groups(float_model, base)
    if not layers:
        raise SweepError(f"the {target} policy quantizes no node of this model: nothing to sweep")
    if layers_arg := list(layers_only or []):
        known = {la.name for la in layers}
        unknown = [n for n in layers_arg if n not in known]
        if unknown:
            raise SweepError(f"no layer named {unknown}; layers are named after their first node, e.g. {[la.name for la in layers[:3]]}")
        layers = [la for la in layers if la.name in layers_arg]
    prepare_opset(float_model, precisions)
    timings["load"] = time.perf_counter() - t0
    ranges = calibrate_ranges(float_model, base, calib_data, precisions, method=method, percentile=percentile, quiet=quiet)
    timings["calibrate"] = ranges.seconds
    result = SweepResult(sha, target, list(precisions), mode, layers, zoo=zoo, samples={"calibration": ranges.num_samples}, smoothquant=smoothquant, split_outliers=split_outliers, method=method)
    float_proto = modelio.to_proto(float_model)
    if mode in ("local", "both"):
        log(f"onnxq: local sweep of {len(layers)} layers x {len(precisions)} precisions in one pass", quiet)
        t = time.perf_counter()
        twin_model = ir.serde.deserialize_model(float_proto)
        timings["local_build"] = 0.0
        result.local, timings["local_pass"], result.samples["local"] = local_sweep(twin_model, base, layers, ranges, eval_data, precisions, quiet=quiet)
        timings["local"] = time.perf_counter() - t
        timings["local_build"] = timings["local"] - timings["local_pass"]
        del twin_model
    fill_costs(float_model, base, layers, next(iter(eval_data)), split_fractions(smooth_plan))
    if mode in ("e2e", "both"):
        log(f"onnxq: end-to-end sweep: {len(layers) * len(precisions)} quantized models", quiet)
        t = time.perf_counter()
        evaluator = Evaluator(float_proto, model, eval_data, zoo=zoo, quiet=quiet)
        result.samples["e2e"] = len(evaluator.feeds)
        result.e2e, _ = e2e_sweep(float_model, base, layers, ranges, evaluator, precisions, quiet=quiet)
        timings["e2e"] = time.perf_counter() - t
    if result.local and result.e2e:
        for p in precisions:
            result.spearman[p] = spearman([result.local[la.name][p]["snr_db"] for la in layers], [result.e2e[la.name][p]["snr_db"] for la in layers])
        if len(precisions) > 1:
            result.spearman["all"] = spearman(
                [result.local[la.name][p]["snr_db"] for la in layers for p in precisions],
                [result.e2e[la.name][p]["snr_db"] for la in layers for p in precisions],
            )
    timings["total"] = time.perf_counter() - t0
    result.timings = timings
    if output is not None:
        write_sweep(result, output, plot=plot, quiet=quiet)
    return result


def write_sweep(result: SweepResult, output: str | os.PathLike, *, plot: bool = True, quiet: bool = False) -> list[Path]:
    output = Path(output)
    stem = output.with_suffix("") if output.suffix == ".json" else output
    written = []
    with modelio.atomic_path(output) as tmp:
        tmp.write_text(json.dumps(result.to_json(), indent=1))
    written.append(output)
    md = stem.with_suffix(".md")
    with modelio.atomic_path(md) as tmp:
        tmp.write_text(result.to_markdown())
    written.append(md)
    if plot:
        from onnxq.plots import sweep_chart

        png = sweep_chart(result, stem.with_suffix(".png"), quiet=quiet)
        if png is not None:
            written.append(png)
    return written
