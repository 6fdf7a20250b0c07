"""The layers of an ONNX graph as quantization sees them: each compute node with its precision.

Rule: QuantizeLinear, DequantizeLinear and Cast are not layers; they are looked through. Each other
node is a layer whose inputs are traced back through them to the tensor they carry (an activation,
a graph input, an initializer). A layer's precision comes from the Q/DQ pairs on its inputs —
the quantized dtype (the zero point's dtype, else Q's ``output_dtype``, else the DQ input's type):
int8/uint8 → ``INT8``, int4/uint4 → ``INT4``, float8 → ``FP8`` (weights first, then activations)
— and otherwise from the float type it computes in: float16 (a Cast-to-FP16 region) → ``FP16``,
bfloat16 → ``BF16``, float → ``FP32``. Nodes that compute on no float tensor (shape arithmetic,
index ops) are ``-``.

ONNX Runtime's ``com.microsoft::MatMulNBits`` is a layer like the MatMul it replaces: its packed
weight reads as the weight input of a MatMul (``[K, N]``, blocks along axis 0: ``INT4``/``INT8``
with no zero-point input — the kernel's implicit ``2^(bits-1)`` — else ``UINT4``/``UINT8`` with
the zero points), its precision is the weight's, and it counts as a MatMul.

MACs are counted for Conv, ConvTranspose, MatMul, Gemm and MatMulNBits from inferred shapes;
dynamic dimensions count as given in ``dims`` (default 1 each).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.ops import LINEAR_OPS, linear_macs

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
LOOK_THROUGH = (*QDQ_OPS, "Cast")
PRECISIONS = ("INT4", "INT8", "FP8", "FP16", "BF16", "FP32")

_QUANT_PRECISION = {
    ir.DataType.INT8: "INT8", ir.DataType.UINT8: "INT8",
    ir.DataType.INT4: "INT4", ir.DataType.UINT4: "INT4",
    ir.DataType.FLOAT8E4M3FN: "FP8", ir.DataType.FLOAT8E4M3FNUZ: "FP8",
    ir.DataType.FLOAT8E5M2: "FP8", ir.DataType.FLOAT8E5M2FNUZ: "FP8",
}
_FLOAT_PRECISION = {ir.DataType.FLOAT: "FP32", ir.DataType.FLOAT16: "FP16", ir.DataType.BFLOAT16: "BF16",
                    ir.DataType.DOUBLE: "FP64"}


# ONNX Runtime's blocked 4/8-bit MatMul, as a layer's op_type (counted with the MatMuls)
NBITS_OP = "com.microsoft::MatMulNBits"


def _domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


@dataclass
class QuantParams:
    """One DequantizeLinear on a layer input (with its QuantizeLinear for activations)."""

    kind: str  # "weight" / "bias" (DQ of a constant; int32: a bias) or "activation" (DQ of a Q)
    dtype: str  # the quantized type, e.g. "INT8", "UINT8", "FLOAT8E4M3FN"
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int | None
    source: str  # the float tensor (activation) or the integer initializer (weight)
    block_size: int = 0  # blocked quantization (opset 21): scale has the input's rank

    @property
    def precision(self) -> str:
        return _QUANT_PRECISION.get(ir.DataType[self.dtype], self.dtype)

    def same_as(self, other: QuantParams) -> bool:
        return (self.kind, self.dtype, self.axis, self.block_size) == (
            other.kind, other.dtype, other.axis, other.block_size) and _equal(
            self.scale, other.scale) and _equal(self.zero_point, other.zero_point)

    def to_json(self) -> dict:
        return {"kind": self.kind, "dtype": self.dtype.lower(), "axis": self.axis, "block_size": self.block_size or None,
                "source": self.source,
                "scale": summarize(self.scale), "zero_point": summarize(self.zero_point)}


@dataclass
class LayerInput:
    index: int
    source: str  # name of the tensor after looking through Q/DQ/Cast
    producer: str | None  # the layer (node name) that produces it, None for graph inputs/constants
    quant: QuantParams | None = None
    constant: np.ndarray | None = None  # the float value of a constant input (dequantized if quantized)
    casts: tuple[str, ...] = ()  # Cast target types looked through, nearest first


@dataclass
class Layer:
    name: str
    op_type: str
    precision: str
    attributes: dict[str, object]
    inputs: list[LayerInput]
    output_shapes: list[list]
    macs: int = 0
    extra: dict[str, object] = field(default_factory=dict)


@dataclass
class GraphLayers:
    layers: dict[str, Layer]  # node name -> layer, in graph order
    qdq_nodes: dict[str, int]  # "Q INT8" / "DQ FP8" / "Cast FLOAT16" -> count
    model: ir.Model

    def macs_by_precision(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers.values():
            if layer.macs:
                out[layer.precision] = out.get(layer.precision, 0) + layer.macs
        return dict(sorted(out.items(), key=lambda kv: precision_order(kv[0])))

    def layers_by_precision(self, ops=LINEAR_OPS) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers.values():
            if layer.op_type in ops or (layer.op_type == NBITS_OP and "MatMul" in ops):
                out[layer.precision] = out.get(layer.precision, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: precision_order(kv[0])))


def precision_order(p: str) -> int:
    return PRECISIONS.index(p) if p in PRECISIONS else len(PRECISIONS)


def summarize(arr: np.ndarray | None) -> object:
    """A scalar as a number; a vector as {n, min, max, mean}."""
    if arr is None:
        return None
    a = np.asarray(arr)
    if a.size == 1:
        v = a.reshape(()).item()
        return float(v) if isinstance(v, float) else int(v) if isinstance(v, (int, np.integer)) else float(a.astype(np.float64))
    af = a.astype(np.float64)
    return {"n": int(a.size), "min": float(af.min()), "max": float(af.max()), "mean": float(af.mean())}


def _equal(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and _domain(producer):
        attr = producer.attributes.get("value")
        if attr is not None:
            return attr.as_tensor().numpy()
    return None


def _quant_dtype(q_value: ir.Value, zero: ir.Value | None, q_node: ir.Node | None) -> ir.DataType:
    if zero is not None and zero.dtype is not None:
        return zero.dtype
    if q_value.dtype is not None:
        return q_value.dtype
    if q_node is not None:
        attr = q_node.attributes.get("output_dtype")
        if attr is not None and attr.value:
            return ir.DataType(attr.value)
    return ir.DataType.UINT8  # ONNX's default when no zero point says otherwise


def _dequant_params(dq: ir.Node) -> QuantParams:
    q_value = dq.inputs[0]
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    q_node = q_value.producer() if q_value is not None else None
    q_node = q_node if q_node is not None and q_node.op_type == "QuantizeLinear" else None
    dtype = _quant_dtype(q_value, zero, q_node)
    scale = _const(dq.inputs[1])
    zp = _const(zero)
    axis = dq.attributes.get_int("axis", 1) if scale is not None and scale.ndim >= 1 and scale.size > 1 else None
    block = dq.attributes.get_int("block_size", 0)
    if q_node is not None:
        kind, source = "activation", (q_node.inputs[0].name if q_node.inputs[0] is not None else "")
    else:
        # a constant int32 DQ is a bias on the accumulator's grid (ORT's QGemm/QLinearConv form)
        constant_kind = "bias" if dtype == ir.DataType.INT32 else "weight"
        kind, source = (constant_kind if _const(q_value) is not None else "activation"), q_value.name
    return QuantParams(kind, dtype.name, scale if scale is not None else np.array(np.nan), zp, axis, source, block)


def _dequantize(q: np.ndarray, p: QuantParams) -> np.ndarray:
    scale = np.asarray(p.scale, dtype=np.float64)
    zp = np.asarray(p.zero_point if p.zero_point is not None else 0).astype(np.float64)
    if p.block_size and p.axis is not None and scale.ndim == q.ndim:
        axis = p.axis % q.ndim
        scale = np.repeat(scale, p.block_size, axis=axis).take(range(q.shape[axis]), axis=axis)
        zp = np.repeat(zp, p.block_size, axis=axis).take(range(q.shape[axis]), axis=axis) if zp.ndim == q.ndim else zp
    elif p.axis is not None and scale.ndim == 1:
        shape = [1] * q.ndim
        shape[p.axis % q.ndim] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape) if zp.ndim == 1 else zp
    return ((q.astype(np.float64) - zp) * scale).astype(np.float32)


def _trace(value: ir.Value | None, index: int) -> LayerInput:
    """Follow ``value`` back through DQ, Q and Cast to the tensor it carries."""
    quant, casts, constant = None, [], None
    seen = 0
    while value is not None and seen < 16:
        seen += 1
        producer = value.producer()
        if producer is None or producer.op_type not in LOOK_THROUGH or not _domain(producer):
            break
        if producer.op_type == "DequantizeLinear":
            params = _dequant_params(producer)
            if quant is None:
                quant = params
                q_arr = _const(producer.inputs[0])
                if q_arr is not None:
                    constant = _dequantize(q_arr, params)
        elif producer.op_type == "Cast":
            to = producer.attributes.get_int("to", 0)
            casts.append(ir.DataType(to).name if to else "?")
        value = producer.inputs[0]
    if value is None:
        return LayerInput(index, "", None, quant, constant, tuple(casts))
    if constant is None:
        arr = _const(value)
        if arr is not None and arr.dtype.kind == "f":
            constant = arr
    producer = value.producer()
    prod_name = None
    if producer is not None and not (producer.op_type == "Constant" and _domain(producer)):
        prod_name = producer.name
    return LayerInput(index, value.name or "", prod_name, quant, constant, tuple(casts))


def _dim(d, dims: Mapping[str, int]) -> int:
    if isinstance(d, int):
        return d
    return int(dims.get(str(d), 1))


def _shape(value: ir.Value | None, dims) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    return [_dim(d, dims) for d in value.shape]


def _macs(node: ir.Node, dims: Mapping[str, int]) -> int:
    if node.op_type not in LINEAR_OPS or not node.outputs:
        return 0
    a = _shape(node.inputs[0], dims) if node.inputs else None
    w = _shape(node.inputs[1], dims) if len(node.inputs) > 1 else None
    return linear_macs(node, a, w, _shape(node.outputs[0], dims))


def _nbits_weight(node: ir.Node) -> LayerInput:
    """MatMulNBits' packed weight (input 1) as the weight input of the MatMul it computes:
    ``[K, N]`` values, scales and zero points per block along axis 0, and the float weight."""
    a = node.attributes
    k, n, bits, block = a.get_int("K"), a.get_int("N"), a.get_int("bits", 4), a.get_int("block_size")
    packed, scale = _const(node.inputs[1]), _const(node.inputs[2])
    zero_value = node.inputs[3] if len(node.inputs) > 3 else None
    zero = _const(zero_value)
    if packed is None or scale is None or (zero_value is not None and zero is None) or packed.dtype != np.uint8:
        return _trace(node.inputs[1], 1)
    blocks = -(-k // block)
    q = _unpack(packed.reshape(n, -1), bits)[:, :k].T.astype(np.int32)
    if zero is None:  # implicit zero point 2^(bits-1): the signed grid
        dtype, q = ("INT4" if bits == 4 else "INT8"), q - (1 << (bits - 1))
    else:  # packed uint8 zero points, or unpacked ones in the activation's float type
        dtype = "UINT4" if bits == 4 else "UINT8"
        zero = (_unpack(zero.reshape(n, -1), bits) if zero.dtype == np.uint8 else zero.reshape(n, -1))[:, :blocks].T
    params = QuantParams("weight", dtype, scale.reshape(n, blocks).T, zero, 0, node.inputs[1].name, block)
    return LayerInput(1, node.inputs[1].name, None, params, _dequantize(q, params))


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values packed along the last axis as MatMulNBits packs them (4-bit: low nibble first)."""
    flat = packed.reshape(packed.shape[0], -1)
    if bits == 8:
        return flat
    return np.stack([flat & 0xF, flat >> 4], axis=-1).reshape(flat.shape[0], -1)


def _nbits_macs(node: ir.Node, dims: Mapping[str, int]) -> int:
    """M·K·N of a MatMulNBits: every dimension of its input but the last, times K and N."""
    a = _shape(node.inputs[0], dims)
    if a is None:
        return 0
    return int(np.prod(a[:-1], dtype=np.int64)) * node.attributes.get_int("K") * node.attributes.get_int("N")


def _precision(node: ir.Node, inputs: list[LayerInput]) -> str:
    weights = [i.quant for i in inputs if i.quant is not None and i.quant.kind == "weight"]
    acts = [i.quant for i in inputs if i.quant is not None and i.quant.kind == "activation"]
    if weights or acts:
        return (weights or acts)[0].precision
    for value in list(node.inputs) + list(node.outputs):
        if value is not None and value.dtype in _FLOAT_PRECISION:
            return _FLOAT_PRECISION[value.dtype]
    return "-"


def _attr_value(attr: ir.Attr) -> object:
    v = attr.value
    if isinstance(v, (ir.TensorProtocol,)):
        return f"tensor{list(v.shape)}"
    if isinstance(v, ir.Graph):
        return "<graph>"
    if isinstance(v, (list, tuple)):
        return [x if isinstance(x, (int, float, str)) else str(x) for x in v]
    return v if isinstance(v, (int, float, str)) else str(v)


def shape_list(shape: ir.Shape | None) -> list | None:
    """Static dims as ints, symbolic ones by name (``?`` when unnamed)."""
    if shape is None:
        return None
    return [d if isinstance(d, int) else (str(d.value) if getattr(d, "value", None) else "?") for d in shape]


def load_model(model: str | os.PathLike | ir.Model) -> ir.Model:
    from onnxq import modelio

    return model if isinstance(model, ir.Model) else modelio.load(model)


def graph_layers(model: str | os.PathLike | ir.Model, dims: Mapping[str, int] | None = None) -> GraphLayers:
    """The layers of ``model`` (a path or an ir.Model; a path's file is only read)."""
    from onnxq.passes.shape_inference import InferShapesPass

    model = load_model(model)
    dims = dict(dims or {})
    InferShapesPass()(model)
    layers: dict[str, Layer] = {}
    qdq: dict[str, int] = {}
    unnamed = 0
    for node in model.graph:
        if node.op_type in LOOK_THROUGH and _domain(node):
            if node.op_type == "Cast":
                to = node.attributes.get_int("to", 0)
                key = f"Cast {ir.DataType(to).name if to else '?'}"
            else:
                params = _dequant_params(node) if node.op_type == "DequantizeLinear" else None
                dtype = params.precision if params else _QUANT_PRECISION.get(
                    _quant_dtype(node.outputs[0], node.inputs[2] if len(node.inputs) > 2 else None, node), "?")
                key = f"{'Q' if node.op_type == 'QuantizeLinear' else 'DQ'} {dtype}"
            qdq[key] = qdq.get(key, 0) + 1
            continue
        if node.op_type == "Constant" and _domain(node):
            continue
        name = node.name
        if not name:
            unnamed += 1
            name = f"<{node.op_type} #{unnamed}>"
        nbits = node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
        inputs = [_trace(v, i) for i, v in enumerate(node.inputs)]
        if nbits:  # A, the weight as a MatMul's, then the bias when there is one
            inputs = [inputs[0], _nbits_weight(node), *([_trace(node.inputs[5], 2)] if len(node.inputs) > 5 and node.inputs[5] is not None else [])]
        layers[name] = Layer(
            name=name, op_type=node.op_type if _domain(node) else f"{node.domain}::{node.op_type}",
            precision=_precision(node, inputs),
            attributes={k: _attr_value(a) for k, a in sorted(node.attributes.items())},
            inputs=inputs, output_shapes=[shape_list(o.shape) for o in node.outputs],
            macs=_nbits_macs(node, dims) if nbits else _macs(node, dims),
        )
    return GraphLayers(layers, dict(sorted(qdq.items())), model)
