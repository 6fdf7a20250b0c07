"""Rewrite weight-only MatMul/Gemm as ONNX Runtime's ``com.microsoft::MatMulNBits``, as the plan says.

Rule: for every node in ``plan.matmulnbits.nodes`` that the plan quantizes weight-only (``w4`` /
``w8``; a node edited to float since stays as the Q/DQ pass left it) (a MatMul, or a Gemm with ``transA=0``,
``alpha=beta=1`` and a 1-D bias), whose weight input is the blocked DequantizeLinear the Q/DQ
pass wrote (constant 4- or 8-bit values, scales and optional zero points, blocks along the
reduction axis), the DequantizeLinear → node pair becomes one ``MatMulNBits`` with the plan's
``accuracy_level`` (``accuracy_level_8bit`` for 8-bit weights) and the same values in ORT's layout (what its ``MatMulNBitsQuantizer`` writes):

- B: unsigned values ``[N, k_blocks, block_size * bits / 8]`` (uint8), K padded to whole blocks
  with the block's zero point (a padded value dequantizes to 0), 4-bit values two per byte, low
  nibble first;
- scales ``[N, k_blocks]`` in the activation's float type;
- symmetric (INT4 / INT8) values are stored as ``q + 2^(bits-1)`` and get no zero-point input:
  the kernel's implicit zero point is ``2^(bits-1)``; unsigned values (UINT4 / UINT8) keep their
  per-block zero points, packed as B is: ``[N, ceil(k_blocks * bits / 8)]`` uint8, the unused
  high nibble of an odd count 0 (as ORT's own DQ → MatMulNBits fusion writes them);
- a Gemm's bias becomes the ``bias`` input.

Packed tensors are shared by the nodes that read one DequantizeLinear. The pass executes the
plan only (placement chose the nodes and the level); a named node whose weight is not such a
DequantizeLinear is a plan that does not fit the model.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.errors import PlanError
from onnxq.passes.initializers import add_initializer
from onnxq.plan import QuantPlan

MS_DOMAIN = "com.microsoft"
# plan precisions whose weight-only products MatMulNBits computes (w4a8 reads FP8 activations: DQ)
WEIGHT_ONLY_FUSED = ("w4", "w8")


class MatMulNBitsPass(ir.passes.InPlacePass):
    def __init__(self, plan: QuantPlan):
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        by_name = {node.name: node for node in model.graph.all_nodes()}
        packed: dict[str, tuple[list[ir.Value | None], dict]] = {}  # by the DequantizeLinear's output
        levels = self.plan.matmulnbits
        names = [n for n in levels.nodes if n in self.plan.nodes and self.plan.nodes[n].precision in WEIGHT_ONLY_FUSED]
        for name in names:
            node = by_name.get(name)
            if node is None:
                raise PlanError(f"the plan's matmulnbits names node {name!r}, which the model does not have; was the plan made for another model?")
            dq = _blocked_dequantizer(node)
            key = dq.outputs[0].name
            if key not in packed:
                packed[key] = _packed_weight(model.graph, dq)
            inputs, attributes = packed[key]
            level = levels.accuracy_level if attributes["bits"] == 4 else levels.accuracy_level_8bit
            _replace(node, inputs, {**attributes, "accuracy_level": level})
            _remove_if_unused(dq)  # freed as it goes: no second copy of every weight at the peak
        if names:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, bool(names))


def _blocked_dequantizer(node: ir.Node) -> ir.Node:
    """The blocked DequantizeLinear of constants feeding ``node``'s weight input (1)."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    dq = weight.producer() if weight is not None else None
    fits = dq is not None and dq.op_type == "DequantizeLinear" and dq.attributes.get_int("block_size", 0) > 0
    fits = fits and all(v is not None and v.const_value is not None for v in dq.inputs) and len(dq.inputs[0].shape or ()) == 2
    if node.op_type == "Gemm":
        a = node.attributes
        fits = fits and a.get_int("transA", 0) == 0 and a.get_float("alpha", 1.0) == 1.0 and a.get_float("beta", 1.0) == 1.0
        fits = fits and (len(node.inputs) < 3 or node.inputs[2] is None or len(node.inputs[2].shape or ()) == 1)
    elif node.op_type != "MatMul":
        fits = False
    if not fits:
        raise PlanError(f"the plan makes {node.name!r} a MatMulNBits, but it is not a MatMul (or plain Gemm) reading a blocked DequantizeLinear of constant weights")
    return dq


def _packed_weight(graph: ir.Graph, dq: ir.Node) -> tuple[list[ir.Value | None], dict]:
    """([B, scales, zero points or None], attributes K, N, bits, block_size) of ``dq``'s weight in
    MatMulNBits' layout: reduction axis last, K padded to whole blocks, values packed."""
    block = dq.attributes.get_int("block_size")
    axis = dq.attributes.get_int("axis", 1) % 2
    q_value, scale_value = dq.inputs[0], dq.inputs[1]
    q = q_value.const_value.numpy().astype(np.int32)
    scale = scale_value.const_value.numpy()
    bits = 4 if q_value.dtype in (ir.DataType.INT4, ir.DataType.UINT4) else 8
    signed = q_value.dtype in (ir.DataType.INT4, ir.DataType.INT8)
    if axis == 0:  # [K, N] as a MatMul reads it: MatMulNBits holds [N, K]
        q, scale = q.T, scale.T
    n, k = q.shape
    blocks = -(-k // block)
    if signed:  # the kernel's implicit zero point is 2^(bits-1): store q + 2^(bits-1), no zero points
        zero = None
        q = q + (1 << (bits - 1))
        pad = np.full((n, blocks * block - k), 1 << (bits - 1), dtype=np.int32)
    else:
        zero = dq.inputs[2].const_value.numpy().astype(np.int32)
        zero = zero.T if axis == 0 else zero
        pad = np.repeat(zero[:, -1:], blocks * block - k, axis=1)
    values = np.concatenate([q, pad], axis=1).astype(np.uint8).reshape(n, blocks, block)
    base = q_value.name.removesuffix("_quantized")
    inputs: list[ir.Value | None] = [
        add_initializer(graph, f"{base}_nbits", _pack(values, bits)),
        add_initializer(graph, f"{base}_nbits_scale", np.ascontiguousarray(scale)),
    ]
    if zero is not None:
        inputs.append(add_initializer(graph, f"{base}_nbits_zero_point", _pack(zero.astype(np.uint8), bits)))
    return inputs, {"K": k, "N": n, "bits": bits, "block_size": block}


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 ``values`` packed along the last axis: 8-bit as they are, 4-bit two per byte, low
    nibble first (an odd count's last high nibble 0)."""
    if bits == 8:
        return np.ascontiguousarray(values)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), dtype=np.uint8)], axis=-1)
    return np.ascontiguousarray(values[..., 0::2] | (values[..., 1::2] << 4))


def _replace(node: ir.Node, packed: list[ir.Value | None], attributes: dict) -> None:
    """``node`` (MatMul or Gemm) replaced by MatMulNBits on its activation and ``packed``."""
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    inputs = [node.inputs[0], *packed]
    if bias is not None:  # inputs 3 (zero points) and 4 (g_idx, deprecated) may be absent
        inputs += [None] * (5 - len(inputs)) + [bias]
    fused = ir.node("MatMulNBits", inputs, attributes=attributes, domain=MS_DOMAIN, name=node.name)
    fused.outputs[0].dtype, fused.outputs[0].shape = node.outputs[0].dtype, node.outputs[0].shape
    ir.convenience.replace_nodes_and_values(node.graph, node, [node], [fused], node.outputs, fused.outputs)


def _remove_if_unused(dq: ir.Node) -> None:
    """Drop a DequantizeLinear nothing reads any more and its initializers nothing else reads."""
    if dq.outputs[0].uses() or dq.outputs[0].is_graph_output() or dq.graph is None:
        return
    inputs = list(dq.inputs)
    dq.graph.remove(dq, safe=True)
    for value in inputs:
        graph = value.graph
        if graph is not None and not value.uses() and graph.initializers.get(value.name) is value:
            graph.initializers.pop(value.name)
