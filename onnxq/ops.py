"""Op facts: the one home of what onnxq knows about its linear ops (Conv, ConvTranspose, Gemm,
MatMul): which input is the weight, where the weight's output and input channels are, which axis
of an activation operand the product reduces over, and how many multiply-accumulates it does.

Without transposition attributes (:data:`LINEAR`); the weight is input 1 of each:

- Conv: weight ``[C_out, C_in/g, k…]``, output channels on axis 0, input channels on axis 1;
  the activation (NCHW) reduces over axis 1.
- ConvTranspose: weight ``[C_in, C_out/g, k…]``, output axis 1, input axis 0; activation axis 1.
- Gemm: B ``[K, N]``, output axis 1, input axis 0; A ``[M, K]`` reduces over axis -1.
- MatMul: weight ``[…, K, N]``, output axis -1, input axis -2; input 0 reduces over axis -1 and,
  when input 1 is an activation too (attention's Q·Kᵀ and P·V), input 1 over axis -2.

Gemm's ``transA=1`` / ``transB=1`` swap the two axes of A / B. Per-channel weight quantization runs
along the output-channel axis when that axis holds every output channel: not for a grouped
ConvTranspose (axis 1 holds C_out/group), nor for a MatMul weight of unknown or rank-1 shape.
"""

from __future__ import annotations

import math
from typing import NamedTuple
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class LinearOp:
    """Facts of one linear op type, for its operands as laid out without transposition."""

    weight_input: int
    weight_out_axis: int
    weight_in_axis: int
    activation_axes: Mapping[int, int] = field(default_factory=dict)  # input index -> reduction axis
    transpose_attrs: Mapping[int, str] = field(default_factory=dict)  # input index -> attribute swapping its 2 axes


LINEAR = {
    "Conv": LinearOp(1, 0, 1, {0: 1}),
    "ConvTranspose": LinearOp(1, 1, 0, {0: 1}),
    "Gemm": LinearOp(1, 1, 0, {0: -1}, {0: "transA", 1: "transB"}),
    "MatMul": LinearOp(1, -1, -2, {0: -1, 1: -2}),
}
LINEAR_OPS = tuple(LINEAR)
MATMUL_OPS = ("Gemm", "MatMul")


def _transposed(node: ir.Node, input_index: int) -> bool:
    attr = LINEAR[node.op_type].transpose_attrs.get(input_index)
    return attr is not None and bool(node.attributes.get_int(attr, 0))


def _swap(axis: int) -> int:
    """The axis of a transposed 2-D operand that was ``axis`` before."""
    return 1 - axis % 2


def _weight_rank(node: ir.Node) -> int | None:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    return len(w.shape) if w is not None and w.shape is not None else None


def _weight_axis(node: ir.Node, axis: int) -> int | None:
    if _transposed(node, 1):
        return _swap(axis)
    if axis >= 0:
        return axis
    rank = _weight_rank(node)
    return rank + axis if rank is not None and rank >= 2 else None


def weight_output_axis(node: ir.Node) -> int | None:
    """The axis of a linear node's weight (as the node reads it) that holds its output channels."""
    return _weight_axis(node, LINEAR[node.op_type].weight_out_axis)


def weight_input_axis(node: ir.Node) -> int | None:
    """The axis of a linear node's weight that holds its input channels (the reduction axis)."""
    return _weight_axis(node, LINEAR[node.op_type].weight_in_axis)


def weight_axis(node: ir.Node) -> tuple[int, int | None] | None:
    """(input index of the weight, its per-channel quantization axis) for a linear node, else None."""
    if node.op_type not in LINEAR:
        return None
    if node.op_type == "ConvTranspose" and node.attributes.get_int("group", 1) != 1:
        return LINEAR[node.op_type].weight_input, None  # axis 1 holds C_out/group: not per channel
    return LINEAR[node.op_type].weight_input, weight_output_axis(node)


def activation_channel_axis(op_type: str, input_index: int, attributes: Mapping | None = None) -> int | None:
    """The channel (reduction) axis of an activation input of a linear op, else None."""
    facts = LINEAR.get(op_type)
    if facts is None or input_index not in facts.activation_axes:
        return None
    axis = facts.activation_axes[input_index]
    attr = facts.transpose_attrs.get(input_index)
    trans = attributes.get(attr) if attributes is not None and attr is not None else None
    return _swap(axis) if trans is not None and trans.as_int() else axis


def weight_matrix(node: ir.Node, array: np.ndarray) -> np.ndarray:
    """A weight of rank 2 (or a 1×1 conv kernel) as ``[C_in, C_out]``, as the node reads it."""
    if node.op_type in ("Conv", "ConvTranspose"):
        array = array.reshape(array.shape[0], array.shape[1])
    return array.T if weight_output_axis(node) == 0 else array


def static_dims(shape: ir.Shape | None) -> list[int | None] | None:
    """A shape's dims, None for each symbolic one."""
    if shape is None:
        return None
    return [d if isinstance(d, int) else None for d in shape]


class ConvGemm(NamedTuple):
    """The GEMM a Conv/ConvTranspose becomes, per group (None where the weight shape is not static)."""

    groups: int
    in_per_group: int | None
    k: int | None  # reduction length: input channels per group × kernel taps
    n: int | None  # output channels per group
    c_out: int | None  # output channels in all


def conv_gemm_dims(node: ir.Node) -> ConvGemm:
    """The per-group GEMM of a Conv (weight [C_out, C_in/g, k...]) or ConvTranspose (weight
    [C_in, C_out/g, k...])."""
    dims = static_dims(node.inputs[1].shape if len(node.inputs) > 1 and node.inputs[1] is not None else None)
    group = node.attributes.get_int("group", 1)
    if not dims or len(dims) < 2:
        return ConvGemm(group, None, None, None, None)
    taps = math.prod(dims[2:]) if all(d is not None for d in dims[2:]) else None
    if node.op_type == "Conv":
        in_per_group, c_out = dims[1], dims[0]
        n = c_out // group if c_out is not None else None
    else:
        in_per_group = dims[0] // group if dims[0] is not None else None
        n = dims[1]
        c_out = n * group if n is not None else None
    k = in_per_group * taps if in_per_group is not None and taps is not None else None
    return ConvGemm(group, in_per_group, k, n, c_out)


def gemm_dims(node: ir.Node) -> tuple[int | None, int | None, int | None]:
    """(M, K, N) of a MatMul/Gemm where statically known; M is the product of A's row dims."""
    a, b = node.inputs[0], node.inputs[1]
    da, db = static_dims(a.shape if a else None), static_dims(b.shape if b else None)
    m = k = n = None
    if da:
        rows = da[:-1]
        if _transposed(node, 0):
            rows, k = da[1:], da[0]
        else:
            k = da[-1]
        m = math.prod(rows) if rows and all(d is not None for d in rows) else (1 if not rows else None)
    if db:
        if _transposed(node, 1):
            n = db[0]
        else:
            n = db[-1] if len(db) >= 2 else 1
    return m, k, n


def linear_macs(node: ir.Node, a: Sequence[int] | None, w: Sequence[int] | None, out: Sequence[int] | None) -> int:
    """Multiply-accumulates of a linear node given the shapes of its first input, its second
    input and its output (0 when a shape it needs is unknown)."""
    if node.op_type in MATMUL_OPS:
        if not out or not a:
            return 0
        k = a[0] if _transposed(node, 0) else a[-1]
        return math.prod(out) * k
    if node.op_type == "Conv":
        return math.prod(out) * math.prod(w[1:]) if out and w else 0  # each output: C_in/group × kernel
    if node.op_type == "ConvTranspose":
        return math.prod(a) * math.prod(w[1:]) if a and w else 0  # each input feeds C_out/group × kernel
    return 0


def static_macs(node: ir.Node, shapes: Mapping[str, list[int]]) -> int:
    """Multiply-accumulates of a linear node for one sample, from the shapes it ran with (a
    MatMul/Gemm without them: from its static dims)."""
    a, b, out = node.inputs[0], node.inputs[1], node.outputs[0]
    sa, so = shapes.get(a.name), shapes.get(out.name)
    if node.op_type in MATMUL_OPS and not (so and sa):
        m, k, n = gemm_dims(node)
        return int(m * k * n) if None not in (m, k, n) else 0
    return linear_macs(node, sa, shapes.get(b.name) or list(b.shape or []), so)


# The opset from which a Reduce* op reads its axes as an optional int64 input instead of the
# ``axes`` attribute (ReduceSum moved at 13, the others at 18).
REDUCE_AXES_INPUT_SINCE = {
    "ReduceSum": 13, "ReduceMax": 18, "ReduceMin": 18, "ReduceMean": 18, "ReduceProd": 18,
    "ReduceSumSquare": 18, "ReduceL1": 18, "ReduceL2": 18, "ReduceLogSum": 18, "ReduceLogSumExp": 18,
}


def reduce_node(op_type: str, x: ir.Value, axes: Sequence[int], opset: int, name: str, keepdims: bool) -> tuple[ir.Node, ir.Value | None]:
    """A ``op_type`` node named ``name`` reducing ``x`` over ``axes``, written for ``opset``.

    Returns the node and, where the opset wants the axes as an input, the int64 constant the node
    reads (``{name}_axes``, not yet in any graph: the caller registers it as an initializer or
    makes it a Constant node's output); else None (the axes are an attribute)."""
    if opset < REDUCE_AXES_INPUT_SINCE[op_type]:
        return ir.node(op_type, [x], attributes={"keepdims": int(keepdims), "axes": list(axes)}, name=name), None
    array = np.asarray(list(axes), dtype=np.int64)
    axes_value = ir.Value(name=f"{name}_axes", const_value=ir.tensor(array, name=f"{name}_axes"))
    axes_value.dtype, axes_value.shape = ir.DataType.INT64, ir.Shape(array.shape)
    return ir.node(op_type, [x, axes_value], attributes={"keepdims": int(keepdims)}, name=name), axes_value
