"""Weight-only placement (``--precision w4a16 | w8a16``): which MatMul/Gemm get blocked weights.

Rules:
- a MatMul or Gemm whose weight is a 2-D float initializer (read directly or through a Transpose,
  as a tied LM head is) gets precision ``w4`` / ``w8``: only that input is quantized, its
  activations stay float (no calibration is needed for round-to-nearest);
- the weight is quantized in blocks of ``block_size`` values along the reduction axis (K of a
  MatMul's ``[K, N]`` weight, axis 1 of a Gemm's ``transB=1`` weight), one scale per block;
- tensorrt: symmetric INT4 / INT8 (zero points 0, TensorRT's rule); ort: asymmetric UINT4 /
  UINT8 with a zero point per block (ONNX Runtime fuses the blocked DequantizeLinear → MatMul
  into its ``MatMulNBits`` kernel itself; measured in docs/weight-only.md);
- the LM head and the embedding table, when quantized, get ``head_bits`` (default 8: INT8 blocks,
  the 4-bit body's precision elsewhere; measured in docs/weight-only.md);
- the LM head (a product whose output is a graph output) stays float unless ``quantize_head``:
  on SmolLM2 (6 layers, block 128) an INT4 head drops next-token agreement from 0.76 to 0.65
  (docs/weight-only.md); the head is one product, but its error reaches every logit;
- with ``quantize_embedding`` (ort target), an embedding Gather's table is blocked along the
  hidden axis and run by ONNX Runtime's ``GatherBlockQuantized``; a tied LM head then needs
  ``quantize_head`` too, or the float table stays for it;
- products of two activations (attention), Convs and weights of rank other than 2 stay float;
  GEMV-like products are quantized too (memory-bound decoding is what weight-only is for);
- ort target, ``w4a16`` / ``w8a16`` with an ``accuracy_level`` (the recipe's
  ``--ort-accuracy-level``; ``--ort-weight-form dq`` gives none): each quantized MatMul, and each
  Gemm with ``transA=0``, ``alpha=beta=1`` and a 1-D bias, is emitted as ONNX Runtime's
  ``com.microsoft::MatMulNBits`` at that level (``plan.matmulnbits``; 8-bit weights at level 4,
  ``ACCURACY_LEVEL_8BIT``): ORT fuses the blocked DQ form into the same kernel at level 4 only,
  and the level trades 1-token against 512-token latency (measured in docs/weight-only.md);
- the opset is raised to 21 (``min_opset``): blocked DequantizeLinear and INT4 arrive there.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxq.ops import MATMUL_OPS, weight_input_axis
from onnxq.placement import rules
from onnxq.plan import FLOAT, MatMulNBitsPlan, NodeDecision, QuantPlan, WeightQuant
from onnxq.weights import FLOAT_TYPES, weight_source

# Blocked DequantizeLinear (the block_size attribute) and INT4 tensors arrive in opset 21.
WEIGHT_ONLY_MIN_OPSET = 21
# MatMulNBits' accuracy level for 8-bit weights (an INT8 head, --int8-share): ORT 1.32's CPU kernel
# for 8 bits at levels 0-2 ran a 576x1536 product in 2.5-2.9 ms at M = 1 against 46-60 us at level 4
# (and SmolLM2-6l's 1-token forward with an INT8 head 5-6x slower than at level 4)
ACCURACY_LEVEL_8BIT = 4
# Plan precision of a recipe's weight-only precision, and the weight dtype per target.
NODE_PRECISION = {"w4a16": "w4", "w8a16": "w8", "w4a8": "w4a8"}
WEIGHT_ONLY_DTYPE = {
    ("tensorrt", "w4"): "int4", ("tensorrt", "w8"): "int8", ("ort", "w4"): "uint4", ("ort", "w8"): "uint8",
    ("tensorrt", "w4a8"): "int4", ("ort", "w4a8"): "uint4",
}


def table_dtype(plan: QuantPlan, head_bits: int) -> str:
    """The weight dtype of the LM head and the embedding table: ``head_bits`` wide on the plan's
    target (an INT8 table and head keep SmolLM2-135M's perplexity; INT4 costs a third of it)."""
    return WEIGHT_ONLY_DTYPE[(plan.target, "w8" if head_bits == 8 else "w4")]


def weight_only_decision(node: ir.Node, plan: QuantPlan, block_size: int, dtype: str | None = None) -> NodeDecision:
    """The decision for one MatMul/Gemm: its weight blocked at the plan's precision (or ``dtype``), or float."""
    w_index = 1
    w = node.inputs[w_index] if len(node.inputs) > w_index else None
    source = weight_source(w)
    if source is None:
        return NodeDecision(node.op_type, FLOAT, {}, "second operand is not a constant weight: weight-only leaves it float")
    if weight_source(node.inputs[0]) is not None or not rules.is_activation(node.inputs[0]):
        return NodeDecision(node.op_type, FLOAT, {}, "first operand is not a float activation")
    shape = source.initializer.shape
    if shape is None or len(shape) != 2:
        return NodeDecision(node.op_type, FLOAT, {}, "weight is not a 2-D matrix: weight-only blocks need [K, N]")
    axis = weight_input_axis(node)
    dtype = dtype or WEIGHT_ONLY_DTYPE[(plan.target, plan.precision)]
    plan.set_weight(node.name, w_index, WeightQuant(dtype=dtype, axis=axis, block_size=block_size))
    if plan.precision == "w4a8":  # FP8 E4M3 activations as well
        return NodeDecision(node.op_type, plan.precision, {0: "activation", w_index: "weight"}, f"{dtype} weights in blocks of {block_size} along the reduction axis, FP8 activations")
    return NodeDecision(node.op_type, plan.precision, {w_index: "weight"}, f"weight-only {dtype}, blocks of {block_size} along the reduction axis")


def embedding_decision(node: ir.Node, plan: QuantPlan, block_size: int, dtype: str) -> NodeDecision:
    """An embedding Gather (a 2-D float table gathered on axis 0): its table in blocks along the
    hidden axis, run by ORT's GatherBlockQuantized (ort target only)."""
    table = node.inputs[0]
    if table is None or table.const_value is None or table.shape is None or len(table.shape) != 2 or table.dtype not in FLOAT_TYPES:
        return NodeDecision(node.op_type, FLOAT, {}, "not an embedding: the data is not a 2-D float initializer")
    if node.attributes.get_int("axis", 0) != 0 or node.inputs[1] is None or node.inputs[1].const_value is not None:
        return NodeDecision(node.op_type, FLOAT, {}, "not an embedding: gathers a constant or on an axis other than 0")
    plan.set_weight(node.name, 0, WeightQuant(dtype=dtype, axis=1, block_size=block_size))
    return NodeDecision(node.op_type, plan.precision, {0: "weight"}, f"embedding table {dtype}, blocks of {block_size} along the hidden axis (GatherBlockQuantized)")


def matmulnbits_fits(node: ir.Node) -> bool:
    """Whether MatMulNBits computes ``node`` (with its weight blocked): a MatMul, or a Gemm
    ``A·B + C`` with no transposed A, unit alpha and beta, and a bias of one value per column."""
    if node.op_type == "MatMul":
        return True
    a = node.attributes
    plain = node.op_type == "Gemm" and a.get_int("transA", 0) == 0 and a.get_float("alpha", 1.0) == 1.0 and a.get_float("beta", 1.0) == 1.0
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return plain and (bias is None or (bias.shape is not None and len(bias.shape) == 1))


def place(model: ir.Model, target: str, precision: str, block_size: int, *, quantize_head: bool = False, quantize_embedding: bool = False, head_bits: int = 8, accuracy_level: int | None = None) -> QuantPlan:
    """The weight-only plan of ``model``: ``precision`` is the recipe's ("w4a16" or "w8a16");
    the head and the embedding table, when quantized, get ``head_bits``; on the ort target with
    an ``accuracy_level``, the quantized products become MatMulNBits at that level."""
    plan = QuantPlan(target=target, precision=NODE_PRECISION[precision], min_opset=WEIGHT_ONLY_MIN_OPSET)
    if quantize_embedding:
        for node in rules.nodes(model, ["Gather"]):
            plan.nodes[node.name] = embedding_decision(node, plan, block_size, table_dtype(plan, head_bits))
    for node in rules.nodes(model, MATMUL_OPS):
        head = any(out.is_graph_output() for out in node.outputs)
        if head and not quantize_head:
            plan.nodes[node.name] = NodeDecision(node.op_type, FLOAT, {}, "LM head (writes a graph output): kept float; --quantize-head quantizes it")
            continue
        plan.nodes[node.name] = weight_only_decision(node, plan, block_size, table_dtype(plan, head_bits) if head else None)
    if target == "ort" and accuracy_level is not None and plan.precision in ("w4", "w8"):
        fused = [node.name for node in rules.nodes(model, MATMUL_OPS) if plan.nodes[node.name].quantized and matmulnbits_fits(node)]
        plan.matmulnbits = MatMulNBitsPlan(accuracy_level=accuracy_level, nodes=fused, accuracy_level_8bit=ACCURACY_LEVEL_8BIT)
    return plan
