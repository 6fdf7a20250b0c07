"""Layers for mixed precision: the groups of plan nodes that must share one precision.

A *layer* is what the sensitivity sweep measures and the solver assigns a precision to. Plan nodes
are joined into one layer when
- they read the same quantized activation tensor (Q, K and V projections of one LayerNorm output;
  gate and up projections): the Q/DQ pass gives a tensor one Q/DQ pair for all its quantized
  readers, and TensorRT fuses such readers on one quantized tensor, so splitting them would need a
  second quantizer per tensor and would lose the fusion;
- they read the same quantized weight (one integer copy per weight);
- one is a placement companion of the other: a Pad whose input carries its Conv's activation Q/DQ,
  a residual Add whose skip-branch Q/DQ exists so TensorRT fuses it into a quantized Conv.
A node the layer keeps in float reads the original float tensor, so float and 8-bit layers can
share a tensor freely. A layer is named after its first linear node in graph order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx_ir as ir

from onnxq.ops import LINEAR_OPS
from onnxq.plan import QuantPlan
from onnxq.weights import weight_source


@dataclass
class Layer:
    name: str
    nodes: list[str]
    op_types: list[str]
    # Costs per sample, from the shapes the model runs with (filled by :func:`onnxq.mixed_precision.costs.fill_costs`):
    macs: int = 0
    matmul_macs: int = 0  # the part of ``macs`` in MatMul/Gemm
    # MatMul MACs that stay float whatever the layer's precision: the side products of split
    # outlier channels and the MatMuls an online rotation inserts before the layer's nodes
    float_side_macs: int = 0
    weight_elements: int = 0
    activation_elements: int = 0  # quantized activation inputs of the layer's linear nodes
    output_elements: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_json(cls, d: dict) -> Layer:
        return cls(**{k: d[k] for k in ("name", "nodes", "op_types", "macs", "matmul_macs", "weight_elements", "activation_elements", "output_elements")}, float_side_macs=d.get("float_side_macs", d.get("split_macs", 0)))


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def layer_groups(model: ir.Model, plan: QuantPlan) -> list[Layer]:
    """The layers of ``plan``'s quantized nodes, in graph order (see the module docstring)."""
    by_name = {n.name: n for n in model.graph}
    order = {n.name: i for i, n in enumerate(model.graph)}
    quantized = [name for name in plan.quantized_nodes() if name in by_name]
    uf = _UnionFind()
    by_tensor: dict[str, str] = {}
    for name in quantized:
        node = by_name[name]
        uf.find(name)
        for index, kind in plan.nodes[name].inputs.items():
            value = node.inputs[index]
            if value is None:
                continue
            key = value.name
            if kind == "weight":
                source = weight_source(value)
                key = "weight:" + (source.initializer.name if source else value.name)
            if key in by_tensor:
                uf.union(by_tensor[key], name)
            else:
                by_tensor[key] = name
        if node.op_type == "Pad":  # its Q/DQ is the Conv's activation quantizer
            for use in node.outputs[0].uses():
                if use.node.name in plan.nodes and plan.nodes[use.node.name].quantized:
                    uf.union(use.node.name, name)
        if node.op_type == "Add":  # a residual Add fused into the Conv that feeds its other branch
            for index, value in enumerate(node.inputs):
                producer = value.producer() if value is not None else None
                if index not in plan.nodes[name].inputs and producer is not None and producer.name in quantized:
                    uf.union(producer.name, name)
    groups: dict[str, list[str]] = {}
    for name in sorted(quantized, key=order.__getitem__):
        groups.setdefault(uf.find(name), []).append(name)
    layers = []
    for members in groups.values():
        linear = [m for m in members if by_name[m].op_type in LINEAR_OPS] or members
        layers.append(Layer(name=linear[0], nodes=members, op_types=[by_name[m].op_type for m in members]))
    layers.sort(key=lambda layer: order[layer.name])
    return layers
