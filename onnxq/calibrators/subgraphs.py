"""Observing tensors inside If/Loop/Scan bodies: promotion to outputs of the main graph.

ONNX Runtime returns only the main graph's outputs, and a value defined inside a control-flow body
cannot be one. So the collector computes a tensor's statistics (ReduceMin, ReduceMax, ...) inside
the body that defines it and carries each result out, one scope at a time:

- an ``If`` branch gets the result as an extra branch output; the other branch outputs an empty
  tensor of the same type (ONNX lets branch output shapes differ), so the If's extra output is
  empty on the samples where the branch did not run;
- a ``Loop`` or ``Scan`` body gets it as an extra scan output: the node's extra output stacks it
  over the iterations (empty for zero iterations).

The host reduces what arrives over its leading (iteration) axes and skips empty results
(:func:`reduce_promoted`). Why not inline a branch instead: the branch taken depends on the data
(Silero VAD picks one by sample rate), and an inlined Loop would need its trip count fixed.
Every change is recorded and undone after serialization (:class:`Promotion`), so the user's
model is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

CONTROL_FLOW_OPS = ("If", "Loop", "Scan")


def subgraph_owners(graph: ir.Graph) -> dict[int, tuple[ir.Node, str]]:
    """id(subgraph) -> (the node that owns it, its attribute name), at every depth."""
    owners: dict[int, tuple[ir.Node, str]] = {}
    for node in graph.all_nodes():
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                owners[id(attr.value)] = (node, attr.name)
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.value:
                    owners[id(g)] = (node, attr.name)
    return owners


def graph_path(graph: ir.Graph, owners: dict[int, tuple[ir.Node, str]]) -> str:
    """A readable scope of ``graph``: ``main`` or e.g. ``main/If_0.then_branch``."""
    parts = []
    while id(graph) in owners:
        node, attr = owners[id(graph)]
        parts.append(f"{node.name}.{attr}")
        graph = node.graph
    return "/".join(["main", *reversed(parts)])


class Promotion:
    """Extra outputs added to bodies and their owner nodes; :meth:`undo` removes them all."""

    def __init__(self, main: ir.Graph):
        self.main = main
        self.owners = subgraph_owners(main)
        self._graph_outputs: list[tuple[ir.Graph, int]] = []
        self._node_outputs: list[tuple[ir.Node, int]] = []
        self._nodes: list[tuple[ir.Graph, list[ir.Node]]] = []

    def add_nodes(self, graph: ir.Graph, nodes: list[ir.Node]) -> None:
        graph.extend(nodes)
        self._nodes.append((graph, nodes))

    def to_main(self, value: ir.Value) -> ir.Value:
        """``value`` (defined in ``value.graph``) carried out to the main graph."""
        graph = value.graph
        while graph is not self.main:
            node, attr = self.owners[id(graph)]
            value = self._one_scope(node, attr, graph, value)
            graph = node.graph
        return value

    def _one_scope(self, node: ir.Node, attr: str, body: ir.Graph, value: ir.Value) -> ir.Value:
        if node.op_type == "If":
            other = node.attributes["else_branch" if attr == "then_branch" else "then_branch"].value
            self._add_output(other, _empty(other, value, self))
        elif node.op_type == "Scan":
            for name in ("scan_output_axes", "scan_output_directions"):
                if name in node.attributes:  # one entry per scan output: the new one stacks on axis 0
                    node.attributes[name] = ir.AttrInt64s(name, [*node.attributes[name].value, 0])
        self._add_output(body, value)
        self._node_outputs.append((node, len(node.outputs)))
        node.resize_outputs(len(node.outputs) + 1)
        out = node.outputs[-1]
        out.name = f"{value.name}::{node.name}"
        out.dtype = value.dtype
        return out

    def _add_output(self, graph: ir.Graph, value: ir.Value) -> None:
        self._graph_outputs.append((graph, len(graph.outputs)))
        graph.outputs.append(value)

    def undo(self) -> None:
        for graph, size in reversed(self._graph_outputs):
            del graph.outputs[size:]
        for node, size in reversed(self._node_outputs):
            node.resize_outputs(size)
        for graph, nodes in reversed(self._nodes):
            graph.remove(nodes, safe=True)
        self._restore_scan_attributes()

    def _restore_scan_attributes(self) -> None:
        counts: dict[int, tuple[ir.Node, int]] = {}
        for node, size in self._node_outputs:
            counts[id(node)] = (node, counts.get(id(node), (node, 0))[1] + 1)
        for node, added in counts.values():
            for name in ("scan_output_axes", "scan_output_directions"):
                if node.op_type == "Scan" and name in node.attributes:
                    node.attributes[name] = ir.AttrInt64s(name, list(node.attributes[name].value)[:-added])


def _empty(graph: ir.Graph, like: ir.Value, promotion: Promotion) -> ir.Value:
    """An empty tensor of ``like``'s dtype, made by a Constant in ``graph`` (the untaken branch)."""
    dtype = like.dtype.numpy() if like.dtype is not None else np.float32
    node = ir.node("Constant", [], attributes={"value": ir.tensor(np.zeros((0,), dtype=dtype))}, name=f"onnxq_calib/empty/{like.name}/{len(graph.outputs)}")
    node.outputs[0].name = f"{like.name}::onnxq_empty{len(graph.outputs)}@{id(graph)}"
    node.outputs[0].dtype = like.dtype
    promotion.add_nodes(graph, [node])
    return node.outputs[0]


def reduce_promoted(array: np.ndarray, kind: str, channels: int | None = None) -> np.ndarray | None:
    """A promoted statistic reduced over its leading (iteration) axes; None when it is empty (the
    branch did not run). ``kind``: "min", "max" (scalars) or "channel_max"/"channel_min"
    (vectors of ``channels``)."""
    array = np.asarray(array)
    if array.size == 0:
        return None
    if kind in ("min", "max"):
        return array.min() if kind == "min" else array.max()
    flat = array.reshape(-1, channels)
    return flat.min(axis=0) if kind == "channel_min" else flat.max(axis=0)


def iter_graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """``graph`` and every subgraph in it, outermost first."""
    yield graph
    yield from graph.subgraphs()
