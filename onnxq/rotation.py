"""Rotation of the residual stream (QuaRot/SpinQuant-style), the decision.

A pre-norm decoder keeps one residual stream ``r`` that only the embedding and the writers
(attention's output projection, the MLP's down projection) add to, and that only RMSNorms read.
For an orthogonal ``Q`` the model computes the same function on ``r·Q``: RMSNorm over the full
hidden dimension commutes with ``Q`` (``‖r·Q‖ = ‖r‖``) once its per-channel weight γ is folded
into the linear layers that read it, so

- the embedding table becomes ``E·Q``; every writer's weight ``W·Q`` (its bias ``b·Q``);
- every norm's γ goes into its readers (Q/K/V, gate/up, the LM head): ``W ← Qᵀ·diag(γ)·W``, and
  γ becomes 1;
- a weight read elsewhere too (a tied embedding and LM head) gets a rotated copy.

Rotating spreads a few huge residual channels over all of them, so the activations that reach
the quantized products (the norms' outputs) lose their outliers instead of moving them into the
weights (SmoothQuant).

``Q = diag(±1)·H/√n`` with ``H`` a Hadamard matrix of the hidden size: a Kronecker product of
Sylvester (powers of two) and Paley I (``q + 1`` for primes ``q ≡ 3 mod 4``: 12, 20, 24, 44, 48,
…) matrices, signs drawn from a fixed seed and recorded in the plan (SmolLM2's 576 = 72·8). A size
no such product reaches gets a seeded random orthogonal matrix (QR of a Gaussian), kind
``orthogonal``. The plan records the kind, size, seed, factors and signs and the nodes rewritten;
:func:`rotation_matrix` regenerates ``Q`` from them, and
:class:`onnxq.passes.rotate.RotatePass` executes it.

What is found from the graph (:func:`find_residual_stream`): every ``Pow → ReduceMean(last
axis) → Add(eps) → Sqrt [→ Reciprocal] → Mul/Div`` statistic (:mod:`onnxq.patterns`) whose
input is the stream; the stream must start at an embedding ``Gather`` and grow only by ``Add``
of a writer ``MatMul`` (constant ``[K, hidden]`` weight, optional bias); every tensor of it must
be read only by its norm and the next ``Add``; every norm output (after γ) only by ``MatMul``s
with constant weights. Anything else (LayerNorm's mean, a hidden-state graph output, a scaled
embedding) is refused with the reason.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx_ir as ir

from onnxq.errors import UnsupportedModelError
from onnxq.patterns import NormStatistic, norm_statistics
from onnxq.plan import HeadRotation, RotatedNorm, RotationPlan
from onnxq.weights import weight_source

DEFAULT_SEED = 0
MAX_PALEY_PRIME = 1000


# --- Q --------------------------------------------------------------------------------------


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley(q: int) -> np.ndarray:
    """Paley I Hadamard matrix of order q + 1 (q prime, q ≡ 3 mod 4)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if d in residues else -1 for d in range(1, q)])
    jacobsthal = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal
    return s + np.eye(q + 1, dtype=np.int64)


PALEY_ORDERS = tuple(q + 1 for q in range(3, MAX_PALEY_PRIME) if q % 4 == 3 and _is_prime(q))


@functools.lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[int, ...] | None:
    """Orders of Sylvester (a power of two) and Paley matrices whose Kronecker product has order
    ``n`` (the fewest, largest Paley order first), or None when there are none."""
    if n >= 1 and n & (n - 1) == 0:
        return (n,)
    for p in sorted(PALEY_ORDERS, reverse=True):
        if p < n and n % p == 0:
            rest = hadamard_factors(n // p)
            if rest is not None:
                return (p, *rest)
    return (n,) if n in PALEY_ORDERS else None


def _hadamard_of_order(p: int) -> np.ndarray:
    if p & (p - 1) == 0:
        h = np.ones((1, 1), dtype=np.int64)
        while h.shape[0] < p:
            h = np.block([[h, h], [h, -h]])
        return h
    return _paley(p - 1)


def hadamard(factors) -> np.ndarray:
    """The Kronecker product of the Hadamard matrices of ``factors`` (entries ±1)."""
    h = np.ones((1, 1), dtype=np.int64)
    for p in factors:
        h = np.kron(h, _hadamard_of_order(p))
    return h


def random_signs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, n).astype(bool)


def signs_to_hex(signs: np.ndarray) -> str:
    return np.packbits(signs).tobytes().hex()


def signs_from_hex(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool)


def rotation_matrix(plan: RotationPlan | HeadRotation) -> np.ndarray:
    """``Q`` (float64, orthogonal) as the plan records it (the residual one or the per-head one)."""
    n = plan.size
    if plan.kind == "hadamard":
        sign = np.where(signs_from_hex(plan.signs, n), -1.0, 1.0)
        return sign[:, None] * hadamard(plan.factors).astype(np.float64) / math.sqrt(n)
    gaussian = np.random.default_rng(plan.seed).standard_normal((n, n))
    q, r = np.linalg.qr(gaussian)
    return q * np.sign(np.diag(r))[None, :]


def choose_rotation(size: int, seed: int = DEFAULT_SEED) -> RotationPlan:
    """A randomized Hadamard rotation of ``size`` where one exists, else a random orthogonal one."""
    factors = hadamard_factors(size)
    if factors is None:
        return RotationPlan(kind="orthogonal", size=size, seed=seed)
    return RotationPlan(kind="hadamard", size=size, seed=seed, factors=list(factors), signs=signs_to_hex(random_signs(size, seed)))


# --- the residual stream --------------------------------------------------------------------


def _refuse(reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"--rotate needs a pre-norm decoder with RMSNorm on its residual stream: {reason}; drop --rotate for this model")


def _const_ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in value.const_value.numpy().reshape(-1)]


def _reduces_last_axis(mean: ir.Node, rank: int | None) -> bool:
    axes = _const_ints(mean.inputs[1]) if len(mean.inputs) > 1 else None
    if axes is None:
        attr = mean.attributes.get("axes")
        axes = list(attr.as_ints()) if attr is not None else None
    return axes is not None and rank is not None and [a % rank for a in axes] == [rank - 1]


def _normalizer(stat: NormStatistic, x: ir.Value) -> ir.Node | None:
    """The ``Mul(x, 1/rms)`` or ``Div(x, rms)`` that normalises ``x`` with ``stat``."""
    found = []
    for out in stat.outputs:
        for use in out.uses():
            node = use.node
            ok = (node.op_type == "Mul" and x in node.inputs) or (node.op_type == "Div" and node.inputs[0] is x and use.idx == 1)
            if ok:
                found.append(node)
    return found[0] if len(found) == 1 else None


def _linear_shape(node: ir.Node, value: ir.Value) -> tuple[int, int] | None:
    """The ``[K, N]`` shape, as the node reads it, of the constant weight of a MatMul reading
    ``value`` as its first input; None for anything else."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2 or node.inputs[0] is not value:
        return None
    source = weight_source(node.inputs[1])
    if source is None or source.initializer.is_graph_input() or source.initializer.const_value.numpy().ndim != 2:
        return None
    shape = source.initializer.const_value.numpy().shape
    return shape[::-1] if source.transpose is not None else shape


def _gamma(normalized: ir.Value, hidden: int) -> tuple[ir.Node | None, int | None, ir.Value]:
    """(γ Mul, its constant input index, the norm's output): the per-channel weight after the
    normalisation, if the normalised tensor feeds only it."""
    uses = normalized.uses()
    if len(uses) == 1 and uses[0].node.op_type == "Mul" and not normalized.is_graph_output():
        node = uses[0].node
        other = 1 - uses[0].idx
        c = node.inputs[other]
        if c is not None and c.const_value is not None and not c.is_graph_input() and c.const_value.numpy().size == hidden and c.const_value.numpy().shape[-1] == hidden:
            return node, other, node.outputs[0]
    return None, None, normalized


def _norm(stat: NormStatistic, hidden: int, rank: int | None) -> RotatedNorm:
    x = stat.nodes[0].inputs[0]
    if not _reduces_last_axis(stat.nodes[1], rank):
        raise _refuse(f"the norm of {x.name!r} does not reduce over the last (hidden) axis alone")
    normalizer = _normalizer(stat, x)
    if normalizer is None:
        raise _refuse(f"no single Mul/Div normalises {x.name!r} by its root mean square")
    scale_node, scale_input, out = _gamma(normalizer.outputs[0], hidden)
    readers = []
    for use in out.uses():
        shape = _linear_shape(use.node, out)
        if shape is None or shape[0] != hidden:
            raise _refuse(f"the norm output {out.name!r} is read by {use.node.op_type} {use.node.name!r}, not only by MatMuls with constant weights")
        readers.append(use.node.name)
    if out.is_graph_output() or not readers:
        raise _refuse(f"the norm output {out.name!r} is a graph output or has no reader")
    return RotatedNorm(statistic=stat.nodes[0].name, scale_node=scale_node.name if scale_node else None, scale_input=scale_input, readers=readers)


def _writer(y: ir.Value, hidden: int) -> tuple[str, str | None] | None:
    """(MatMul, bias Add or None) producing ``y`` (read only by the residual Add), a writer to
    the stream; None when ``y`` comes from anything else."""
    if len(y.uses()) != 1 or y.is_graph_output() or y.producer() is None:
        return None
    node, bias = y.producer(), None
    if node.op_type == "Add":
        consts = [i for i in node.inputs if i is not None and i.const_value is not None]
        others = [i for i in node.inputs if i is not None and i.const_value is None]
        if len(consts) != 1 or len(others) != 1 or consts[0].const_value.numpy().size != hidden or len(others[0].uses()) != 1:
            return None
        bias, node = node, others[0].producer()
        if node is None:
            return None
    shape = _linear_shape(node, node.inputs[0]) if node.inputs else None
    if shape is None or shape[1] != hidden or weight_source(node.inputs[0]) is not None:
        return None
    return node.name, bias.name if bias is not None else None


def _stream_start(x: ir.Value, hidden: int) -> str | None:
    """The embedding Gather producing ``x`` (constant ``[vocab, hidden]`` table, axis 0)."""
    node = x.producer()
    if node is None or node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0:
        return None
    table = node.inputs[0]
    if table is None or table.const_value is None or table.is_graph_input() or table.const_value.numpy().ndim != 2:
        return None
    return node.name if table.const_value.numpy().shape[1] == hidden else None


def find_residual_stream(model: ir.Model, seed: int = DEFAULT_SEED, online_block: int = 0) -> RotationPlan:
    """The rotation of ``model``'s residual stream: Q, the embeddings, writers and norms; with
    ``online_block``, the MLP down projections that get an online block Hadamard too."""
    graph = model.graph
    layer_norms = [n.name for n in graph if n.op_type == "LayerNormalization"]
    if layer_norms:
        raise _refuse(f"LayerNormalization {layer_norms[0]!r} subtracts a mean, which a rotation does not commute with (not supported)")
    stats = norm_statistics(graph)
    if not stats:
        raise _refuse("the model has no RMSNorm (Pow → ReduceMean → Add → Sqrt) statistic")
    stream = {id(s.nodes[0].inputs[0]): s for s in stats}
    hidden = _hidden_size(stats)
    embeddings, writers, biases = [], [], []
    for s in stats:
        x = s.nodes[0].inputs[0]
        _check_stream_uses(x, s, stream)
        producer = x.producer()
        start = _stream_start(x, hidden)
        if start is not None:
            embeddings.append(start)
            continue
        if producer is None or producer.op_type != "Add":
            what = "a LayerNorm's mean subtraction" if producer is not None and producer.op_type == "Sub" else f"{producer.op_type if producer else 'a graph input'}"
            raise _refuse(f"the norm input {x.name!r} comes from {what}, not from an embedding Gather or a residual Add")
        found = [w for i in producer.inputs if i is not None and id(i) not in stream for w in [_writer(i, hidden)]]
        if sum(id(i) in stream for i in producer.inputs) != 1 or len(found) != 1 or found[0] is None:
            raise _refuse(f"the residual Add {producer.name!r} does not add one MatMul writer to the stream")
        writers.append(found[0][0])
        if found[0][1]:
            biases.append(found[0][1])
    if not embeddings:
        raise _refuse("the stream does not start at an embedding Gather of a constant [vocab, hidden] table")
    plan = choose_rotation(hidden, seed)
    plan.embeddings, plan.writers, plan.biases = embeddings, writers, biases
    rank = {id(s.nodes[0].inputs[0]): (len(s.nodes[0].inputs[0].shape) if s.nodes[0].inputs[0].shape is not None else None) for s in stats}
    plan.norms = [_norm(s, hidden, rank[id(s.nodes[0].inputs[0])]) for s in stats]
    if online_block:
        plan.online_block = online_block
        plan.online = _online_writers(graph, writers, online_block)
    plan.head = find_head_rotation(graph, [w for w in writers if w not in plan.online], seed)
    if online_block and plan.head is not None:
        plan.head.scores = _score_products(graph, plan.head.size)
    return plan


def _score_products(graph: ir.Graph, head_dim: int) -> list[str]:
    """Attention's ``Q·Kᵀ`` MatMuls (two computed inputs, ``[.., head_dim]`` queries times
    ``[.., head_dim, keys]`` transposed keys) whose scores reach a Softmax through element-wise
    ops (scale, mask)."""
    found = []
    for softmax in (n for n in graph if n.op_type == "Softmax"):
        node = softmax.inputs[0].producer()
        for _ in range(4):
            if node is None or node.op_type not in ("Mul", "Div", "Add", "Sub", "Cast"):
                break
            computed = [i for i in node.inputs if i is not None and i.const_value is None and i.producer() is not None and i.producer().op_type in ("MatMul", "Mul", "Div", "Add", "Sub", "Cast")]
            node = computed[0].producer() if len(computed) == 1 else None
        if node is None or node.op_type != "MatMul" or any(weight_source(i) is not None for i in node.inputs):
            continue
        q, k = node.inputs[0].shape, node.inputs[1].shape
        if q is not None and k is not None and len(q) >= 2 and len(k) >= 2 and q[-1] == head_dim and k[-2] == head_dim:
            found.append(node.name)
    return found


# --- per head, between the values and the output projection ---------------------------------

# ops that move whole heads (and copy them for grouped-query attention) without mixing the
# channels of the last axis: a rotation of each head's channels passes through them
_HEAD_MOVES = ("Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze")


def _keeps_head_channels(node: ir.Node, head_dim: int) -> bool:
    """``node`` maps chunks of ``head_dim`` consecutive last-axis channels to such chunks, whole:
    a Transpose that keeps the last axis last, or an op whose input and output last dimensions
    are known multiples of ``head_dim`` (row-major reshapes keep the chunks aligned)."""
    x, y = node.inputs[0], node.outputs[0]
    if x.shape is None or y.shape is None or not len(x.shape) or not len(y.shape):
        return False
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        return perm is not None and perm[-1] == len(perm) - 1
    last = (x.shape[-1], y.shape[-1])
    return all(isinstance(d, int) and d % head_dim == 0 for d in last)


def _single_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def _walk_back(value: ir.Value, head_dim: int) -> ir.Node | None:
    """The first node before ``value`` that is not a head move (each tensor on the way read only
    by the next node), or None when a move mixes the channels of a head."""
    node = value.producer()
    while node is not None and node.op_type in _HEAD_MOVES:
        if not _single_use(node.inputs[0]) or not _keeps_head_channels(node, head_dim):
            return None
        node = node.inputs[0].producer()
    return node if node is not None and _single_use(node.outputs[0]) else None


def _value_projection(output_projection: ir.Node) -> tuple[int, str, str | None] | None:
    """(head dimension, value MatMul, its bias Add or None) whose heads reach
    ``output_projection`` only through head moves and attention's ``P·V``; None otherwise."""
    pv = output_projection.inputs[0].producer()
    while pv is not None and pv.op_type in _HEAD_MOVES:
        pv = pv.inputs[0].producer()
    if pv is None or pv.op_type != "MatMul" or pv.outputs[0].shape is None or not isinstance(pv.outputs[0].shape[-1], int):
        return None
    head_dim = pv.outputs[0].shape[-1]
    if _walk_back(output_projection.inputs[0], head_dim) is not pv or weight_source(pv.inputs[1]) is not None:
        return None
    node, bias = _walk_back(pv.inputs[1], head_dim), None
    if node is not None and node.op_type == "Add":
        consts = [i for i in node.inputs if i is not None and i.const_value is not None]
        others = [i for i in node.inputs if i is not None and i.const_value is None]
        if len(consts) != 1 or len(others) != 1 or consts[0].const_value.numpy().ndim != 1 or not _single_use(others[0]):
            return None
        bias, node = node, others[0].producer()
    if node is None or node.op_type != "MatMul" or _linear_shape(node, node.inputs[0]) is None:
        return None
    if _linear_shape(node, node.inputs[0])[1] % head_dim or _linear_shape(output_projection, output_projection.inputs[0])[0] % head_dim:
        return None
    return head_dim, node.name, bias.name if bias is not None else None


def find_head_rotation(graph: ir.Graph, writers: list[str], seed: int = DEFAULT_SEED) -> HeadRotation | None:
    """The per-head rotation between the value projections and the output projections among
    ``writers`` (those reached from a value MatMul through ``P·V`` and head moves alone), or
    None when there is none or the head dimensions differ."""
    by_name = {n.name: n for n in graph}
    found = {name: _value_projection(by_name[name]) for name in writers}
    found = {name: f for name, f in found.items() if f is not None}
    if not found or len({f[0] for f in found.values()}) != 1:
        return None
    size = next(iter(found.values()))[0]
    matrix = choose_rotation(size, seed)
    return HeadRotation(
        kind=matrix.kind, size=size, seed=seed, factors=matrix.factors, signs=matrix.signs,
        values=[f[1] for f in found.values()], value_biases=[f[2] for f in found.values() if f[2]], outputs=list(found),
    )


def block_hadamard(block: int) -> np.ndarray:
    """``H_b/√b`` (float64, orthogonal, no signs): the online rotation's block."""
    return hadamard(hadamard_factors(block)).astype(np.float64) / math.sqrt(block)


def _online_writers(graph: ir.Graph, writers: list[str], block: int) -> list[str]:
    """The MLP down projections among ``writers`` (their input is not attention's reshaped
    context), each with a static rank and a width that ``block`` divides."""
    if hadamard_factors(block) is None:
        raise UnsupportedModelError(f"--rotate-online {block}: no Hadamard matrix of order {block} is built here; pass a power of two (64, 128, ...)")
    by_name = {n.name: n for n in graph}
    online = []
    for name in writers:
        node = by_name[name]
        x = node.inputs[0]
        producer = x.producer()
        if producer is None or producer.op_type in ("Reshape", "Transpose", "Flatten"):
            continue
        width = _linear_shape(node, x)[0]
        if width % block or x.shape is None:
            raise UnsupportedModelError(f"--rotate-online {block} does not divide the width {width} of {name!r}'s input (or its rank is unknown); pass a block that divides it")
        online.append(name)
    if not online:
        raise _refuse("--rotate-online found no MLP down projection among the writers")
    return online




def _hidden_size(stats: list[NormStatistic]) -> int:
    sizes = set()
    for s in stats:
        shape = s.nodes[0].inputs[0].shape
        if shape is None or not isinstance(shape[-1], int):
            raise _refuse(f"the hidden size of {s.nodes[0].inputs[0].name!r} is not known (run shape inference)")
        sizes.add(shape[-1])
    if len(sizes) != 1:
        raise _refuse(f"the norms see different hidden sizes {sorted(sizes)}")
    return sizes.pop()


def _check_stream_uses(x: ir.Value, stat: NormStatistic, stream: dict) -> None:
    """``x`` is read only by its norm and by the residual Add that makes the next stream tensor."""
    if x.is_graph_output():
        raise _refuse(f"the residual tensor {x.name!r} is a graph output (it would come out rotated)")
    for use in x.uses():
        node = use.node
        if node is stat.nodes[0] or node.op_type in ("Mul", "Div") and any(o in node.inputs for o in stat.outputs):
            continue
        if node.op_type == "Add" and id(node.outputs[0]) in stream:
            continue
        raise _refuse(f"the residual tensor {x.name!r} is read by {node.op_type} {node.name!r}")
