"""New constant tensors for the rewriting passes: one way to register an initializer."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.errors import PlanError
from onnxq.weights import weight_source


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as initializer ``name`` of ``graph`` (dtype and shape from the array)."""
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.dtype = value.const_value.dtype
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def constant_as_read(node: ir.Node, index: int, what: str) -> np.ndarray:
    """Input ``index`` of ``node``, a float constant read directly or through a Transpose, as the
    node reads it. ``what`` names the rewrite in the error (the plan does not fit the model)."""
    source = weight_source(node.inputs[index])
    if source is None:
        raise PlanError(f"input {index} of {node.name!r} is not a float constant; {what} cannot fold into it")
    array = source.initializer.const_value.numpy()
    if source.transpose is not None:
        array = np.transpose(array, source.transpose.attributes.get_ints("perm", list(range(array.ndim))[::-1]))
    return array


def replace_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, suffix: str) -> None:
    """Input ``index`` of ``node`` becomes ``array`` (as the node reads it): in place when the
    initializer is the node's alone, else as a new initializer ``<node>/<initializer>_<suffix>``
    of this node, so every other reader keeps the original."""
    source = weight_source(node.inputs[index])
    init = source.initializer
    private = source.transpose is None and len(init.uses()) == 1 and not init.is_graph_input() and not init.is_graph_output()
    if private:
        init.const_value = ir.tensor(array, name=init.name)
        init.shape = ir.Shape(array.shape)
        return
    node.replace_input_with(index, add_initializer(graph, f"{node.name}/{init.name}_{suffix}", array))
    transpose = source.transpose
    if transpose is not None and not transpose.outputs[0].uses() and not transpose.outputs[0].is_graph_output():
        graph.remove(transpose, safe=True)  # a dead Transpose would keep the original (an LM head's 28M table) alive


def drop_unused_initializers(graph: ir.Graph) -> None:
    """Initializers no node reads any more (the originals of rewritten copies)."""
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_input() and not v.is_graph_output()]:
        graph.initializers.pop(name)
