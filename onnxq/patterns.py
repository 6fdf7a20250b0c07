"""Declared graph patterns (onnxscript's pattern matcher) for structures several decisions read.

One home for recognising a decomposed normalisation: the FP16 regions keep its statistics in
FP32 (:mod:`onnxq.placement.fp16`), SmoothQuant reports that a scale went into a norm
(:mod:`onnxq.smoothquant`), and rotations will fold into norms.

``norm_statistics`` matches the root mean square every exporter spells as
``Sqrt(Add(ReduceMean(Pow(x, 2)), eps))`` — RMSNorm's ``rms(x)`` and LayerNorm's standard
deviation alike — optionally followed by its ``Reciprocal``; the normalised tensor is then
``x / rms`` or ``x * (1 / rms)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnxscript.rewriter import pattern


def _root_mean_square(op, x, exponent, eps):
    mean = op.ReduceMean(op.Pow(x, exponent), _allow_other_inputs=True, _allow_other_attributes=True)
    return op.Sqrt(op.Add(mean, eps))


_RMS = pattern.Pattern(_root_mean_square, name="RootMeanSquare")


@dataclass
class NormStatistic:
    """A matched ``Sqrt(Add(ReduceMean(Pow(x, 2)), eps))`` and the Reciprocal that may follow."""

    nodes: list[ir.Node]  # Pow, ReduceMean, Add, Sqrt (graph order)
    reciprocal: ir.Node | None

    @property
    def outputs(self) -> list[ir.Value]:
        """The values a normalised tensor divides by (the rms) or multiplies with (its inverse)."""
        return [self.nodes[-1].outputs[0], *([self.reciprocal.outputs[0]] if self.reciprocal else [])]


def _is_square(match) -> bool:
    exponent = match.bindings.get("exponent")
    value = exponent.const_value if isinstance(exponent, ir.Value) else None
    return value is not None and value.numpy().size == 1 and float(value.numpy().reshape(-1)[0]) == 2.0


def norm_statistics(graph: ir.Graph | ir.Model) -> list[NormStatistic]:
    """Every root-mean-square statistic of the (main) graph."""
    graph = graph.graph if isinstance(graph, ir.Model) else graph
    found = []
    for node in graph:
        if node.op_type != "Sqrt":
            continue
        # the matcher takes the model too but does not use it (onnxscript's own TODO says so)
        match = _RMS.match(None, graph, node, check_nodes_are_removable=False)
        if match is None or not _is_square(match):
            continue
        uses = node.outputs[0].uses()
        reciprocal = uses[0].node if len(uses) == 1 and uses[0].node.op_type == "Reciprocal" else None
        order = {"Pow": 0, "ReduceMean": 1, "Add": 2, "Sqrt": 3}
        found.append(NormStatistic(sorted(match.nodes, key=lambda n: order[n.op_type]), reciprocal))
    return found


def normalized_by(value: ir.Value, statistics: list[NormStatistic]) -> bool:
    """``value`` is a normalised tensor: ``x / rms`` or ``x * (1 / rms)`` of a matched statistic,
    or the output of a normalisation op."""
    producer = value.producer()
    if producer is None:
        return False
    if producer.op_type.endswith("Normalization"):
        return True
    if producer.op_type not in ("Div", "Mul"):
        return False
    divisors = {id(v) for s in statistics for v in s.outputs}
    # x / rms, or x * (1 / rms) in either operand order
    candidates = producer.inputs[1:] if producer.op_type == "Div" else producer.inputs
    return any(i is not None and id(i) in divisors for i in candidates)
