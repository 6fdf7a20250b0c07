"""AWQ (activation-aware weight quantization) for weight-only INT4/INT8, the decision.

Two searches on calibration rows (sampled during one pass, as SmoothQuant samples them), per
group of MatMul/Gemm that read one activation (:func:`onnxq.smoothquant.find_groups`):

- **Scales** (AWQ's ``auto_scale``): ``Y = X·W = (X·diag(s)⁻¹)·(diag(s)·W)`` with, per input
  channel j, ``s_j = mean|X_j|^α`` normalised by ``sqrt(max s · min s)``; α from
  :data:`ALPHA_GRID` (0, 0.05, …, 0.95: the reference's 20-point grid) minimising the squared
  error of ``(X/s) · Q(s·W)`` against ``X·W`` over the group's quantized consumers, where Q is
  the plan's blocked quantization (on at most :data:`MAX_SCALE_COLUMNS` columns, a fixed
  sample), on the sampled rows plus two rows of the per-channel maxima and minima of the whole
  pass: a channel that is rare but huge (an attention-sink token's) keeps its weights' precision
  (without them, SmolLM2-135M's perplexity went from 23.1 with RTN to 48.2). α = 0 (s = 1) is round-to-nearest: AWQ is never worse than
  RTN on the sampled rows. The scales are a SmoothQuant group (``plan.smoothquant``): diag(s)⁻¹
  goes into the producer (norm weight, linear producer, SwiGLU's ``up``) and diag(s) into the
  consumers' weights, executed exactly by the ``fold`` stage. A group whose producer cannot take
  the scale stays unscaled (AWQ inserts no ``Mul``: an extra op on the decoding path).
- **Clip** (AWQ's ``auto_clip``): per block and output column, the range factor from
  :data:`CLIP_RATIOS` (1, 0.95, …, 0.55) minimising that block's output error
  ``|(X/s)_block · (Q(W')_block − W'_block)|²`` on the rows. Recorded per weight entry
  (``WeightQuant.clip``: indices into the ratios, base64) and applied by the Q/DQ pass.

Deterministic: rows come from seeded reservoirs, and the searches are exhaustive.
"""

from __future__ import annotations

import base64

import numpy as np
import onnx_ir as ir

from onnxq import smoothquant as sq
from onnxq.grids import CLIP_RATIOS, GRIDS, dequantize_blocked, fake_quant_blocked, quantize_blocked
from onnxq.patterns import norm_statistics
from onnxq.plan import QuantPlan, SmoothGroup, SmoothPlan

ALPHA_GRID = tuple(i / 20 for i in range(20))
MAX_SEARCH_ROWS = 512  # rows the scale search simulates per group
MAX_CLIP_ROWS = 256  # rows the clip search simulates (it runs per block and column: all columns)
MAX_SCALE_COLUMNS = 2048  # output columns the scale search simulates (a fixed sample when more: an LM head has 49152)


def awq_scales(x_mean: np.ndarray, alpha: float) -> np.ndarray:
    """``mean|X_j|^α`` (floored at 1e-4), normalised so that max·min = 1 (float32)."""
    s = np.maximum(np.asarray(x_mean, dtype=np.float64), 1e-4) ** alpha
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32)


def _relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sum((out - ref).astype(np.float64) ** 2) / (np.sum(ref.astype(np.float64) ** 2) or 1.0))


def search_scale(rows: np.ndarray, weight: np.ndarray, grid: str, block: int) -> tuple[float, np.ndarray, dict[str, float]]:
    """(α, s, error per α) for rows ``[R, K]`` and the consumers' weights ``[K, N]``."""
    if weight.shape[1] > MAX_SCALE_COLUMNS:
        weight = weight[:, np.sort(np.random.default_rng(0).choice(weight.shape[1], MAX_SCALE_COLUMNS, replace=False))]
    ref = rows @ weight
    x_mean = np.abs(rows).mean(axis=0)
    best: tuple[float, float, np.ndarray] | None = None
    errors = {}
    for alpha in ALPHA_GRID:
        s = awq_scales(x_mean, alpha)
        out = (rows / s) @ fake_quant_blocked(weight * s[:, None], 0, block, GRIDS[grid])
        errors[f"{alpha:.2f}"] = e = _relative_error(out, ref)
        if best is None or e < best[0]:
            best = (e, alpha, s)
    return best[1], best[2], errors


def search_clip(rows: np.ndarray, weight: np.ndarray, grid: str, block: int) -> np.ndarray:
    """Per block and column of ``weight`` ``[K, N]`` the index into :data:`CLIP_RATIOS` whose
    quantized block contributes the least squared output error on ``rows`` ``[R, K]``."""
    k = weight.shape[0]
    n_blocks = -(-k // block)
    best_err = np.full((n_blocks, weight.shape[1]), np.inf)
    best_idx = np.zeros((n_blocks, weight.shape[1]), dtype=np.uint8)
    for i, ratio in enumerate(CLIP_RATIOS):
        q, scale, zero = quantize_blocked(weight, 0, block, GRIDS[grid], clip=ratio)
        delta = dequantize_blocked(q, scale, zero, 0, block) - weight
        for b in range(n_blocks):
            part = slice(b * block, min(k, (b + 1) * block))
            err = np.sum((rows[:, part] @ delta[part]).astype(np.float64) ** 2, axis=0)
            better = err < best_err[b]
            best_err[b, better] = err[better]
            best_idx[b, better] = i
    return best_idx


def encode_clip(indices: np.ndarray) -> str:
    """Clip indices as the plan stores them (``WeightQuant.clip``): base64 of uint8, row-major."""
    return base64.b64encode(np.ascontiguousarray(indices, dtype=np.uint8).tobytes()).decode("ascii")


def extreme_rows(stats) -> np.ndarray:
    """The per-channel maxima and minima of the whole calibration pass as two rows (``[2, C]``;
    none without statistics): rare huge values (an attention-sink token's) that a row sample
    misses."""
    if stats is None or stats.channel_max is None or stats.channel_min is None:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([stats.channel_max, stats.channel_min]).astype(np.float32)


def plan_awq(model: ir.Model, plan: QuantPlan, groups: list[SmoothGroup], reservoirs: dict, table=None) -> SmoothPlan:
    """AWQ's scales (as SmoothQuant groups) and clip factors (in the weight entries) for ``plan``.
    ``table``: the pass's per-channel ranges; their extreme rows join the scale search's rows."""
    by_name = {n.name: n for n in model.graph}
    values = {v.name: v for v in model.graph.inputs}
    values.update({o.name: o for n in model.graph for o in n.outputs})
    norms = norm_statistics(model)
    out = SmoothPlan(alpha="awq")
    for group in groups:
        out.groups.append(group)
        members = [(by_name[c], plan.weight(c, 1)) for c in group.consumers if plan.nodes[c].quantized]
        rows = reservoirs[group.activation].sample() if group.activation in reservoirs else np.zeros((0, 0))
        weights = [sq.weight_matrix(node) for node, _ in members]
        if rows.shape[0] == 0 or not members or group.trailing != 0 or any(w.shape[0] != rows.shape[1] for w in weights):
            continue
        rows = rows[:MAX_SEARCH_ROWS].astype(np.float32)
        extremes = extreme_rows(table.tensors.get(group.activation) if table is not None else None)
        search_rows = np.concatenate([rows, extremes]) if extremes.shape[-1] == rows.shape[1] else rows
        s = _scale_group(group, values[group.activation], search_rows, weights, members[0][1], norms, by_name)
        for (_, entry), w in zip(members, weights, strict=True):
            entry.clip = encode_clip(search_clip(rows[:MAX_CLIP_ROWS] / s, w * s[:, None], entry.dtype, entry.block_size))
    return out


def _scale_group(group: SmoothGroup, value: ir.Value, rows, weights, entry, norms, by_name) -> np.ndarray:
    """Search the group's α; record the scales and their folds in ``group`` when a producer can
    take them exactly. Returns the scales the weights are quantized with (ones if unscaled)."""
    alpha, s, group.sim_error = search_scale(rows, np.concatenate(weights, axis=1), entry.dtype, entry.block_size)
    feeds_only_group = {u.node.name for u in value.uses()} <= set(group.consumers)
    found = sq.find_absorber(value, group.rank, group.trailing, set(), norms) if alpha > 0 and feeds_only_group else None
    if found is None:
        return np.ones_like(s)
    group.alpha, group.scale = alpha, s.tolist()
    group.absorber, group.folds = found
    group.weight_folds = [sq.weight_fold(by_name[c]) for c in group.consumers]
    group.amax_before = float(np.abs(rows).max())
    group.amax_after = float(np.abs(rows / s).max())
    return s
