"""Run the non-quantized (high-precision) regions of a model in FP16, with explicit Casts.

Rule: every node of the main graph whose float tensors are FP32 runs in FP16, except the nodes
:func:`fp32_nodes` keeps in FP32; wherever an FP32 value meets an FP16 node (or the reverse) one
``Cast`` is inserted per value and direction, so the graph states every tensor's precision — a
strongly typed TensorRT build takes its precision from the graph alone. Float initializers read
by FP16 nodes get an FP16 copy. Graph inputs and outputs keep their FP32 type (Casts at the
border). Q/DQ nodes follow their site: a ``QuantizeLinear`` reading an FP16 tensor takes an FP16
scale, a ``DequantizeLinear`` feeding FP16 nodes outputs FP16 (opset 19 allows FP16 scales); a
scale that both an FP16 and an FP32 Q/DQ read is rounded to FP16 in both, so a Q and its DQ
always use the same scale. A Q/DQ whose scale is not an FP16 normal number stays in FP32.

Kept in FP32 (:func:`fp32_nodes`), because they overflow or lose accuracy in FP16 (measured with
ONNX Runtime on the zoo models, README "High-precision regions"):

- normalisation reductions: ``LayerNormalization`` / ``GroupNormalization`` /
  ``InstanceNormalization``, and the RMSNorm pattern ``Pow → ReduceMean → Add(eps) → Sqrt →
  Reciprocal`` (the mean of squares of a residual stream overflows FP16's 65504 early);
- ``Softmax`` / ``LogSoftmax`` and the element-wise chain producing their input (scale, mask
  ``Add``/``Where``) back to the MatMul: masks use values like -3.4e38;
- ``Sin`` / ``Cos`` and every float node their argument depends on (rotary embeddings: an angle
  of position × frequency near 100 keeps only ~0.06 resolution in FP16);
- nodes reading a float constant with finite values beyond FP16's range;
- where measured ranges are given (``ranges``: tensor -> largest |value| in FP32 on the
  calibration data), the producer and every reader of a tensor whose largest value exceeds
  half of FP16's 65504 (the margin covers data beyond the calibration set);
- ops whose float type comes from an attribute or a fixed-type input (``Cast``, ``CastLike``,
  ``ConstantOfShape``, ``Range``, ``Resize``, random ops, ...) and nodes with subgraphs.

Only the main graph is converted. The pass executes these rules only; extra node names to keep
in FP32 can be given.
"""

from __future__ import annotations

__all__ = ["CastFloat16Pass", "float_tensor_names", "fp32_nodes"]

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from onnxq.passes.initializers import add_initializer

FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal
_DEFAULT = ("", "ai.onnx")
FP16_QDQ_MIN_OPSET = 19

# Ops whose float types are fixed by an attribute or an input that must stay FP32.
_NOT_CONVERTIBLE = {
    "Cast", "CastLike", "ConstantOfShape", "Range", "Resize", "Upsample", "RandomNormal",
    "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "EyeLike",
    "Constant", "If", "Loop", "Scan",
}
_NORM_OPS = {"LayerNormalization", "GroupNormalization", "InstanceNormalization"}
_SOFTMAX_OPS = {"Softmax", "LogSoftmax"}
_TRIG_OPS = {"Sin", "Cos"}
# Element-wise ops between an attention MatMul and its Softmax (scaling, masking).
_SCORE_CHAIN = {"Add", "Sub", "Mul", "Div", "Where", "Neg", "Max", "Min", "Clip", "Tanh"}
# After the RMSNorm's ReduceMean, up to the multiplication with the normalised input.
_RMS_CHAIN = {"Add", "Sqrt", "Reciprocal"}


def _default(node: ir.Node) -> bool:
    return node.domain in _DEFAULT


def _float_values(node: ir.Node) -> list[ir.Value]:
    return [v for v in (*node.inputs, *node.outputs) if v is not None and v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)]


def _convertible(node: ir.Node) -> bool:
    if not _default(node) or node.op_type in _NOT_CONVERTIBLE:
        return False
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
        return False
    floats = _float_values(node)
    return bool(floats) and all(v.dtype == ir.DataType.FLOAT for v in floats)


def _only_consumer(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    return uses[0].node if len(uses) == 1 and not value.is_graph_output() else None


def _overflowing_constant(node: ir.Node) -> bool:
    for v in node.inputs:
        if v is None or v.const_value is None or v.dtype != ir.DataType.FLOAT:
            continue
        a = v.const_value.numpy()
        finite = a[np.isfinite(a)]
        if finite.size and float(np.abs(finite).max()) > FP16_MAX:
            return True
    return False


def _scale_fits(node: ir.Node) -> bool:
    """A Q/DQ's scale (input 1) is a constant of FP16 normal numbers."""
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    if scale is None or scale.const_value is None:
        return False
    s = np.abs(scale.const_value.numpy().astype(np.float64))
    return bool(((s >= FP16_TINY) & (s <= FP16_MAX)).all())


# A tensor whose measured largest |value| exceeds this stays FP32 (producer and readers).
OVERFLOW_LIMIT = FP16_MAX / 2


def float_tensor_names(graph: ir.Graph) -> list[str]:
    """Every FP32 tensor a node of the main graph produces: what ``ranges`` may cover."""
    return [o.name for n in graph for o in n.outputs if o.name and o.dtype == ir.DataType.FLOAT]


def fp32_nodes(graph: ir.Graph, ranges: Mapping[str, float] | None = None) -> dict[str, str]:
    """The nodes the rules keep in FP32, by name, with the reason (see the module docstring)."""
    keep: dict[str, str] = {}

    def add(node: ir.Node, reason: str) -> None:
        keep.setdefault(node.name, reason)

    for node in graph:
        for out in node.outputs:
            amax = (ranges or {}).get(out.name)
            if amax is not None and not amax <= OVERFLOW_LIMIT:
                reason = f"{out.name} reaches {amax:.4g} on the calibration data (FP16 max 65504)"
                add(node, reason)
                for use in out.uses():
                    add(use.node, reason)

    for node in graph:
        op = node.op_type
        if not _default(node):
            continue
        if op in _NORM_OPS:
            add(node, "normalisation reduction")
        elif op == "ReduceMean" and node.inputs[0] is not None and node.inputs[0].producer() is not None \
                and node.inputs[0].producer().op_type == "Pow":
            add(node.inputs[0].producer(), "RMSNorm: square")
            add(node, "RMSNorm: mean of squares")
            nxt = _only_consumer(node.outputs[0])
            while nxt is not None and nxt.op_type in _RMS_CHAIN:
                add(nxt, "RMSNorm: after the mean of squares")
                nxt = _only_consumer(nxt.outputs[0])
        elif op in _SOFTMAX_OPS:
            add(node, "softmax")
            todo, seen = [node.inputs[0]], set()
            while todo:
                v = todo.pop()
                p = v.producer() if v is not None else None
                if p is None or p.op_type not in _SCORE_CHAIN or id(p) in seen:
                    continue
                seen.add(id(p))
                add(p, f"input chain of softmax {node.name}")
                todo.extend(p.inputs)
        elif op in _TRIG_OPS:
            add(node, "rotary angle")
            todo, seen = list(node.inputs), set()
            while todo:
                v = todo.pop()
                p = v.producer() if v is not None else None
                if p is None or id(p) in seen or not any(o.dtype == ir.DataType.FLOAT for o in p.outputs):
                    continue
                seen.add(id(p))
                add(p, f"argument of {op} {node.name}")
                todo.extend(p.inputs)
        if _overflowing_constant(node):
            add(node, "reads a constant beyond FP16's range")
        if op in ("QuantizeLinear", "DequantizeLinear") and not _scale_fits(node):
            add(node, "Q/DQ scale is not an FP16 normal number")
    return keep


class CastFloat16Pass(ir.passes.InPlacePass):
    """Convert the FP32 regions of the main graph to FP16 with explicit Casts at their borders.

    Attributes:
        keep_fp32: names of extra nodes to keep in FP32.
        ranges: measured largest |value| per FP32 tensor (e.g. a calibration table's amax).
        rules: apply :func:`fp32_nodes` (off: everything convertible goes to FP16; used to
            measure what the rules buy).
    After the pass, ``kept`` maps each node kept in FP32 by a rule to its reason.
    """

    def __init__(
        self, keep_fp32: Iterable[str] = (), *, ranges: Mapping[str, float] | None = None, rules: bool = True
    ) -> None:
        super().__init__()
        self.keep_fp32 = set(keep_fp32)
        self.ranges = dict(ranges or {})
        self.rules = rules
        self.kept: dict[str, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        upgraded = False
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph):
            from onnxq.passes.opset import require_opset

            upgraded = require_opset(model, FP16_QDQ_MIN_OPSET)  # FP16 scales arrive in opset 19
        graph = model.graph
        self.kept = fp32_nodes(graph, self.ranges) if self.rules else {}
        self.kept.update({n: "asked" for n in self.keep_fp32 if n not in self.kept})
        nodes = list(graph)
        fp16 = {id(n) for n in nodes if _convertible(n) and n.name not in self.kept}
        # A DequantizeLinear runs in FP16 only if every reader does: its output is one tensor.
        for n in nodes:
            if n.op_type == "DequantizeLinear" and id(n) in fp16:
                readers = [u.node for u in n.outputs[0].uses()]
                if n.outputs[0].is_graph_output() or any(id(r) not in fp16 for r in readers):
                    fp16.discard(id(n))
        if not fp16:
            return ir.passes.PassResult(model, modified=upgraded)

        converted: set[int] = set()  # values that now hold FP16
        for n in nodes:
            if id(n) in fp16:
                for out in n.outputs:
                    if out.dtype == ir.DataType.FLOAT:
                        out.dtype = ir.DataType.FLOAT16
                        converted.add(id(out))
        self._to16: dict[int, ir.Value] = {}
        self._to32: dict[int, ir.Value] = {}
        self._graph = graph
        self._shared_scales(nodes, fp16)
        for n in nodes:
            for i, v in enumerate(n.inputs):
                if v is None:
                    continue
                if id(n) in fp16 and v.dtype == ir.DataType.FLOAT and id(v) not in converted:
                    n.replace_input_with(i, self._as16(v))
                elif id(n) not in fp16 and id(v) in converted:
                    n.replace_input_with(i, self._as32(v))
        for i, out in enumerate(list(graph.outputs)):
            if id(out) in converted:
                name = out.name
                out.name = f"{name}_fp16"
                cast = self._as32(out)
                cast.name = name
                graph.outputs[i] = cast
        return ir.passes.PassResult(model, modified=True)

    def _shared_scales(self, nodes: list[ir.Node], fp16: set[int]) -> None:
        """Round every Q/DQ scale that an FP16 Q/DQ reads to FP16 precision in place, so the FP32
        readers of the same scale (the other half of a pair) use the identical value."""
        for n in nodes:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and id(n) in fp16:
                scale = n.inputs[1]
                if scale.dtype == ir.DataType.FLOAT and scale.const_value is not None:
                    rounded = scale.const_value.numpy().astype(np.float16).astype(np.float32)
                    scale.const_value = ir.tensor(rounded, name=scale.name)

    def _insert(self, after: ir.Value, node: ir.Node) -> None:
        producer = after.producer()
        if producer is not None:
            self._graph.insert_after(producer, node)
        else:
            first = next(iter(self._graph), None)
            if first is None:
                self._graph.append(node)
            else:
                self._graph.insert_before(first, node)

    def _cast(self, value: ir.Value, dtype: ir.DataType, suffix: str) -> ir.Value:
        cast = ir.node("Cast", [value], {"to": dtype}, name=f"{value.name}_to_{suffix}")
        new = cast.outputs[0]
        new.name, new.dtype, new.shape = f"{value.name}_{suffix}", dtype, value.shape
        self._insert(value, cast)
        return new

    def _as16(self, value: ir.Value) -> ir.Value:
        if id(value) in self._to16:
            return self._to16[id(value)]
        if value.const_value is not None and value.producer() is None and not value.is_graph_input():
            with np.errstate(over="ignore"):  # only with rules off: beyond 65504 becomes ±inf, as a Cast does
                array = value.const_value.numpy().astype(np.float16)
            new = add_initializer(self._graph, f"{value.name}_fp16", array)
        else:
            new = self._cast(value, ir.DataType.FLOAT16, "fp16")
        self._to16[id(value)] = new
        return new

    def _as32(self, value: ir.Value) -> ir.Value:
        if id(value) not in self._to32:
            self._to32[id(value)] = self._cast(value, ir.DataType.FLOAT, "fp32")
        return self._to32[id(value)]
