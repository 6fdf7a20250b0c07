"""Dynamic quantization: MatMul/Gemm whose plan marks input 0 ``dynamic`` become the graph ONNX
Runtime's ``quantize_dynamic`` writes, which ORT fuses into ``DynamicQuantizeMatMul``:

    x ─DynamicQuantizeLinear─▶ (x_q, x_scale, x_zero) ─MatMulInteger(x_q, W_q, x_zero, 0)─▶ int32
      ─Cast(float)─▶ Mul(·, x_scale · w_scale) ─(Gemm: Add(·, C))─▶ y

Rule: one DynamicQuantizeLinear per activation tensor (shared by its dynamic readers); the weight
is quantized as the node reads it (``[K, N]``, a Gemm's ``transB`` weight transposed) to INT8
symmetric per output column (``onnxq.grids.quantize_weight``, values in [-127, 127]; the scale per
column goes into the rescaling Mul), with one INT8 zero point 0. The pass executes the plan only.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.errors import PlanError
from onnxq.grids import quantize_weight
from onnxq.ops import weight_matrix
from onnxq.passes.initializers import add_initializer
from onnxq.plan import QuantPlan
from onnxq.weights import weight_source


def dynamic_nodes(plan: QuantPlan) -> list[str]:
    """The plan's nodes with a dynamically quantized input."""
    return [name for name, d in plan.nodes.items() if d.quantized and "dynamic" in d.inputs.values()]


class DynamicQuantizePass(ir.passes.InPlacePass):
    def __init__(self, plan: QuantPlan):
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        by_name = {n.name: n for n in model.graph}
        quantized: dict[str, tuple[ir.Value, ir.Value, ir.Value]] = {}
        for name in dynamic_nodes(self.plan):
            node = by_name.get(name)
            if node is None or node.op_type not in ("MatMul", "Gemm") or weight_source(node.inputs[1]) is None:
                raise PlanError(f"the plan quantizes {name!r} dynamically; the main graph has no MatMul/Gemm of that name with a constant weight")
            x = node.inputs[0]
            if x.name not in quantized:
                quantized[x.name] = self._dynamic_quantize(model.graph, x)
            self._integer_product(model.graph, node, quantized[x.name])
        return ir.passes.PassResult(model, bool(quantized))

    @staticmethod
    def _dynamic_quantize(graph: ir.Graph, x: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
        node = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{x.name}_DynamicQuantizeLinear")
        for out, suffix, dtype in zip(node.outputs, ("quantized", "scale", "zero_point"), (ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8), strict=True):
            out.name, out.dtype = f"{x.name}_{suffix}", dtype
        node.outputs[0].shape = x.shape
        producer = x.producer()
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, node)
        else:
            graph.insert_before(next(iter(graph)), node)
        return tuple(node.outputs)

    def _integer_product(self, graph: ir.Graph, node: ir.Node, x_q: tuple[ir.Value, ir.Value, ir.Value]) -> None:
        source = weight_source(node.inputs[1])
        array = source.initializer.const_value.numpy().astype(np.float32)
        if source.transpose is not None:
            array = np.transpose(array, source.transpose.attributes.get_ints("perm", [1, 0]))
        q, scale = quantize_weight(weight_matrix(node, array), 1, "int8")
        name = node.name
        w_q = add_initializer(graph, f"{name}_weight_quantized", np.ascontiguousarray(q))
        w_zero = add_initializer(graph, f"{name}_weight_zero_point", np.zeros((), dtype=np.int8))  # symmetric: one 0 serves every column
        w_scale = add_initializer(graph, f"{name}_weight_scale", scale.astype(np.float32))
        product = ir.node("MatMulInteger", [x_q[0], w_q, x_q[2], w_zero], name=f"{name}_MatMulInteger")
        cast = ir.node("Cast", [product.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{name}_Cast")
        scales = ir.node("Mul", [x_q[1], w_scale], name=f"{name}_scales")
        out = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=f"{name}_rescale")
        nodes = [product, cast, scales, out]
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            nodes.append(ir.node("Add", [out.outputs[0], node.inputs[2]], name=f"{name}_bias"))
        for n in nodes:
            n.outputs[0].name = f"{n.name}_output"
        product.outputs[0].dtype = ir.DataType.INT32
        nodes[-1].outputs[0].dtype, nodes[-1].outputs[0].shape = node.outputs[0].dtype, node.outputs[0].shape
        ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, node.outputs, [nodes[-1].outputs[0]])
