"""Weights: where a linear node's weight comes from.

A weight is a float initializer, read directly or through a Transpose (exporters write a tied
LM head as ``MatMul(x, Transpose(embedding))``, and constant folding leaves a 28M-element
Transpose alone). Either way it is quantized per channel as a constant; a Transposed weight's
channel axis is mapped back through the permutation.

Its quantization (symmetric, per channel, INT8 or FP8) is :func:`onnxq.grids.quantize_weight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

# Float types onnxq quantizes (weights and activations).
FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


@dataclass
class WeightSource:
    initializer: ir.Value
    transpose: ir.Node | None = None  # the Transpose between the initializer and the node

    def initializer_axis(self, axis: int | None, rank: int) -> int | None:
        """Map a channel axis of the weight as the node sees it onto the initializer."""
        if axis is None:
            return None
        axis %= rank
        if self.transpose is None:
            return axis
        perm = self.transpose.attributes.get_ints("perm", list(range(rank))[::-1])
        return perm[axis]


def weight_source(value: ir.Value | None) -> WeightSource | None:
    """The float initializer behind ``value`` (directly or via one Transpose), or None."""
    if value is None or value.dtype not in FLOAT_TYPES:
        return None
    if value.const_value is not None:
        return WeightSource(value)
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.domain in ("", "ai.onnx"):
        src = producer.inputs[0]
        if src is not None and src.const_value is not None and src.dtype in FLOAT_TYPES:
            return WeightSource(src, producer)
    return None
