"""GPTQ for weight-only INT4/INT8, the decision: each weight's rounding chosen against its
layer's Hessian (Frantar et al., "GPTQ", 2022; the reference is IST-DASLab/gptq ``fasterquant``).

- **Hessian**: ``H = XᵀX`` of each quantized MatMul/Gemm's input ``X`` (rows = tokens), summed
  during calibration passes by :class:`HessianAccumulator` (offered every batch like a row
  reservoir: no sample is kept). Tensors are taken in chunks of at most
  :data:`HESSIAN_BUDGET_BYTES` of Hessians per pass, so memory stays bounded on deep models.
- **Rounding** (:func:`gptq_quantize`): input channels are quantized one at a time (the largest
  ``H_jj`` first with act-order), each one's rounding error spread over the not yet quantized
  channels through the upper Cholesky factor of ``(H + λI)⁻¹`` (λ = 1 % of the mean diagonal),
  in lazy-update blocks of :data:`UPDATE_BLOCK` channels. The block scales are static: those of
  round-to-nearest on the weight the node reads (with AWQ's clip factors when the plan has them),
  so a DequantizeLinear block stays one scale however act-order permutes the channels.
- **Clip** (plain GPTQ; ``awq+gptq`` keeps AWQ's): per block and column the range factor from
  :data:`~onnxq.grids.CLIP_RATIOS` whose round-to-nearest block has the least output error
  ``Δᵀ H_bb Δ`` (:func:`search_clip`), stored as AWQ's clip factors are.
- **Plan**: the weight entry stores what GPTQ changed: per weight, its integer's offset from
  round-to-nearest (``WeightQuant.offsets``: int8, zlib-compressed, base64; mostly zeros and ±1).
  Replay recomputes the RTN integers and scales from the float weight and adds the offsets: the
  same bytes without data.

Deterministic: sums in float64 over the data in order, exhaustive per-channel rounding, a stable
act-order sort.
"""

from __future__ import annotations

import base64
import zlib

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxq import smoothquant as sq
from onnxq.awq import encode_clip
from onnxq import ops
from onnxq.grids import CLIP_RATIOS, GRIDS, WEIGHT_GRIDS, dequantize_blocked, fake_quant_blocked, quantize_blocked, quantize_weight, to_fp8
from onnxq.plan import WEIGHT_DTYPE, QuantPlan, WeightQuant
from onnxq.weights import weight_source

DAMPING = 0.01  # λ = DAMPING × mean(diag H) (the reference's percdamp)
UPDATE_BLOCK = 128  # channels per lazy update (the reference's blocksize)
HESSIAN_BUDGET_BYTES = 1 << 30  # float64 Hessians held during one calibration pass
INT4_TO_INT8 = {"int4": "int8", "uint4": "uint8"}  # a sensitive weight's wider dtype on the same target


class HessianAccumulator:
    """``XᵀX`` (float64) of a tensor's rows, channel axis ``axis``; the collector offers it every
    batch as it offers a :class:`~onnxq.calibrators.reservoir.RowReservoir`."""

    def __init__(self, axis: int):
        self.axis = axis
        self.rows = 0
        self.h: np.ndarray | None = None

    def update(self, value: np.ndarray) -> None:
        rows = np.moveaxis(np.asarray(value, dtype=np.float64), self.axis, -1)
        rows = rows.reshape(-1, rows.shape[-1])
        if self.h is None:
            self.h = np.zeros((rows.shape[1], rows.shape[1]), dtype=np.float64)
        elif self.h.shape[0] != rows.shape[1]:
            return  # a different channel count: not the tensor the accumulator was made for
        self.h += rows.T @ rows
        self.rows += rows.shape[0]


class HessianFactor:
    """What GPTQ needs of one Hessian, computed once for all the weights reading its activation:
    the channel order (act-order: largest ``H_jj`` first, stable), the never-active channels and
    the upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` in that order (``(H + λI)⁻¹ = UᵀU``)."""

    def __init__(self, h: np.ndarray, *, act_order: bool = True):
        h = np.array(h, dtype=np.float64)
        self.dead = np.diag(h) == 0  # a channel never active: its weight is irrelevant, as in the reference
        h[self.dead, self.dead] = 1.0
        k = h.shape[0]
        self.order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
        h = h[np.ix_(self.order, self.order)]
        h[np.diag_indices_from(h)] += DAMPING * np.mean(np.diag(h))
        # (H + λI)⁻¹'s upper factor from one Cholesky of the reversed H: if J H J = L Lᵀ
        # (J reverses the channels) then H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), J L⁻¹ J upper triangular
        lower = np.linalg.cholesky(h[::-1, ::-1])
        self.u = np.ascontiguousarray(_lower_inverse(lower)[::-1, ::-1])


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """``L⁻¹`` of a lower-triangular ``L`` by blocked forward substitution (numpy has no
    triangular solver; a general inverse costs an LU factorization more)."""
    k = lower.shape[0]
    inv = np.zeros_like(lower)
    step = UPDATE_BLOCK
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        diag_inv = np.linalg.inv(lower[i1:i2, i1:i2])
        inv[i1:i2, i1:i2] = diag_inv
        if i1:  # rows i1:i2 of L⁻¹ left of the diagonal block: -D⁻¹ · L[i1:i2, :i1] · L⁻¹[:i1, :i1]
            inv[i1:i2, :i1] = -diag_inv @ (lower[i1:i2, :i1] @ inv[:i1, :i1])
    return inv


def gptq_quantize(weight: np.ndarray, h: np.ndarray | HessianFactor, grid: str, block: int, clip: np.ndarray | float = 1.0, *, act_order: bool = True) -> np.ndarray:
    """GPTQ's integers (``grid``'s numpy type) for ``weight`` ``[K, N]`` (K: the reduction axis)
    with the Hessian ``h`` ``[K, K]`` (or its :class:`HessianFactor`, which then decides the
    order), on the static scales of blocks of ``block`` along K."""
    g = GRIDS[grid]
    factor = h if isinstance(h, HessianFactor) else HessianFactor(h, act_order=act_order)
    w = np.asarray(weight, dtype=np.float32)
    _, scale, zero = quantize_blocked(w, 0, block, g, clip)
    w = w.astype(np.float64)
    w[factor.dead] = 0.0
    order = factor.order
    w = w[order]
    row_scale = scale.astype(np.float64)[order // block]
    row_zero = zero.astype(np.float64)[order // block]
    lowest = -g.qmax if g.symmetric else g.qmin

    def round_row(i: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.clip(np.rint(x / row_scale[i]) + row_zero[i], lowest, g.qmax)
        return q, (q - row_zero[i]) * row_scale[i]

    return _rounding(w, factor.u, round_row)[np.argsort(order)].astype(g.numpy_type)


def _rounding(w: np.ndarray, u: np.ndarray, round_row) -> np.ndarray:
    """GPTQ's loop on ``w`` ``[K, N]`` (float64, rows in the factor's order; updated in place):
    row ``i`` rounded by ``round_row(i, row) -> (codes, dequantized)``, its error spread over the
    later rows through ``u``. Returns the codes ``[K, N]`` (float64) in the same order."""
    k = w.shape[0]
    q = np.zeros(w.shape, dtype=np.float64)
    for i1 in range(0, k, UPDATE_BLOCK):
        i2 = min(i1 + UPDATE_BLOCK, k)
        err = np.zeros((i2 - i1, w.shape[1]))
        for i in range(i1, i2):
            q[i], dequantized = round_row(i, w[i])
            err[i - i1] = (w[i] - dequantized) / u[i, i]
            w[i + 1 : i2] -= u[i, i + 1 : i2, None] * err[i - i1]
        w[i2:] -= u[i1:i2, i2:].T @ err
    return q


def gptq_quantize_static(weight: np.ndarray, h: np.ndarray | HessianFactor, dtype: str, per_channel: bool = True, *, act_order: bool = True) -> np.ndarray:
    """GPTQ's values (``dtype``'s numpy type: int8 integers or FP8 E4M3FN numbers) for ``weight``
    ``[K, N]`` on the grid a W8A8 node's weight uses (:func:`~onnxq.grids.quantize_weight`):
    symmetric, one scale per output column (one block spanning K) or per tensor. FP8 rounds each
    value to its nearest E4M3FN number, the grid's "integer" step being one code."""
    g = WEIGHT_GRIDS[dtype]
    factor = h if isinstance(h, HessianFactor) else HessianFactor(h, act_order=act_order)
    w = np.asarray(weight, dtype=np.float32)
    rtn, scale32 = quantize_weight(w, 1 if per_channel else None, dtype)
    scale = np.broadcast_to(scale32.astype(np.float64), (w.shape[1],))
    # FP8: each value stays within 127 codes of round-to-nearest (what an int8 offset holds; the
    # grid is fine near zero, where the spread error can move a small weight across many codes)
    rtn_codes = fp8_ordinals(rtn)[factor.order] if g.is_float else None
    w = w.astype(np.float64)
    w[factor.dead] = 0.0
    w = w[factor.order]

    def round_row(i: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if g.is_float:  # codes: the E4M3FN values themselves (exact in float64)
            codes = np.clip(fp8_ordinals(to_fp8(x / scale)), rtn_codes[i] - 127, rtn_codes[i] + 127)
            q = fp8_from_ordinals(codes).astype(np.float64)
        else:
            q = np.clip(np.rint(x / scale), -g.qmax, g.qmax)
        return q, q * scale

    q = _rounding(w, factor.u, round_row)[np.argsort(factor.order)]
    return q.astype(np.float32).astype(g.numpy_type)


def fp8_ordinals(values: np.ndarray) -> np.ndarray:
    """E4M3FN values as int16 positions on the grid, monotonic in the value (sign and magnitude
    bits: ±0 → 0, the smallest subnormal → ±1, 448 → ±126): what FP8 offsets count."""
    bits = np.asarray(values).view(np.uint8).astype(np.int16)
    return np.where(bits & 0x80, -(bits & 0x7F), bits & 0x7F).astype(np.int16)


def fp8_from_ordinals(ordinals: np.ndarray) -> np.ndarray:
    """The E4M3FN values at grid positions ``ordinals`` (inverse of :func:`fp8_ordinals`; 0 is +0)."""
    o = np.asarray(ordinals, dtype=np.int16)
    return np.where(o < 0, 0x80 | -o, o).astype(np.uint8).view(ml_dtypes.float8_e4m3fn)


def grid_offsets(q: np.ndarray, rtn: np.ndarray, dtype: str) -> np.ndarray:
    """``q``'s offsets from ``rtn`` in steps of the grid (FP8: codes, which
    :func:`gptq_quantize_static` keeps within int8; saturated here as a guard)."""
    if GRIDS[dtype].is_float:
        return np.clip(fp8_ordinals(q) - fp8_ordinals(rtn), -127, 127)
    return q.astype(np.int16) - rtn.astype(np.int16)


def apply_offsets(q: np.ndarray, offsets: np.ndarray, dtype: str) -> np.ndarray | None:
    """``q`` (round-to-nearest on ``dtype``'s grid) moved by ``offsets`` (the same shape), or
    None when a result leaves the grid (a plan made for another model)."""
    g = GRIDS[dtype]
    if g.is_float:
        moved = fp8_ordinals(q) + offsets
        return fp8_from_ordinals(moved) if np.abs(moved).max(initial=0) <= 126 else None
    values = q.astype(np.int16) + offsets
    if values.min(initial=0) < (-g.qmax if g.symmetric else g.qmin) or values.max(initial=0) > g.qmax:
        return None
    return values.astype(g.numpy_type)


def search_clip(weight: np.ndarray, h: np.ndarray, grid: str, block: int, columns: int = 2048) -> np.ndarray:
    """Per block and column of ``weight`` ``[K, N]`` the index into :data:`CLIP_RATIOS` whose
    round-to-nearest block gives the least output error ``Δᵀ H_bb Δ`` (AWQ's clip search with the
    whole pass's Hessian instead of sampled rows). All ratios of a block in one product, over
    ``columns`` output columns at a time (bounded memory for a wide head)."""
    k, n = weight.shape
    best_idx = np.zeros((-(-k // block), n), dtype=np.uint8)
    for c in range(0, n, columns):
        w = weight[:, c : c + columns]
        deltas = np.stack([fake_quant_blocked(w, 0, block, GRIDS[grid], ratio).astype(np.float64) - w for ratio in CLIP_RATIOS], axis=1)  # [K, ratios, cols]
        for b in range(best_idx.shape[0]):
            part = slice(b * block, min(k, (b + 1) * block))
            d = deltas[part].reshape(deltas[part].shape[0], -1)
            err = np.sum(d * (h[part, part] @ d), axis=0).reshape(len(CLIP_RATIOS), w.shape[1])
            best_idx[b, c : c + columns] = np.argmin(err, axis=0)  # the first of equal errors, as a strict < scan keeps
    return best_idx


def layer_error(weight: np.ndarray, dequantized: np.ndarray, h: np.ndarray) -> float:
    """The output error ``tr(ΔWᵀ H ΔW)`` of replacing ``weight`` ``[K, N]`` by ``dequantized``,
    relative to ``tr(Wᵀ H W)`` (the squared output, summed over the Hessian's rows)."""
    return layer_errors(weight, [dequantized], h)[0]


def layer_errors(weight: np.ndarray, candidates: list[np.ndarray], h: np.ndarray) -> list[float]:
    """:func:`layer_error` of each candidate, in one product with ``h``."""
    w = np.asarray(weight, dtype=np.float64)
    n = w.shape[1]
    stacked = np.concatenate([w] + [np.asarray(c, dtype=np.float64) - w for c in candidates], axis=1)
    energy = np.sum(stacked * (h @ stacked), axis=0)
    total = float(np.sum(energy[:n])) or 1.0
    return [float(np.sum(energy[(i + 1) * n : (i + 2) * n])) / total for i in range(len(candidates))]


def encode_offsets(offsets: np.ndarray) -> str:
    """Offsets from round-to-nearest as the plan stores them (``WeightQuant.offsets``, read
    back by :meth:`~onnxq.plan.WeightQuant.offset_values`)."""
    return base64.b64encode(zlib.compress(np.ascontiguousarray(offsets, dtype=np.int8).tobytes(), 6)).decode("ascii")


def entry_clip(entry: WeightQuant, shape: tuple[int, int]) -> np.ndarray | float:
    """The entry's clip factors as ``[blocks, N]`` for a ``[K, N]`` weight (1.0 without)."""
    indices = entry.clip_indices()
    if indices is None:
        return 1.0
    return np.asarray(CLIP_RATIOS, dtype=np.float32)[indices.reshape(-(-shape[0] // entry.block_size), shape[1])]


def gptq_targets(model: ir.Model, plan: QuantPlan) -> dict[str, list[str]]:
    """{input activation: MatMul/Gemm nodes reading it} of the plan's GPTQ candidates: weight-only
    nodes, and W8A8 nodes whose weight (int8 / FP8, per channel or per tensor) no other node reads
    (their DequantizeLinear would be shared, and one rounding cannot suit two Hessians)."""
    out: dict[str, list[str]] = {}
    for node in model.graph:
        decision = plan.nodes.get(node.name)
        entry = plan.weight(node.name, 1) if decision is not None and decision.quantized else None
        transposed_input = node.op_type == "Gemm" and node.attributes.get_int("transA", 0)
        if entry is None or node.op_type not in ("MatMul", "Gemm") or transposed_input:
            continue
        static = entry.block_size is None and decision.inputs.get(1) == "weight" and entry.dtype == WEIGHT_DTYPE.get(decision.precision)
        source = weight_source(node.inputs[1]) if static and len(node.inputs[1].uses()) == 1 else None
        if entry.block_size is not None or (source is not None and len(source.initializer.shape or ()) == 2):
            out.setdefault(node.inputs[0].name, []).append(node.name)
    return out


def plan_gptq_nodes(model: ir.Model, plan: QuantPlan, nodes: list[str], h: np.ndarray, *, act_order: bool = True, clip_search: bool = True) -> dict[str, tuple[float, float]]:
    """Run GPTQ for ``nodes`` (readers of one activation with Hessian ``h``), storing the offsets
    (and, for weight-only blocks without AWQ's, clip factors) in their weight entries. Returns
    {node: (RTN error, GPTQ error)} relative output errors, both on the entry's (clipped) scales."""
    by_name = {n.name: n for n in model.graph}
    errors = {}
    factor = HessianFactor(h, act_order=act_order)
    for name in nodes:
        entry = plan.weight(name, 1)
        w = sq.weight_matrix(by_name[name])
        if w.shape[0] != h.shape[0]:
            continue
        if entry.block_size is None:
            offsets, candidates = _static_gptq(w, factor, entry)
        else:
            offsets, candidates = _blocked_gptq(w, h, factor, entry, clip_search)
        entry.offsets = encode_offsets(np.moveaxis(offsets, 0, ops.weight_input_axis(by_name[name])))  # as the node reads the weight
        errors[name] = tuple(layer_errors(w, candidates, h))
    return errors


def _blocked_gptq(w: np.ndarray, h: np.ndarray, factor: HessianFactor, entry: WeightQuant, clip_search: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """(offsets ``[K, N]``, [RTN, GPTQ] dequantized) of a weight-only entry's blocks; the clip
    search (plain GPTQ) stored in the entry."""
    if entry.clip is None and clip_search:  # plain GPTQ: the clip search on the Hessian
        entry.clip = encode_clip(search_clip(w, h, entry.dtype, entry.block_size))  # [blocks, N] for any axis
    clip = entry_clip(entry, w.shape)
    rtn, scale, zero = quantize_blocked(w, 0, entry.block_size, GRIDS[entry.dtype], clip)
    q = gptq_quantize(w, factor, entry.dtype, entry.block_size, clip)
    return q.astype(np.int16) - rtn.astype(np.int16), [dequantize_blocked(v, scale, zero, 0, entry.block_size) for v in (rtn, q)]


def _static_gptq(w: np.ndarray, factor: HessianFactor, entry: WeightQuant) -> tuple[np.ndarray, list[np.ndarray]]:
    """(offsets ``[K, N]``, [RTN, GPTQ] dequantized) of a W8A8 entry: per output channel (the
    entry has an axis) or per tensor, as the Q/DQ pass quantizes it."""
    axis = 1 if entry.axis is not None else None
    rtn, scale = quantize_weight(w, axis, entry.dtype)
    offsets = grid_offsets(gptq_quantize_static(w, factor, entry.dtype, axis is not None), rtn, entry.dtype)
    return offsets, [apply_offsets(rtn, o, entry.dtype).astype(np.float32) * scale for o in (np.zeros_like(offsets), offsets)]


def promote_sensitive(model: ir.Model, plan: QuantPlan, readers: dict[str, tuple[list[str], np.ndarray]], share: float) -> list[str]:
    """Keep ``share`` of the weights' elements at 8 bits: the 4-bit weights of ``readers``
    ({activation: (nodes, Hessian)}) whose round-to-nearest output error relative to their output
    (:func:`layer_error`) is largest get the 8-bit dtype of the plan's target. Returns them."""
    by_name = {n.name: n for n in model.graph}
    ranked = []
    for nodes, h in readers.values():
        for name in nodes:
            entry = plan.weight(name, 1)
            w = sq.weight_matrix(by_name[name])
            if entry.dtype not in INT4_TO_INT8 or w.shape[0] != h.shape[0]:
                continue
            fake = fake_quant_blocked(w, 0, entry.block_size, GRIDS[entry.dtype], entry_clip(entry, w.shape))
            ranked.append((-layer_error(w, fake, h), name, w.size))
    budget = share * sum(size for _, _, size in ranked)
    promoted = []
    for _, name, size in sorted(ranked):  # largest error first; ties in name order
        if size > budget:
            continue  # a smaller weight further down may still fit
        budget -= size
        entry = plan.weight(name, 1)
        entry.dtype, entry.clip = INT4_TO_INT8[entry.dtype], None  # a 4-bit clip search does not fit 8 bits
        promoted.append(name)
    return promoted


def hessian_chunks(model: ir.Model, plan: QuantPlan, targets: dict[str, list[str]], budget: int = HESSIAN_BUDGET_BYTES) -> list[list[str]]:
    """``targets``' activations in graph order, grouped so each group's float64 Hessians fit
    ``budget`` bytes (one calibration pass per group; a single larger one gets its own pass)."""
    by_name = {n.name: n for n in model.graph}
    chunks: list[list[str]] = [[]]
    used = 0
    for activation, nodes in targets.items():
        source = weight_source(by_name[nodes[0]].inputs[1])
        k = source.initializer.shape[source.initializer_axis(ops.weight_input_axis(by_name[nodes[0]]), 2)]
        size = 8 * int(k) ** 2
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(activation)
        used += size
    return [c for c in chunks if c]
