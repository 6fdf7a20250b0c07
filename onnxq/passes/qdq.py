"""Insert QuantizeLinear/DequantizeLinear pairs as a QuantPlan says.

Rule: for every quantized node in the plan, at the node's precision (INT8 or FP8 E4M3FN),
- each input marked ``activation`` is read through one Q→DQ pair per tensor and precision
  (shared by every consumer of that precision the plan names, so a LayerNorm output feeding Q,
  K and V gets one pair; a tensor read by an INT8 and an FP8 node gets two), with the scale and
  zero point the plan holds for that tensor at that precision;
- each input marked ``weight`` is replaced by a quantized initializer (``int8``, or
  ``float8e4m3fn`` for FP8 nodes) and a DequantizeLinear (symmetric, per channel on the plan's
  axis, zero point 0 of the same dtype); the float initializer is removed when nothing else
  reads it;
- a weight-only node (precision ``w4`` / ``w8``) has only its weight input quantized, in blocks
  along the plan's axis (opset 21 ``block_size``): INT4/INT8 with no zero point (symmetric), or
  UINT4/UINT8 with a zero point per block; INT4 initializers hold two values per byte, low
  nibble first. The weight is quantized as the node reads it (through a Transpose);
- a weight-only embedding Gather (ort target) becomes ``com.microsoft::GatherBlockQuantized`` on
  the blocked UINT4/UINT8 table;
- an input marked ``bias`` (ort target, a Gemm at INT8) is replaced by an int32 initializer and
  a DequantizeLinear at scale = the node's activation scale × its weight scale per output channel
  (from the plan's entries for inputs 0 and 1), which ORT needs to run DQ→Gemm as QGemm (a float
  bias leaves it a float Gemm); only an INT8 node has one (:func:`onnxq.plan.inputs_at`);
- each tensor in ``plan.outputs`` gets the same Q→DQ pair (at the plan's precision) for all of
  its consumers.
FP8 Q/DQ exists from opset 19: a plan with an FP8 node first raises the model's opset to 19
(:class:`~onnxq.passes.opset.UpgradeOpsetPass`, then lifting the constants a converter may emit).
The pass executes the plan only: it makes no placement decision of its own.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.calibrators.subgraphs import iter_graphs, subgraph_owners
from onnxq.errors import PlanError
from onnxq.gptq import apply_offsets
from onnxq.grids import CLIP_RATIOS, GRIDS, WEIGHT_GRIDS, channel_scales, quantize_bias, quantize_blocked, quantize_weight
from onnxq.passes.initializers import add_initializer
from onnxq.plan import FP8_DTYPE, WEIGHT_DTYPE, WEIGHT_ONLY_PRECISIONS, ActivationQuant, NodeDecision, QuantPlan, WeightQuant, activation_precision
from onnxq.weights import weight_source

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops (GatherBlockQuantized)
# FP8 QuantizeLinear/DequantizeLinear arrive in opset 19.
FP8_MIN_OPSET = 19
_NP_FLOAT = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


class InsertQDQPass(ir.passes.InPlacePass):
    def __init__(self, plan: QuantPlan):
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        if self.plan.uses_fp8():
            from onnxq.passes.opset import require_opset

            modified = require_opset(model, FP8_MIN_OPSET)
        graph = model.graph
        self._graph, self._model = graph, model
        self._activation_dq: dict[tuple[str, str], ir.Value] = {}
        self._weight_dq: dict[tuple[str, str], ir.Value] = {}
        self._qdq_nodes: set[int] = set()
        self._owners = subgraph_owners(graph)
        by_name = {node.name: node for node in graph.all_nodes()}
        for name, decision in self.plan.nodes.items():
            if not decision.quantized or "dynamic" in decision.inputs.values():
                continue  # a dynamic node: DynamicQuantizePass rewrote it
            node = by_name.get(name)
            if node is None:
                raise PlanError(f"the plan names node {name!r}, which the model does not have; was the plan made for another model?")
            if node.op_type == "Gather" and decision.precision in WEIGHT_ONLY_PRECISIONS:
                source = weight_source(node.inputs[0])
                self._quantized_gather(node)
                _release_if_unused(source)
                modified = True
                continue
            # from the float weight, before its quantized copy replaces (and frees) it
            bias_scale = self._accumulator_scale(node, decision) if "bias" in decision.inputs.values() else None
            for index, kind in sorted(decision.inputs.items()):
                if index >= len(node.inputs) or node.inputs[index] is None:
                    raise PlanError(f"the plan quantizes input {index} of {name!r}, which has no such input")
                value = node.inputs[index]
                if kind == "activation":
                    node.replace_input_with(index, self._activation(value, activation_precision(decision.precision), node.graph))
                elif kind == "weight" and decision.precision in WEIGHT_ONLY_PRECISIONS:
                    node.replace_input_with(index, self._blocked_weight(value, name, index, node.graph))
                    _release_if_unused(weight_source(value))
                elif kind == "weight":
                    node.replace_input_with(index, self._weight(value, decision.precision, name, index, node.graph))
                    _release_if_unused(weight_source(value))
                elif kind == "bias":
                    node.replace_input_with(index, self._int32_bias(node, index, bias_scale))
                    _release_if_unused(weight_source(value))
                else:
                    raise PlanError(f"input kind {kind!r} of node {name!r} is not one onnxq knows")
                modified = True
        values = {v.name: v for n in graph.all_nodes() for v in n.outputs}
        values.update({v.name: v for v in graph.inputs})
        for tensor in self.plan.outputs:
            value = values.get(tensor)
            if value is None:
                raise PlanError(f"the plan quantizes tensor {tensor!r}, which the model does not produce")
            dq = self._activation(value, self.plan.precision, value.graph or graph)
            for use in list(value.uses()):
                if id(use.node) not in self._qdq_nodes:
                    use.node.replace_input_with(use.idx, dq)
            modified = True
        for g in iter_graphs(graph):
            for name in [n for n, v in g.initializers.items() if not v.uses() and not v.is_graph_input()]:
                g.initializers.pop(name)
        return ir.passes.PassResult(model, modified)

    # ------------------------------------------------------------------------------------------
    def _constant(self, name: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self._graph, name, array)

    def _insert(self, after: ir.Value, nodes: list[ir.Node], graph: ir.Graph) -> None:
        """Put ``nodes`` into ``graph`` (the reader's graph) right after ``after``'s producer, or
        first when ``after`` comes from a graph input, an initializer or an outer scope."""
        producer = after.producer()
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, nodes)
        else:
            first = next(iter(graph), None)
            if first is None:
                graph.extend(nodes)
            else:
                graph.insert_before(first, nodes)
        self._qdq_nodes.update(id(n) for n in nodes)

    def _scope_suffix(self, graph: ir.Graph) -> str:
        """"" for the main graph; else the owner node and attribute (names stay unique per body)."""
        if graph is self._graph:
            return ""
        node, attr = self._owners[id(graph)]
        return f"_in_{node.name}_{attr}"

    def _activation_params(self, value: ir.Value, precision: str) -> ActivationQuant:
        """The plan's calibrated parameters of ``value`` for readers at ``precision``."""
        params = self.plan.activation(value.name, precision)
        if params is None or params.scale is None:
            raise PlanError(
                f"tensor {value.name!r} is quantized by the plan at {precision} but has no calibrated "
                "scale for it; calibrate again (pass --calib)"
            )
        expected = (FP8_DTYPE,) if precision == "fp8" else ("int8", "uint8")
        if params.dtype not in expected:
            raise PlanError(f"tensor {value.name!r}: a {precision} reader needs a {' or '.join(expected)} scale, the plan has {params.dtype}")
        return params

    def _activation(self, value: ir.Value, precision: str, graph: ir.Graph) -> ir.Value:
        """Q→DQ of ``value`` in ``graph``: readers inside an If/Loop/Scan body read a pair of their
        own body, so TensorRT and ORT see Q→DQ→op in one graph."""
        key = (value.name, precision, id(graph))
        if key in self._activation_dq:
            return self._activation_dq[key]
        params = self._activation_params(value, precision)
        ir_q, np_zero = GRIDS[params.dtype].ir_type, GRIDS[params.dtype].numpy_type
        np_float = _NP_FLOAT.get(value.dtype, np.float32)
        # The first precision keeps the plain names (INT8-only plans look as before).
        base = value.name if not any(k[0] == value.name and k[1] != precision for k in self._activation_dq) else f"{value.name}_{precision}"
        base += self._scope_suffix(graph)
        scale = self._constant(f"{base}_scale", np.array(params.scale, dtype=np_float))
        zero = self._constant(f"{base}_zero_point", np.array(params.zero_point, dtype=np_zero))
        q = ir.node("QuantizeLinear", [value, scale, zero], name=f"{base}_QuantizeLinear")
        q.outputs[0].name = f"{base}_quantized"
        q.outputs[0].dtype = ir_q
        q.outputs[0].shape = value.shape
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=f"{base}_DequantizeLinear")
        dq.outputs[0].name = f"{base}_dequantized"
        dq.outputs[0].dtype = value.dtype
        dq.outputs[0].shape = value.shape
        self._insert(value, [q, dq], graph)
        self._activation_dq[key] = dq.outputs[0]
        return dq.outputs[0]

    def _weight_params(self, node: str, index: int, source) -> tuple[WeightQuant, int | None]:
        """The plan's entry for input ``index`` of ``node`` and its axis on the initializer: plan
        entries give the axis as the node reads the weight (mapped through a Transpose here);
        old plans' entries, keyed by initializer name, give it on the initializer."""
        entry = self.plan.weights.get(self.plan.weight_key(node, index))
        if entry is not None:
            rank = len(source.initializer.shape) if source.initializer.shape is not None else 0
            return entry, source.initializer_axis(entry.axis, rank) if entry.axis is not None and rank else None
        entry = self.plan.weights.get(source.initializer.name) or WeightQuant()
        return entry, entry.axis

    def _weight_axis(self, node: str, index: int, source, rank: int) -> int | None:
        """The per-channel axis (on the initializer, in [0, rank)) of input ``index`` of ``node``."""
        params, axis = self._weight_params(node, index, source)
        if params.dtype not in WEIGHT_DTYPE.values():
            raise PlanError(f"weights quantize to {list(WEIGHT_DTYPE.values())} (symmetric); the plan asks for {params.dtype} for {source.initializer.name!r}")
        if axis is not None and not -rank <= axis < rank:
            raise PlanError(f"weight {source.initializer.name!r} has rank {rank}; axis {axis} does not exist")
        return None if axis is None else axis % rank

    def _weight(self, value: ir.Value, precision: str, node: str, index: int, graph: ir.Graph) -> ir.Value:
        """A dequantized copy of the weight behind ``value``.

        A weight read through a Transpose gets its transposed integer copy as an initializer, so
        no Transpose or dequantization of a large constant runs at inference time and ORT/TRT
        see the DQ→MatMul pattern they fuse; float readers of the original (a Gather) keep it.
        """
        key = (value.name, precision, id(graph))
        if key in self._weight_dq:
            return self._weight_dq[key]
        source = weight_source(value)
        if source is None:
            raise PlanError(f"the plan quantizes {value.name!r} as a weight, but it is not a float initializer")
        init = source.initializer
        array = init.const_value.numpy()
        axis = self._weight_axis(node, index, source, array.ndim)
        # The reading node's precision decides the dtype (see onnxq.plan).
        dtype = WEIGHT_DTYPE[precision]
        q, scale = quantize_weight(array, axis, dtype)
        name = init.name
        if source.transpose is not None:
            perm = source.transpose.attributes.get_ints("perm", list(range(array.ndim))[::-1])
            q = np.ascontiguousarray(np.transpose(q, perm))
            axis = None if axis is None else list(perm).index(axis)
            name = value.name
        q = _with_offsets(q, self._weight_params(node, index, source)[0], node, dtype)  # GPTQ's rounding, as the node reads the weight
        if any(k[0] == value.name and k[1] != precision for k in self._weight_dq):
            name = f"{name}_{precision}"
        name += self._scope_suffix(graph)
        np_float = _NP_FLOAT.get(init.dtype, np.float32)
        q_value = self._constant(f"{name}_quantized", q)
        scale_value = self._constant(f"{name}_scale", scale.astype(np_float))
        zero_value = self._constant(f"{name}_zero_point", np.zeros(scale.shape, dtype=GRIDS[dtype].numpy_type))
        attrs = {"axis": axis} if axis is not None else {}
        dq = ir.node(
            "DequantizeLinear", [q_value, scale_value, zero_value], attributes=attrs, name=f"{name}_DequantizeLinear"
        )
        dq.outputs[0].name = f"{name}_dequantized"
        dq.outputs[0].dtype = value.dtype
        dq.outputs[0].shape = value.shape
        self._insert(q_value, [dq], graph)
        self._weight_dq[key] = dq.outputs[0]
        return dq.outputs[0]

    def _accumulator_scale(self, node: ir.Node, decision: NodeDecision) -> np.ndarray:
        """The scale of an int8 node's integer accumulator: its input's activation scale × its
        weight's scale per output channel, each as its DequantizeLinear holds it (the plan's
        activation entry and the weight's int8 grid, in the tensor's float type)."""
        if decision.precision != "int8":
            raise PlanError(f"the plan quantizes the bias of {node.name!r} as int32, which only an int8 node has (it is {decision.precision}); remove the bias from its inputs")
        weight = weight_source(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if weight is None or decision.inputs.get(0) != "activation" or decision.inputs.get(1) != "weight":
            raise PlanError(f"the plan quantizes the bias of {node.name!r} as int32, which needs inputs 0 and 1 quantized, a weight on 1")
        act = node.inputs[0]
        params = self._activation_params(act, "int8")
        act_scale = np.array(params.scale, dtype=_NP_FLOAT.get(act.dtype, np.float32)).astype(np.float64)
        array = weight.initializer.const_value.numpy()
        grid_scale = channel_scales(array.astype(np.float32), self._weight_axis(node.name, 1, weight, array.ndim), WEIGHT_GRIDS["int8"])
        weight_scale = grid_scale.astype(_NP_FLOAT.get(weight.initializer.dtype, np.float32)).astype(np.float64)
        return (act_scale.reshape(()) * weight_scale).astype(np.float32)

    def _int32_bias(self, node: ir.Node, index: int, scale: np.ndarray) -> ir.Value:
        """The bias input ``index`` of ``node`` as int32 → DequantizeLinear at ``scale`` (the
        node's accumulator scale, :meth:`_accumulator_scale`)."""
        value = node.inputs[index]
        source = weight_source(value)
        bias = source.initializer.const_value.numpy() if source is not None and source.transpose is None else None
        if bias is None or bias.ndim != 1 or scale.size not in (1, bias.size):
            raise PlanError(f"the int32 bias of {node.name!r} needs a constant 1-D bias, a per-tensor activation scale and a weight scale per output channel")
        shared = len(source.initializer.uses()) > 1  # another reader has its own activation/weight scales
        name = f"{node.name}_{source.initializer.name}" if shared else source.initializer.name
        name += self._scope_suffix(node.graph)
        q_value = self._constant(f"{name}_quantized", quantize_bias(bias, scale))
        scale_value = self._constant(f"{name}_scale", scale.astype(_NP_FLOAT.get(value.dtype, np.float32)))
        zero_value = self._constant(f"{name}_zero_point", np.zeros(scale.shape, dtype=np.int32))
        attrs = {"axis": 0} if scale.ndim == 1 and scale.size > 1 else {}
        dq = ir.node("DequantizeLinear", [q_value, scale_value, zero_value], attributes=attrs, name=f"{name}_DequantizeLinear")
        dq.outputs[0].name, dq.outputs[0].dtype, dq.outputs[0].shape = f"{name}_dequantized", value.dtype, value.shape
        self._insert(q_value, [dq], node.graph)
        return dq.outputs[0]

    def _blocked(self, value: ir.Value, node: str, index: int) -> tuple[list[np.ndarray], WeightQuant, int, str]:
        """([q, scale, zero point], plan entry, axis, base name) of the weight behind ``value``
        quantized in blocks as ``node`` reads it (through a Transpose), with AWQ's clip factors."""
        source = weight_source(value)
        entry = self.plan.weights.get(self.plan.weight_key(node, index))
        if source is None or entry is None or entry.block_size is None or entry.axis is None:
            raise PlanError(f"weight-only node {node!r} needs a float initializer weight and a plan entry with axis and block_size for input {index}")
        if entry.dtype not in ("int4", "uint4", "int8", "uint8"):
            raise PlanError(f"weight-only weights are int4, uint4, int8 or uint8; the plan asks for {entry.dtype} for {node!r}")
        array = source.initializer.const_value.numpy()
        name = source.initializer.name
        if source.transpose is not None:
            array = np.transpose(array, source.transpose.attributes.get_ints("perm", list(range(array.ndim))[::-1]))
            name = value.name
        if not -array.ndim <= entry.axis < array.ndim:
            raise PlanError(f"weight of {node!r} has rank {array.ndim}; axis {entry.axis} does not exist")
        axis = entry.axis % array.ndim
        indices = entry.clip_indices()
        clip = 1.0
        if indices is not None:  # AWQ's clip factors, [blocks, columns]
            blocks = -(-array.shape[axis] // entry.block_size)
            if indices.size != blocks * (array.size // array.shape[axis]):
                raise PlanError(f"the plan's clip factors for {node!r} do not fit its weight {list(array.shape)} in blocks of {entry.block_size}")
            clip = np.asarray(CLIP_RATIOS, dtype=np.float32)[indices.reshape(blocks, -1)]
        q, scale, zero = quantize_blocked(array, axis, entry.block_size, GRIDS[entry.dtype], clip)
        return [_with_offsets(q, entry, node), scale.astype(_NP_FLOAT.get(value.dtype, np.float32)), zero], entry, axis, name

    def _blocked_weight(self, value: ir.Value, node: str, index: int, graph: ir.Graph) -> ir.Value:
        """A blocked DequantizeLinear of the weight behind ``value``, quantized as the node reads
        it (a Transposed weight gets its transposed integer copy; float readers keep the original)."""
        key = (value.name, "blocked", id(graph))
        if key in self._weight_dq:
            return self._weight_dq[key]
        (q, scale, zero), entry, axis, name = self._blocked(value, node, index)
        name += self._scope_suffix(graph)
        inputs = [self._constant(f"{name}_quantized", q), self._constant(f"{name}_scale", scale)]
        if not GRIDS[entry.dtype].symmetric:
            inputs.append(self._constant(f"{name}_zero_point", zero))
        dq = ir.node("DequantizeLinear", inputs, attributes={"axis": axis, "block_size": entry.block_size}, name=f"{name}_DequantizeLinear")
        dq.outputs[0].name = f"{name}_dequantized"
        dq.outputs[0].dtype = value.dtype
        dq.outputs[0].shape = ir.Shape(q.shape)
        self._insert(inputs[0], [dq], graph)
        self._weight_dq[key] = dq.outputs[0]
        return dq.outputs[0]

    def _quantized_gather(self, node: ir.Node) -> None:
        """Replace an embedding Gather (axis 0) by ``com.microsoft::GatherBlockQuantized`` on the
        blocked UINT4/UINT8 table: ORT gathers and dequantizes only the rows it needs (a
        DequantizeLinear → Gather would dequantize the whole table on every run)."""
        (q, scale, zero), entry, axis, name = self._blocked(node.inputs[0], node.name, 0)
        if GRIDS[entry.dtype].symmetric or q.ndim != 2 or axis != 1 or node.attributes.get_int("axis", 0) != 0:
            raise PlanError(f"a weight-only Gather ({node.name!r}) needs a 2-D table gathered on axis 0, uint4/uint8 blocks along axis 1 (the ort target)")
        name += self._scope_suffix(node.graph)
        inputs = [self._constant(f"{name}_quantized", q), node.inputs[1], self._constant(f"{name}_scale", scale), self._constant(f"{name}_zero_point", zero)]
        attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": entry.block_size, "bits": 8 if entry.dtype == "uint8" else 4}
        gather = ir.node("GatherBlockQuantized", inputs, attributes=attributes, domain=MS_DOMAIN, name=node.name)
        gather.outputs[0].dtype, gather.outputs[0].shape = node.outputs[0].dtype, node.outputs[0].shape
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], [gather], node.outputs, gather.outputs)
        self._model.opset_imports.setdefault(MS_DOMAIN, 1)


def _release_if_unused(source) -> None:
    """Drop the float initializer behind a weight input that was just replaced by its quantized
    copy, once nothing reads it (and the Transpose it was read through, when that is dead too),
    so the float weights are freed one by one instead of all living next to their quantized
    copies until the pass ends (0.5B decoder: the stage's peak RSS 1.66x -> 1.2x model bytes).
    What this removes is what the pass's last loop and the finish stage would remove: the
    output is the same."""
    if source is None:
        return
    transpose = source.transpose
    if transpose is not None:
        out = transpose.outputs[0]
        if out.uses() or out.is_graph_output() or transpose.graph is None:
            return
        transpose.graph.remove(transpose, safe=True)
    init = source.initializer
    graph = init.graph
    if init.uses() or init.is_graph_input() or init.is_graph_output() or graph is None or graph.initializers.get(init.name) is not init:
        return
    graph.initializers.pop(init.name)
    init.const_value = None  # whatever still holds the Value object, the tensor is freed


def _with_offsets(q: np.ndarray, entry: WeightQuant, node: str, dtype: str | None = None) -> np.ndarray:
    """The integers (FP8: values) ``q`` on grid ``dtype`` (default the entry's) with the plan's
    GPTQ offsets from round-to-nearest added."""
    offsets = entry.offset_values()
    if offsets is None:
        return q
    dtype = dtype or entry.dtype
    if offsets.size != q.size:
        raise PlanError(f"the plan's GPTQ offsets for {node!r} hold {offsets.size} values; its weight has {q.size}")
    values = apply_offsets(q, offsets.reshape(q.shape), dtype)
    if values is None:
        raise PlanError(f"the plan's GPTQ offsets for {node!r} leave the {dtype} range; was the plan made for another model?")
    return values
