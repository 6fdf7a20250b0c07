"""Fold bias corrections into Conv/Gemm biases, as ``QuantPlan.bias_correction`` says.

Rule: for every ``node: correction`` (one float per output channel), the node's bias becomes
``bias + correction``; a node without a bias gets one (``correction``). A bias read by another
node too gets a corrected private copy. The corrections (minus the mean error of the quantized
node's output, measured by :mod:`onnxq.bias_correction`) are decided elsewhere; this pass only
adds them, before Q/DQ insertion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxq.errors import PlanError
from onnxq.passes.initializers import add_initializer


class BiasCorrectionPass(ir.passes.InPlacePass):
    def __init__(self, corrections: Mapping[str, Sequence[float]]):
        super().__init__()
        self.corrections = corrections

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        by_name = {node.name: node for node in model.graph}
        for name, correction in self.corrections.items():
            node = by_name.get(name)
            if node is None or node.op_type not in ("Conv", "Gemm"):
                raise PlanError(f"the plan corrects the bias of {name!r}, which is not a Conv or Gemm of the model")
            self._correct(model.graph, node, np.asarray(correction, dtype=np.float32))
        return ir.passes.PassResult(model, bool(self.corrections))

    @staticmethod
    def _correct(graph: ir.Graph, node: ir.Node, correction: np.ndarray) -> None:
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and (bias.const_value is None or bias.const_value.numpy().size not in (1, correction.size)):
            raise PlanError(f"the bias of {node.name!r} is not a constant of {correction.size} channels; its correction cannot be folded")
        dtype = np.float16 if node.outputs[0].dtype == ir.DataType.FLOAT16 else np.float32
        old = bias.const_value.numpy() if bias is not None else np.zeros(correction.shape, dtype)
        corrected = np.ascontiguousarray((old.astype(np.float32) + correction).astype(old.dtype).reshape(correction.shape))
        private = bias is not None and len(bias.uses()) == 1 and not bias.is_graph_input() and not bias.is_graph_output()
        if private:
            bias.const_value = ir.tensor(corrected, name=bias.name)
            bias.shape = ir.Shape(corrected.shape)
            return
        value = add_initializer(graph, f"{node.name}_corrected_bias", corrected)
        if bias is None:
            node.resize_inputs(3)
        node.replace_input_with(2, value)
