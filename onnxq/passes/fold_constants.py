"""Evaluate the parts of the graph that depend only on constants.

Rule: a node whose inputs are all initializers (or constants) is evaluated once, at
preprocessing time, and replaced by an initializer holding its result; shape-only computations
on inputs with static shapes (``Shape``, ``Size``, and the ``Gather``/``Concat``/``Reshape``
chains built on them) are folded the same way. Limits keep folding from materialising huge
tensors: a node is not folded if one of its constant inputs has more than ``input_size_limit``
elements (``Transpose`` of a single-use weight excepted), nor if its result has more than
``output_size_limit`` (4096) elements *and* is larger than the single-use inputs it replaces (so
a folded copy never sits beside a source that other nodes still read; so
``Cast``/``Reshape``/``Transpose`` of a weight fold; ``Expand``/``Tile`` of a scalar into a big
mask does not). ``ConstantOfShape``, ``QuantizeLinear``, ``DequantizeLinear`` and random ops are
never folded.

A graph input is never folded away: the model's signature and the meaning of every input are
kept. That includes initializers also listed as graph inputs (values the caller may override):
while the folder runs, their values are hidden from it, so nothing computed from them becomes a
constant, and they stay registered as initializers.

Built on onnxscript's constant folder (:func:`onnxscript.optimizer.fold_constants`), with its
node-level shape inference on, so that shapes propagate forward as nodes are folded. Folded
results become initializers, except that the folder's ``Shape``/``Size`` rules emit ``Constant``
nodes and that it leaves the nodes it made dead in place: the pass therefore lifts constants
(:class:`~onnxq.passes.lift_constants.LiftConstantsPass`) and removes unused nodes
(:class:`onnx_ir.passes.common.RemoveUnusedNodesPass`) after folding. Values are computed by
``onnx.reference`` on numpy.
"""

from __future__ import annotations

__all__ = ["FoldConstantsPass"]

import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxq.errors import UnsupportedModelError
from onnxq.passes.lift_constants import LiftConstantsPass

#: A folded result of more elements than this is kept only when it replaces single-use inputs at
#: least as large (onnxscript's rule), so the model does not grow: a weight read by two branches
#: (Silero VAD's LSTM weights, sliced and unsqueezed in both branches of an If) is not stored
#: again as a folded copy beside its original (which grew that model from 1.29 to 1.80 MB at the
#: former 1 Mi-element limit). Shape arithmetic stays far below it.
DEFAULT_OUTPUT_SIZE_LIMIT = 4096
#: Nodes with a constant input above this many elements are not evaluated (4 MiB of float32).
DEFAULT_INPUT_SIZE_LIMIT = 1 << 20


class FoldConstantsPass(ir.passes.InPlacePass):
    """Fold constant subgraphs into initializers, within size limits.

    Attributes:
        input_size_limit: Skip nodes with a constant input of more elements than this.
        output_size_limit: Skip nodes whose result has more elements than this and grows the model.
        shape_inference: Run onnx's node-level shape inference while folding.
    """

    def __init__(
        self,
        *,
        input_size_limit: int = DEFAULT_INPUT_SIZE_LIMIT,
        output_size_limit: int = DEFAULT_OUTPUT_SIZE_LIMIT,
        shape_inference: bool = True,
    ) -> None:
        super().__init__()
        self.input_size_limit = input_size_limit
        self.output_size_limit = output_size_limit
        self.shape_inference = shape_inference

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # Initializers that are also graph inputs: hide their values so no folding rule
        # (including the partial evaluators for Identity, If, Reshape, ...) treats them as constant.
        overridable = [
            (graph, value, value.const_value)
            for graph in model.graphs()
            for value in graph.inputs
            if value.is_initializer() and value.const_value is not None
        ]
        for _, value, _ in overridable:
            value.const_value = None
        try:
            result = onnxscript.optimizer.fold_constants(
                model,
                onnx_shape_inference=self.shape_inference,
                input_size_limit=self.input_size_limit,
                output_size_limit=self.output_size_limit,
            )
        except RuntimeError as exc:
            cause = exc.__cause__ or exc
            raise UnsupportedModelError(
                f"constant folding failed: {exc} ({type(cause).__name__}: {cause}); check that "
                "the model runs in onnxruntime, or run the other preprocessing passes without "
                "FoldConstantsPass"
            ) from exc
        finally:
            for graph, value, tensor in overridable:
                value.const_value = tensor
                if value.name not in graph.initializers:
                    graph.register_initializer(value)
        if not result.modified:
            return ir.passes.PassResult(model, modified=False)
        RemoveUnusedNodesPass()(model)
        LiftConstantsPass()(model)
        return ir.passes.PassResult(model, modified=True)
