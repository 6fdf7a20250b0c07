"""Block-by-block calibration: the graph cut into consecutive subgraphs, run one at a time.

Only one block's weights are in an ONNX Runtime session at once. The cuts are the residual
boundaries of a decoder: the input of each root-mean-square normalisation
(:func:`onnxq.patterns.norm_statistics`), so a Llama layer gives two blocks (attention, MLP);
``--calib-blocks MB`` merges consecutive pieces up to MB of weights each.

What crosses a cut is computed exactly from the node order: every tensor produced before the
cut (or a graph input) that a node at or after it reads. Block 0 runs every calibration batch and
hands its crossing outputs to block 1 (kept in memory up to a budget, then spilled to ``.npy``
files read back memory-mapped), and so on. Later blocks run the very batches block 0 ran, so
each tensor's statistics are those of whole-model calibration up to the float rounding of ORT's
kernels on a smaller graph. Each tensor is observed in one block, so the tables merge by union.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.calibrators.batching import BatchFeed, available_memory, concat
from onnxq.calibrators.table import CalibrationTable
from onnxq.errors import OnnxqError
from onnxq.patterns import norm_statistics
from onnxq.progress import log

_BLOCKS: contextvars.ContextVar[str | None] = contextvars.ContextVar("onnxq_calib_blocks", default=None)


@contextlib.contextmanager
def use_calib_blocks(spec: str | None) -> Iterator[None]:
    """Calibration passes inside the block run block by block (``spec``: ``auto`` or MB), or
    whole-model for None."""
    token = _BLOCKS.set(spec)
    try:
        yield
    finally:
        _BLOCKS.reset(token)


def calib_blocks() -> str | None:
    """The block setting in effect (:func:`use_calib_blocks`)."""
    return _BLOCKS.get()


def parse_blocks(spec: str | int | None) -> int | None:
    """``auto`` -> 0 (every residual boundary), ``N`` -> N MB per block, None -> None (off)."""
    if spec is None:
        return None
    text = str(spec).strip().lower()
    if text == "auto":
        return 0
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise OnnxqError(f"--calib-blocks takes 'auto' or a weight budget in MB per block (a positive integer), got {spec!r}")


@dataclass
class Block:
    """Nodes ``start:stop`` of the main graph, the tensors it reads from earlier blocks or the
    graph's inputs, and those it hands on."""

    start: int
    stop: int
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def _spans(nodes: list[ir.Node], graph: ir.Graph) -> tuple[dict[str, int], dict[str, int]]:
    """Per non-constant tensor: index of its producer (-1: graph input) and of its last reader."""
    defined = {v.name: -1 for v in graph.inputs if v.const_value is None}
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for v in node.inputs:
            if v is not None and v.const_value is None and v.name in defined:
                last[v.name] = i
        for out in node.outputs:
            defined[out.name] = i
    return defined, last


def _weight_bytes(nodes: list[ir.Node]) -> list[int]:
    """Bytes of the initializers each node is the first to read."""
    seen: set[int] = set()
    sizes = []
    for node in nodes:
        total = 0
        for v in node.inputs:
            if v is not None and v.const_value is not None and id(v) not in seen:
                seen.add(id(v))
                total += v.const_value.nbytes
        sizes.append(total)
    return sizes


def cut_points(model: ir.Model, budget_mb: int) -> list[int]:
    """Node indices where blocks start after the first: right after the producer of each
    normalisation's input (a residual stream tensor), merged so that a block
    holds at least ``budget_mb`` MB of weights (0: every boundary)."""
    nodes = list(model.graph)
    index = {id(n): i for i, n in enumerate(nodes)}
    cuts = set()
    for stat in norm_statistics(model.graph):
        producer = stat.nodes[0].inputs[0].producer()
        if producer is not None and id(producer) in index:
            cuts.add(index[id(producer)] + 1)
    cuts = sorted(c for c in cuts if 0 < c < len(nodes))
    if budget_mb <= 0:
        return cuts
    sizes = np.cumsum([0, *_weight_bytes(nodes)])
    merged, start = [], 0
    for cut in cuts:
        if sizes[cut] - sizes[start] >= budget_mb << 20:
            merged.append(cut)
            start = cut
    return merged


def plan_blocks(model: ir.Model, budget_mb: int) -> list[Block]:
    """The blocks of ``model`` and the exact set of tensors crossing each cut."""
    nodes = list(model.graph)
    defined, last = _spans(nodes, model.graph)
    bounds = [0, *cut_points(model, budget_mb), len(nodes)]
    blocks = []
    for start, stop in zip(bounds, bounds[1:]):
        read = {v.name for n in nodes[start:stop] for v in n.inputs if v is not None and v.name in defined}
        inputs = [t for t in read if defined[t] < start]
        outputs = [t for t, d in defined.items() if start <= d < stop and last.get(t, -1) >= stop]
        blocks.append(Block(start, stop, sorted(inputs), sorted(outputs)))
    return blocks


def _copy_value(value: ir.Value) -> ir.Value:
    return ir.Value(name=value.name, type=value.type, shape=value.shape)


def block_model(model: ir.Model, block: Block, extra_inputs: Sequence[str] = ()) -> ir.Model:
    """A model of the block's nodes (copies sharing the original's attributes and weight tensors:
    no weight is copied), its crossing tensors as inputs and outputs; ``extra_inputs``: graph
    inputs it takes without reading them."""
    nodes = list(model.graph)[block.start : block.stop]
    values: dict[str, ir.Value] = {}
    initializers = []
    all_values = {v.name: v for v in model.graph.inputs}
    all_values.update({o.name: o for n in model.graph for o in n.outputs})
    for name in dict.fromkeys([*block.inputs, *extra_inputs]):
        values[name] = _copy_value(all_values[name])
    graph_inputs = list(values.values())
    copies = []
    for node in nodes:
        inputs = []
        for v in node.inputs:
            if v is not None and v.name not in values and v.const_value is not None:
                values[v.name] = ir.Value(name=v.name, type=v.type, shape=v.shape, const_value=v.const_value)
                initializers.append(values[v.name])
            inputs.append(None if v is None else values[v.name])
        copy = ir.Node(
            node.domain, node.op_type, inputs, list(node.attributes.values()), overload=node.overload,
            num_outputs=len(node.outputs), version=node.version, name=node.name,
        )
        for old, new in zip(node.outputs, copy.outputs):
            new.name, new.type, new.shape = old.name, old.type, old.shape
            values[old.name] = new
        copies.append(copy)
    outputs = [values[t] for t in block.outputs]
    graph = ir.Graph(graph_inputs, outputs, nodes=copies, initializers=initializers, opset_imports=dict(model.opset_imports), name=f"block_{block.start}")
    return ir.Model(graph, ir_version=model.ir_version, functions=list(model.functions.values()))


class BoundaryStore:
    """The crossing tensors of every calibration batch: in memory up to ``budget`` bytes, then
    written to ``.npy`` files in ``folder`` and read back memory-mapped."""

    def __init__(self, folder: str, budget: int):
        self.folder, self.budget, self.held = folder, budget, 0
        self.values: dict[str, list[np.ndarray]] = {}
        self.spilled = 0

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.asarray(array)
        batches = self.values.setdefault(name, [])
        if self.held + array.nbytes > self.budget:
            path = os.path.join(self.folder, f"{self.spilled}.npy")
            np.save(path, array)
            self.spilled += 1
            array = np.load(path, mmap_mode="r")
        else:
            self.held += array.nbytes
        batches.append(array)

    def drop(self, names) -> None:
        for name in names:
            for array in self.values.pop(name, []):
                if not isinstance(array, np.memmap):
                    self.held -= array.nbytes

    def feeds(self, names: Sequence[str], samples: Sequence[int]) -> list[BatchFeed]:
        """The stored batches of ``names``; ``samples``: how many samples each batch holds."""
        count = len(self.values[names[0]]) if names else 0
        return [BatchFeed({n: np.asarray(self.values[n][i]) for n in names}, samples[i]) for i in range(count)]


class _Source(list):
    """Batches fed as they are: the collector runs each as one call (no regrouping, and no
    second note of the batch size block 0 ran)."""

    batch = 1
    replayed = True


def collect_by_blocks(model: ir.Model, tensors: Sequence[str], data, budget_mb: int, collect_one: Callable, **options) -> CalibrationTable:
    """``collect_one(model, tensors, data, **options)`` (the collector) run block by block;
    returns the whole-model table."""
    blocks = plan_blocks(model, budget_mb)
    where = _observing_blocks(model, blocks, tensors)
    log(f"onnxq: calibrating in {len(blocks)} blocks; at most {max(len(b.inputs) for b in blocks)} tensors cross a cut")
    _, last = _spans(list(model.graph), model.graph)
    with tempfile.TemporaryDirectory(prefix="onnxq-blocks-") as folder:
        store = BoundaryStore(folder, available_memory() // 4)
        table, batch_samples = None, []
        for k, block in enumerate(blocks):
            mine = [t for t in tensors if where.get(t) == k]
            # block 0 also takes the graph inputs only later blocks read, to hand them on
            keep_inputs = [v.name for v in model.graph.inputs if v.const_value is None and last.get(v.name, -1) >= block.stop] if k == 0 else []
            unread = [v.name for v in model.graph.inputs if v.name in mine and v.name not in last] if k == 0 else []
            sub = block_model(model, block, [*keep_inputs, *unread])
            names = [v.name for v in sub.graph.inputs]
            feeds = _Picked(data, names) if k == 0 else _Source(store.feeds(names, batch_samples))

            def sink(batch_feeds, outputs, keep_inputs=keep_inputs, first=k == 0):
                if first:
                    batch_samples.append(len(batch_feeds))
                for name, array in outputs.items():
                    store.add(name, array)
                joined = concat(batch_feeds) if keep_inputs else {}
                for name in keep_inputs:
                    store.add(name, joined[name])

            if k:
                options["batch"] = 1  # the batches block 0 ran, as they are
            part = collect_one(sub, mine, feeds, sink=sink, sink_outputs=block.outputs, **options)
            table = part if table is None else _merged(table, part)
            del sub, feeds, part
            store.drop([t for t in list(store.values) if last.get(t, -1) < block.stop])
        if store.spilled:
            log(f"onnxq: block calibration spilled {store.spilled} boundary arrays to disk")
    return table


def _merged(table: CalibrationTable, part: CalibrationTable) -> CalibrationTable:
    table.tensors.update(part.tensors)
    return table


def _observing_blocks(model: ir.Model, blocks: list[Block], tensors: Sequence[str]) -> dict[str, int]:
    """tensor -> the block that observes it: the one producing it, or (a graph input) the first reading it."""
    nodes = list(model.graph)
    where: dict[str, int] = {}
    for k, block in enumerate(blocks):
        for node in nodes[block.start : block.stop]:
            for v in node.inputs:
                if v is not None and v.producer() is None and v.const_value is None:
                    where.setdefault(v.name, k)
            for out in node.outputs:
                where.setdefault(out.name, k)
    for value in model.graph.inputs:
        where.setdefault(value.name, 0)  # a graph input no node reads: block 0 takes it as well
    return {t: where[t] for t in tensors if t in where}


class _Picked:
    """The calibration source with each feed cut down to the inputs block 0 reads."""

    def __init__(self, source, names: Sequence[str]):
        self.source, self.names = source, list(names)
        self.batch = getattr(source, "batch", None)

    def __len__(self) -> int:
        return len(self.source) if hasattr(self.source, "__len__") else 0

    def __iter__(self):
        for feed in self.source:
            yield {n: feed[n] for n in self.names}


def whole_model_needed(model: ir.Model) -> str | None:
    """Why a model is calibrated whole even when blocks are asked for (None: it can be cut)."""
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for n in model.graph.all_nodes() for a in n.attributes.values()):
        return "it has If/Loop/Scan bodies"
    if len(plan_blocks(model, 0)) < 2:
        return "no residual boundary (RMSNorm/LayerNorm statistic) was found to cut at"
    return None


def maybe_by_blocks(model: ir.Model, tensors, data, collect_one: Callable, options: Mapping) -> CalibrationTable | None:
    """The block-by-block table when blocks are asked for and the model can be cut; else None."""
    budget = parse_blocks(calib_blocks())
    if budget is None:
        return None
    reason = whole_model_needed(model)
    if reason is not None:
        log(f"onnxq: calibrating the whole model at once: {reason}")
        return None
    return collect_by_blocks(model, tensors, data, budget, collect_one, **options)
