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

import numpy as np
import onnx_ir as ir

from onnxq import smoothquant as sq
from onnxq.awq import encode_clip
from onnxq.grids import CLIP_RATIOS, GRIDS, dequantize_blocked, fake_quant_blocked, quantize_blocked
from onnxq.plan import QuantPlan, WeightQuant
from onnxq.weights import weight_source

DAMPING = 0.01  # λ = DAMPING × mean(diag H) (the reference's percdamp)
UPDATE_BLOCK = 128  # channels per lazy update (the reference's blocksize)
HESSIAN_BUDGET_BYTES = 1 << 30  # float64 Hessians held during one calibration pass


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


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``(H + λI)⁻¹ = UᵀU``)."""
    h = h.copy()
    h[np.diag_indices_from(h)] += DAMPING * np.mean(np.diag(h))
    return np.linalg.cholesky(np.linalg.inv(h)).T


def gptq_quantize(weight: np.ndarray, h: np.ndarray, grid: str, block: int, clip: np.ndarray | float = 1.0, *, act_order: bool = True) -> np.ndarray:
    """GPTQ's integers (``grid``'s numpy type) for ``weight`` ``[K, N]`` (K: the reduction axis)
    with the Hessian ``h`` ``[K, K]``, on the static scales of blocks of ``block`` along K."""
    g = GRIDS[grid]
    w = np.asarray(weight, dtype=np.float32)
    _, scale, zero = quantize_blocked(w, 0, block, g, clip)
    k = w.shape[0]
    w = w.astype(np.float64)
    h = np.asarray(h, dtype=np.float64).copy()
    dead = np.diag(h) == 0  # a channel never active: its weight is irrelevant, as in the reference
    h[dead, dead] = 1.0
    w[dead] = 0.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w, h = w[order], h[np.ix_(order, order)]
    row_scale = scale.astype(np.float64)[order // block]
    row_zero = zero.astype(np.float64)[order // block]
    u = _inverse_cholesky(h)
    lowest = -g.qmax if g.symmetric else g.qmin
    q = np.zeros(w.shape, dtype=np.float64)
    for i1 in range(0, k, UPDATE_BLOCK):
        i2 = min(i1 + UPDATE_BLOCK, k)
        err = np.zeros((i2 - i1, w.shape[1]))
        for i in range(i1, i2):
            q[i] = np.clip(np.rint(w[i] / row_scale[i]) + row_zero[i], lowest, g.qmax)
            err[i - i1] = (w[i] - (q[i] - row_zero[i]) * row_scale[i]) / u[i, i]
            w[i + 1 : i2] -= np.outer(u[i, i + 1 : i2], err[i - i1])
        w[i2:] -= u[i1:i2, i2:].T @ err
    return q[np.argsort(order)].astype(g.numpy_type)


def search_clip(weight: np.ndarray, h: np.ndarray, grid: str, block: int) -> np.ndarray:
    """Per block and column of ``weight`` ``[K, N]`` the index into :data:`CLIP_RATIOS` whose
    round-to-nearest block gives the least output error ``Δᵀ H_bb Δ`` (AWQ's clip search with the
    whole pass's Hessian instead of sampled rows)."""
    k = weight.shape[0]
    n_blocks = -(-k // block)
    best_err = np.full((n_blocks, weight.shape[1]), np.inf)
    best_idx = np.zeros((n_blocks, weight.shape[1]), dtype=np.uint8)
    for i, ratio in enumerate(CLIP_RATIOS):
        delta = fake_quant_blocked(weight, 0, block, GRIDS[grid], ratio).astype(np.float64) - weight
        for b in range(n_blocks):
            part = slice(b * block, min(k, (b + 1) * block))
            err = np.sum(delta[part] * (h[part, part] @ delta[part]), axis=0)
            better = err < best_err[b]
            best_err[b, better] = err[better]
            best_idx[b, better] = i
    return best_idx


def layer_error(weight: np.ndarray, dequantized: np.ndarray, h: np.ndarray) -> float:
    """The output error ``tr(ΔWᵀ H ΔW)`` of replacing ``weight`` ``[K, N]`` by ``dequantized``,
    relative to ``tr(Wᵀ H W)`` (the squared output, summed over the Hessian's rows)."""
    delta = np.asarray(dequantized, dtype=np.float64) - weight
    w = np.asarray(weight, dtype=np.float64)
    return float(np.sum(delta * (h @ delta)) / (np.sum(w * (h @ w)) or 1.0))


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
    """{input activation: weight-only MatMul/Gemm nodes reading it} of the plan's GPTQ candidates."""
    out: dict[str, list[str]] = {}
    for node in model.graph:
        decision = plan.nodes.get(node.name)
        entry = plan.weight(node.name, 1) if decision is not None and decision.quantized else None
        transposed_input = node.op_type == "Gemm" and node.attributes.get_int("transA", 0)
        if entry is not None and entry.block_size is not None and node.op_type in ("MatMul", "Gemm") and not transposed_input:
            out.setdefault(node.inputs[0].name, []).append(node.name)
    return out


def plan_gptq_nodes(model: ir.Model, plan: QuantPlan, nodes: list[str], h: np.ndarray, *, act_order: bool = True, clip_search: bool = True) -> dict[str, tuple[float, float]]:
    """Run GPTQ for ``nodes`` (readers of one activation with Hessian ``h``), storing the offsets
    (and, without AWQ's, clip factors) in their weight entries. Returns {node: (RTN error, GPTQ
    error)} relative output errors, both on the entry's (clipped) scales."""
    by_name = {n.name: n for n in model.graph}
    errors = {}
    for name in nodes:
        entry = plan.weight(name, 1)
        w = sq.weight_matrix(by_name[name])
        if w.shape[0] != h.shape[0]:
            continue
        g = GRIDS[entry.dtype]
        if entry.clip is None and clip_search:  # plain GPTQ: the clip search on the Hessian
            entry.clip = encode_clip(search_clip(w, h, entry.dtype, entry.block_size))  # [blocks, N] for any axis
        clip = entry_clip(entry, w.shape)
        rtn, scale, zero = quantize_blocked(w, 0, entry.block_size, g, clip)
        q = gptq_quantize(w, h, entry.dtype, entry.block_size, clip, act_order=act_order)
        offsets = q.astype(np.int16) - rtn.astype(np.int16)
        entry.offsets = encode_offsets(np.moveaxis(offsets, 0, entry.axis % 2))
        errors[name] = tuple(layer_error(w, dequantize_blocked(v, scale, zero, 0, entry.block_size), h) for v in (rtn, q))
    return errors


def hessian_chunks(model: ir.Model, plan: QuantPlan, targets: dict[str, list[str]], budget: int = HESSIAN_BUDGET_BYTES) -> list[list[str]]:
    """``targets``' activations in graph order, grouped so each group's float64 Hessians fit
    ``budget`` bytes (one calibration pass per group; a single larger one gets its own pass)."""
    by_name = {n.name: n for n in model.graph}
    chunks: list[list[str]] = [[]]
    used = 0
    for activation, nodes in targets.items():
        source = weight_source(by_name[nodes[0]].inputs[1])
        k = source.initializer.shape[source.initializer_axis(plan.weight(nodes[0], 1).axis, 2)]
        size = 8 * int(k) ** 2
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(activation)
        used += size
    return [c for c in chunks if c]
