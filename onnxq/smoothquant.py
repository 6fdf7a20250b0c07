"""SmoothQuant, the decision: smoothing groups, their scales, and where each scale goes.

Per-tensor INT8 of an activation with a few huge channels wastes the grid on those channels.
SmoothQuant rewrites ``Y = X · W`` as ``(X · diag(s)⁻¹) · (diag(s) · W)`` with, per input channel j,
``s_j = max|X_j|^α / max|W_j|^(1−α)``: the activation's outliers move into the weights, which
are quantized per output channel and absorb them.

This module only decides (``plan.smoothquant``, a :class:`~onnxq.plan.SmoothPlan`);
:class:`onnxq.passes.smoothquant.SmoothQuantPass` executes it (the ``fold`` stage of
:mod:`onnxq.emit`).

- **Group**: every MatMul (constant ``[K, N]`` weight), Gemm (``transA=0``, constant B) and 1×1
  Conv (``group=1``) that reads the same activation as its first input, at least one of them
  quantized by the QuantPlan. One ``s`` per group; ``max|W_j|`` is over all of its members.
- **Where diag(s)⁻¹ goes** (:func:`find_absorber`): walking back from the activation over ops
  that are linear per channel, into the first one with a constant to scale: a LayerNormalization
  (scale and bias); the per-channel weight ``Mul`` that ends a decomposed RMSNorm/LayerNorm (plus
  the bias ``Add`` after it); the output channels of a MatMul/Gemm/Conv (and the bias Add
  after it); through ``Relu`` (positive scales commute with it); through a product of two
  activations into one branch (SwiGLU: ``Mul(SiLU(gate), up)`` takes it in ``up``'s output
  channels). Every tensor on that walk must feed nothing else, be no graph output and carry no
  quantization of its own; and the activation must feed only the group. Otherwise one ``Mul`` by
  ``1/s`` is inserted in front of the group and reported.

  The walk matches the one op at the tail of a norm that carries a per-channel constant rather
  than whole norm patterns: what is scaled is the same for every exporter's spelling. Whether
  that op is a norm's weight (the report's ``norm`` kind) comes from the declared pattern of
  :mod:`onnxq.patterns`.
- **α**: fixed, or ``"auto"``: per group, from :data:`ALPHA_GRID`, the α whose simulated W8A8
  product (per-tensor activation on the target's grid after smoothing, per-channel INT8 weights;
  both on the E4M3FN grid for an FP8 plan)
  is closest to the float product on calibration rows sampled during the calibration pass
  (:class:`onnxq.calibrators.reservoir.RowReservoir`); a group where no α beats not smoothing is
  left as it is.
- **Outlier channels split off** (``split_outliers=N``, LLM.int8()'s decomposition, for groups of
  MatMul/Gemm consumers): a few input channels whose smoothed range still dwarfs the rest leave
  the quantized product. The group's activation is read through one inserted ``Mul`` by
  ``mask/s`` (0 on the split channels), each consumer's weight rows of those channels become 0,
  and a float side product ``Gather(X, channels) · W[channels]`` is added to each consumer's
  output: ``Y = (X·diag(m/s))·(diag(s)·W) + X[:, c]·W[c, :]``, exact in float. How many: per
  group, from 0, 1, 2, 4, … up to N, the fewest channels whose simulated error (searched jointly
  with α) is within :data:`SPLIT_TOLERANCE` of the best count's; a split must earn its float
  MACs (k/K of the group's).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq import ops
from onnxq.grids import GRIDS, fake_quant_range, fake_quant_weight
from onnxq.patterns import NormStatistic, norm_statistics, normalized_by
from onnxq.plan import FP8_DTYPE, WEIGHT_ONLY_PRECISIONS, Fold, QuantPlan, SmoothGroup, SmoothPlan
from onnxq.weights import FLOAT_TYPES, weight_source

ALPHA_GRID = tuple(round(float(a), 2) for a in np.arange(0.3, 0.91, 0.05))
SCALE_RANGE = (1e-5, 1e5)  # s outside this only comes from degenerate channels
MAX_SIM_COLUMNS = 1024  # output columns the α search simulates per group (sampled when more)
SPLIT_TOLERANCE = 1.25  # fewest split channels whose simulated error is within this of the best count's


# --- groups ---------------------------------------------------------------------------------


def _member(node: ir.Node, value: ir.Value) -> tuple[int, int] | None:
    """(channel axis of ``value`` as read by ``node``, rank) if ``node`` can take diag(s)."""
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2 or node.inputs[0] is not value:
        return None
    if any(inp is value for inp in node.inputs[1:]):
        return None
    w = weight_source(node.inputs[1])
    if w is None or w.initializer.is_graph_input() or node.inputs[1].shape is None:
        return None
    rank = len(value.shape) if value.shape is not None else None
    wrank = len(node.inputs[1].shape)
    if rank is None:
        return None
    smoothable = (
        (node.op_type == "MatMul" and wrank == 2 and rank >= 2)
        or (node.op_type == "Gemm" and not node.attributes.get_int("transA", 0) and rank == 2)
        or (node.op_type == "Conv" and node.attributes.get_int("group", 1) == 1 and wrank >= 3 and rank == wrank
            and all(d == 1 for d in list(node.inputs[1].shape)[2:]))
    )
    return (ops.activation_channel_axis(node.op_type, 0, node.attributes) % rank, rank) if smoothable else None


def find_groups(model: ir.Model, plan: QuantPlan) -> list[SmoothGroup]:
    """Every activation read by smoothable consumers, at least one of them quantized."""
    # weight-only nodes (AWQ) count: their weights take the scales
    quantized = {name for name, d in plan.nodes.items() if d.quantized and (d.inputs.get(0) == "activation" or d.precision in WEIGHT_ONLY_PRECISIONS)}
    values = list(model.graph.inputs) + [out for node in model.graph for out in node.outputs]
    groups = []
    for value in values:
        if value.dtype not in FLOAT_TYPES or value.const_value is not None:
            continue
        members: dict[str, tuple[int, int]] = {}
        for use in value.uses():
            spec = _member(use.node, value)
            if spec is not None:
                members[use.node.name] = spec
        if not members or not quantized & set(members) or len(set(members.values())) != 1:
            continue
        axis, rank = next(iter(members.values()))
        groups.append(SmoothGroup(value.name, list(members), axis, rank))
    return groups


# --- where diag(s)⁻¹ goes ---------------------------------------------------------------------


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input() or value.dtype not in FLOAT_TYPES:
        return None
    return value.const_value.numpy()


def _per_channel(c: np.ndarray, rank: int, trailing: int) -> bool:
    """``c`` (broadcast against the activation) varies at most along the channel axis."""
    if c.ndim > rank:
        return False
    return all(d == 1 for i, d in enumerate(reversed(c.shape)) if i != trailing)


def _private(value: ir.Value, protected: set[str]) -> bool:
    """An intermediate tensor the fold may change: one reader, no graph output, not quantized."""
    return len(value.uses()) == 1 and not value.is_graph_output() and value.name not in protected


def find_absorber(value: ir.Value, rank: int, trailing: int, protected: set[str], norms: list[NormStatistic] = ()) -> tuple[dict, list[Fold]] | None:
    """Where ``value``'s channels can be divided by s exactly: (description, folds), or None.
    ``norms``: the model's norm statistics (a per-channel Mul after one is a norm's weight)."""
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or value.is_graph_output():
        return None
    op = node.op_type
    if any(out is not value and out.uses() for out in node.outputs):
        return None
    here = {"node": node.name, "op": op}
    if op == "LayerNormalization":
        axis = node.attributes.get_int("axis", -1)
        if trailing != 0 or axis % rank != rank - 1 or _const(node.inputs[1]) is None:
            return None
        folds = [Fold(node.name, 1, 0, "div")]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if _const(node.inputs[2]) is None:
                return None
            folds.append(Fold(node.name, 2, 0, "div"))
        return {"kind": "norm", **here}, folds
    if op in ("MatMul", "Gemm", "Conv"):
        w = weight_source(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.initializer.is_graph_input() or node.inputs[1].shape is None or weight_source(node.inputs[0]) is not None:
            return None
        wrank = len(node.inputs[1].shape)
        if op == "MatMul":
            if trailing != 0 or wrank != 2:
                return None
            folds = [Fold(node.name, 1, wrank - 1 - ops.weight_output_axis(node), "div")]
        elif op == "Gemm":
            if trailing != 0:
                return None
            folds = [Fold(node.name, 1, wrank - 1 - ops.weight_output_axis(node), "div")]
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                c = _const(node.inputs[2])
                if c is None or not _per_channel(c, rank, 0):
                    return None
                folds.append(Fold(node.name, 2, 0, "div"))
        else:
            if trailing != rank - 2:
                return None
            folds = [Fold(node.name, 1, wrank - 1 - ops.weight_output_axis(node), "div")]
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                if _const(node.inputs[2]) is None:
                    return None
                folds.append(Fold(node.name, 2, 0, "div"))
        return {"kind": "linear", **here}, folds
    if op == "Relu":
        src = node.inputs[0]
        if src is None or not _private(src, protected):
            return None
        return find_absorber(src, rank, trailing, protected, norms)
    if op in ("Mul", "Add") and len(node.inputs) == 2:
        a, b = node.inputs
        consts = [_const(a), _const(b)]
        if sum(c is not None for c in consts) == 1:
            ci = 0 if consts[0] is not None else 1
            c, other = consts[ci], node.inputs[1 - ci]
            if not _per_channel(c, rank, trailing) or other is None:
                return None
            if op == "Mul":
                kind = "norm" if normalized_by(other, norms) else "mul"
                return {"kind": kind, **here}, [Fold(node.name, ci, trailing, "div")]
            # a bias: the producer of the other operand takes s too
            if not _private(other, protected):
                return None
            inner = find_absorber(other, rank, trailing, protected, norms)
            if inner is None:
                return None
            return inner[0], [*inner[1], Fold(node.name, ci, trailing, "div")]
        if any(c is not None for c in consts) or a is None or b is None or a is b:
            return None
        if op == "Mul":  # a product of two activations: one branch takes s
            for branch in (b, a):
                if _private(branch, protected):
                    inner = find_absorber(branch, rank, trailing, protected, norms)
                    if inner is not None:
                        return {**inner[0], "through": node.name}, inner[1]
            return None
        # a sum of two activations: both branches take s
        if not (_private(a, protected) and _private(b, protected)):
            return None
        left, right = find_absorber(a, rank, trailing, protected, norms), find_absorber(b, rank, trailing, protected, norms)
        if left is None or right is None:
            return None
        return left[0], [*left[1], *right[1]]
    return None


def weight_fold(node: ir.Node) -> Fold:
    """diag(s) on the consumer's input-channel axis (in the weight as the node reads it)."""
    wrank = len(node.inputs[1].shape)
    return Fold(node.name, 1, wrank - 1 - ops.weight_input_axis(node), "mul")


# --- scales and α -------------------------------------------------------------------------------


def weight_matrix(node: ir.Node) -> np.ndarray:
    """The consumer's weight as ``[C_in, N]`` (reading through a Transpose)."""
    w = weight_source(node.inputs[1])
    array = w.initializer.const_value.numpy().astype(np.float32)
    if w.transpose is not None:
        perm = w.transpose.attributes.get_ints("perm", list(range(array.ndim))[::-1])
        array = np.transpose(array, perm)
    return ops.weight_matrix(node, array)


def scales(x_amax: np.ndarray, w_amax: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)``; 1 where either is zero, clipped to :data:`SCALE_RANGE`."""
    x = np.asarray(x_amax, dtype=np.float64)
    w = np.asarray(w_amax, dtype=np.float64)
    ok = (x > 0) & (w > 0) & np.isfinite(x) & np.isfinite(w)
    s = np.ones_like(x)
    s[ok] = x[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, *SCALE_RANGE).astype(np.float32)


def simulated_error(
    rows: np.ndarray, weight: np.ndarray, s: np.ndarray | None, lo: np.ndarray, hi: np.ndarray, dtype: str,
    reference: np.ndarray | None = None, split: np.ndarray | None = None,
) -> float:
    """Relative squared error of W8A8 ``(rows/s)·(s·W)`` against the float ``rows·W``
    (``reference``, when already computed); the ``split`` channels (indices) are left out of the
    quantized product and added in float.

    The activation range is the whole tensor's (per-channel min/max over the calibration data,
    divided by s), not the sample's.
    """
    ref = rows @ weight if reference is None else reference
    if s is None:
        s = np.ones(rows.shape[1], dtype=np.float32)
    keep = np.ones(rows.shape[1], dtype=bool)
    if split is not None and len(split):
        keep[split] = False
    x = rows[:, keep] / s[keep]
    xq = fake_quant_range(x, float(np.min(lo[keep] / s[keep])), float(np.max(hi[keep] / s[keep])), GRIDS[dtype]).astype(np.float32)
    wq = fake_quant_weight(weight[keep] * s[keep, None], 1, dtype if dtype == FP8_DTYPE else "int8").astype(np.float32)
    out = xq @ wq
    if not keep.all():
        out += rows[:, ~keep] @ weight[~keep]
    denom = float(np.sum(ref.astype(np.float64) ** 2)) or 1.0
    return float(np.sum((out - ref).astype(np.float64) ** 2) / denom)


def split_counts(limit: int, channels: int) -> list[int]:
    """Channel counts tried for a split: 0, 1, 2, 4, … up to ``limit``, at most half the channels."""
    counts, k = [0], 1
    cap = min(limit, channels // 2)
    while k <= cap:
        counts.append(k)
        k *= 2
    if cap > 0 and counts[-1] != cap:
        counts.append(cap)
    return counts


def split_channels(x_amax: np.ndarray, s: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` channels with the largest smoothed range ``max|X_j| / s_j`` (sorted indices)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.argsort(-(x_amax / s), kind="stable")[:k])


# --- the plan -------------------------------------------------------------------------------------


def plan_smoothing(
    model: ir.Model,
    plan: QuantPlan,
    groups: list[SmoothGroup],
    table,
    alpha: float | str,
    reservoirs: dict | None = None,
    activation_dtype: str = "int8",
    split_outliers: int = 0,
) -> SmoothPlan:
    """Scales, α, split channels and folds for every group (``table``: the calibration statistics,
    with per-channel amax and min/max of each group's activation; ``reservoirs``: sampled rows for
    ``alpha="auto"`` or ``split_outliers``)."""
    by_name = {n.name: n for n in model.graph}
    values = {v.name: v for v in model.graph.inputs}
    values.update({o.name: o for n in model.graph for o in n.outputs})
    protected = set(plan.outputs)
    for name, d in plan.nodes.items():
        node = by_name.get(name)
        if node is not None and d.quantized:
            protected.update(node.inputs[i].name for i, k in d.inputs.items() if k == "activation" and i < len(node.inputs) and node.inputs[i] is not None)
    rng = np.random.default_rng(0)
    norms = norm_statistics(model)
    out = SmoothPlan(alpha=alpha, split_outliers=split_outliers)
    split_consumers: set[str] = set()  # their outputs gain a side product: no fold into them
    for group in groups:
        stats = table.tensors.get(group.activation)
        if stats is None or stats.channel_amax is None:
            continue  # not observed as a float tensor: nothing to smooth
        x_amax = stats.channel_amax.astype(np.float32)
        lo = stats.channel_min if stats.channel_min is not None else -x_amax
        hi = stats.channel_max if stats.channel_max is not None else x_amax
        consumers = [by_name[c] for c in group.consumers]
        weights = [weight_matrix(n) for n in consumers]
        if any(w.shape[0] != x_amax.size for w in weights):
            continue
        w_amax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        group.amax_before = float(x_amax.max())
        splittable = group.trailing == 0 and all(_splittable(n) for n in consumers)
        counts = split_counts(split_outliers, x_amax.size) if splittable else [0]
        if alpha == "auto" or len(counts) > 1:
            rows = reservoirs[group.activation].sample() if reservoirs and group.activation in reservoirs else np.zeros((0, 0))
            if rows.shape[0] == 0 or rows.shape[1] != x_amax.size:
                group.alpha = 0.5 if alpha == "auto" else float(alpha)
            else:
                weight = np.concatenate(weights, axis=1)
                if weight.shape[1] > MAX_SIM_COLUMNS:
                    weight = weight[:, np.sort(rng.choice(weight.shape[1], MAX_SIM_COLUMNS, replace=False))]
                group.alpha, group.split, group.sim_error = _search(rows, weight, x_amax, w_amax, lo, hi, alpha, counts, activation_dtype)
        else:
            group.alpha = float(alpha)
        if not group.smoothed:
            group.amax_after = group.amax_before
            out.groups.append(group)
            continue
        s = scales(x_amax, w_amax, group.alpha) if group.alpha is not None else np.ones_like(x_amax)
        group.scale = s.tolist()
        keep = np.ones(x_amax.size, dtype=bool)
        keep[group.split] = False
        group.amax_after = float((x_amax / s)[keep].max())
        value = values[group.activation]
        feeds_only_group = {u.node.name for u in value.uses()} <= set(group.consumers)
        # a split needs the unscaled activation for its float side product: scale with a Mul
        found = find_absorber(value, group.rank, group.trailing, protected - {group.activation}, norms) if feeds_only_group and not group.split else None
        if found is not None and {f.node for f in found[1]} & split_consumers:
            found = None
        if group.split:
            split_consumers.update(group.consumers)
        if found is None:
            group.absorber = {"kind": "inserted_mul", "node": None, "op": "Mul"}
            group.folds = []
        else:
            group.absorber, group.folds = found
        group.weight_folds = [weight_fold(n) for n in consumers]
        out.groups.append(group)
    return out


def _splittable(node: ir.Node) -> bool:
    """A consumer whose product can take a float side product for split channels."""
    if node.op_type == "MatMul":
        return True
    return node.op_type == "Gemm" and node.attributes.get_float("alpha", 1.0) == 1.0


def _search(rows, weight, x_amax, w_amax, lo, hi, alpha, counts, dtype) -> tuple[float | None, list[int], dict]:
    """(α, split channels, simulated error per candidate): per split count the α (from the grid,
    or not smoothing; or the fixed α) with the least simulated error, then the fewest split
    channels within :data:`SPLIT_TOLERANCE` of the best count's error."""
    reference = rows @ weight
    alphas = [None, *ALPHA_GRID] if alpha == "auto" else [float(alpha)]
    errors: dict[str, float] = {}
    best: dict[int, tuple[float, float | None, np.ndarray]] = {}
    ones = np.ones_like(x_amax)
    for k in counts:
        for a in alphas:
            s = scales(x_amax, w_amax, a) if a is not None else ones
            idx = split_channels(x_amax, s, k)
            e = simulated_error(rows, weight, s, lo, hi, dtype, reference, idx)
            errors[("none" if a is None else f"{a:.2f}") + (f"/split{k}" if k else "")] = e
            if k not in best or e < best[k][0]:
                best[k] = (e, a, idx)
    least = min(e for e, _, _ in best.values())
    k = next(k for k in counts if best[k][0] <= SPLIT_TOLERANCE * least)
    return best[k][1], [int(i) for i in best[k][2]], errors


def smoothed_range(stats, s: np.ndarray, split: list[int] | None = None) -> tuple[float, float]:
    """(min, max) of ``x / s`` from ``x``'s per-channel min and max (s > 0): no recalibration.
    ``split`` channels are 0 in the smoothed tensor."""
    s = np.asarray(s, dtype=np.float32)
    keep = np.ones(s.size, dtype=bool)
    if split:
        keep[split] = False
    if stats.channel_min is not None and stats.channel_max is not None:
        lo, hi = float(np.min(stats.channel_min[keep] / s[keep])), float(np.max(stats.channel_max[keep] / s[keep]))
        return (min(lo, 0.0), max(hi, 0.0)) if split else (lo, hi)
    amax = float(np.max(stats.channel_amax[keep] / s[keep]))
    return -amax, amax


# --- the step in the quantize job ----------------------------------------------------------------


def calibration_request(groups: list[SmoothGroup], alpha: float | str, rows: int | None = None, split_outliers: int = 0) -> dict:
    """What the calibration pass must also collect for ``groups``: per-channel abs-max and signed
    range of each group's activation, and (``alpha="auto"`` or a split) a bounded reservoir of its
    rows."""
    from onnxq.calibrators.reservoir import DEFAULT_ROWS, RowReservoir

    axes = {g.activation: g.channel_axis for g in groups}
    request: dict = {"channel_axes": axes, "channel_ranges": list(axes)}
    if alpha == "auto" or split_outliers > 0:
        request["reservoirs"] = {name: RowReservoir(axis, rows or DEFAULT_ROWS, seed=i) for i, (name, axis) in enumerate(axes.items())}
    return request


def simulated_dtype(plan: QuantPlan) -> str:
    """The activation grid α is chosen on: FP8 for an FP8 plan, else the target's integer type."""
    from onnxq.calibration import ACTIVATION_DTYPE

    return FP8_DTYPE if plan.precision == "fp8" else ACTIVATION_DTYPE[plan.target]


def split_fractions(smooth_plan: SmoothPlan | None) -> dict[str, float]:
    """{consumer node: share of its input channels that went to a float side product}."""
    out: dict[str, float] = {}
    for g in smooth_plan.active() if smooth_plan is not None else []:
        if g.split:
            for c in g.consumers:
                out[c] = len(g.split) / len(g.scale)
    return out
