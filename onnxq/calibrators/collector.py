"""Streaming statistics collection through ONNX Runtime.

The model is augmented with one ReduceMin and one ReduceMax per observed tensor, so ORT returns
two scalars per tensor per batch; per-channel abs-max is reduced in the graph too (a vector per
batch). Tensors that need a histogram are also fetched, one batch at a time, and folded into a
fixed-size histogram. Statistics are merged batch by batch; no activation outlives its batch, and
memory does not grow with the number of samples.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import modelio
from onnxq.calibrators.batching import (
    auto_batch,
    batchable,
    concat,
    cpu_count,
    group,
    sample_count,
)
from onnxq.calibrators.blocks import maybe_by_blocks
from onnxq.calibrators.histogram import Histogram
from onnxq.calibrators.reservoir import RowReservoir
from onnxq.calibrators.subgraphs import Promotion, iter_graphs, reduce_promoted
from onnxq.calibrators.table import CalibrationTable, TensorStats
from onnxq.errors import DataError, OnnxqError
from onnxq.ops import reduce_node
from onnxq.progress import log, progress_bar
from onnxq.runtime import ort as ort_rt

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value: graph inputs and node outputs of the graph and of its If/Loop/Scan bodies
    (names are unique across scopes after preprocessing's NameFixPass)."""
    values = {}
    for g in iter_graphs(graph):
        values.update({v.name: v for v in g.inputs})
    for node in graph.all_nodes():
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values


def float_tensors(model: ir.Model, tensors: Sequence[str]) -> list[str]:
    """The tensors of ``tensors`` that the model produces as floats: the ones calibration observes."""
    values = _values_by_name(model.graph)
    return [t for t in tensors if t in values and values[t].dtype in _FLOAT_TYPES]


def _reduce(op: str, x: ir.Value, axes: list[int], opset: int, name: str) -> list[ir.Node]:
    """``op`` over ``axes`` (keepdims 0), as the opset wants; axes read as an input come from a
    Constant node, not an initializer: the statistics nodes are added to whichever graph defines
    ``x`` (an If/Loop body too) and removed again with nothing else to undo."""
    node, axes_value = reduce_node(op, x, axes, opset, name, keepdims=False)
    if axes_value is None:
        return [node]
    const = ir.node("Constant", [], attributes={"value": axes_value.const_value}, name=f"{name}/axes")
    const.outputs[0].name = f"{name}/axes_value"
    node.replace_input_with(1, const.outputs[0])
    return [const, node]


def augment_with_reductions(
    model: ir.Model,
    tensors: Sequence[str],
    *,
    values: Collection[str] = (),
    channel_axes: Mapping[str, int] | None = None,
    channel_ranges: Collection[str] = (),
    build: Callable[[ir.Model], object] = modelio.to_proto,
    passthrough: Sequence[str] = (),
) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` as a proto (or what ``build`` makes of it: a session) whose outputs are (min,
    max) of each float tensor in ``tensors``.

    Each tensor named in ``values`` is itself an output too (for its histogram). For each
    tensor in ``channel_axes`` (whose rank is known), ``ReduceMax(Abs(x))`` over every axis but the
    channel axis is an output as well, so only a vector per batch comes back.

    The reductions are added to ``model`` only while it is serialized and removed again, so the
    weights are never held twice as ``ir`` objects. Returns the proto and the tensors observed
    (non-float ones are skipped); outputs come per tensor as min, max (not for a main-graph tensor
    in ``values``: its value gives them)[, value (``{name}::onnxq_value``, or the tensor itself
    under its own name where it is a main-graph node output)][, channel amax]
    [, channel min, channel max]: the signed per-channel range, for each tensor of
    ``channel_ranges`` that has a channel axis (SmoothQuant derives the range of ``x / s`` from it).
    ``passthrough``: main-graph tensors that are outputs as they are, after all the statistics
    (a calibration block's tensors for the next block).
    """
    graph = model.graph
    opset = model.opset_imports.get("", 13)
    by_name = _values_by_name(graph)
    channel_axes = channel_axes or {}
    observed, new_outputs = [], []
    promotion = Promotion(graph)
    direct_blocked = set(passthrough)  # outputs already, under the same name
    for name in tensors:
        new_nodes = []
        value = by_name.get(name)
        if value is None:
            raise DataError(f"tensor {name!r} is not produced by the model; it cannot be calibrated")
        if value.dtype not in _FLOAT_TYPES:
            continue
        # a main-graph tensor fetched whole gets its min/max from the fetched array (numpy's
        # reductions are several times cheaper than ORT's, which also cost a layout reorder)
        reduce_on_host = name in values and (value.graph or graph) is graph
        for op in () if reduce_on_host else ("ReduceMin", "ReduceMax"):
            node = ir.node(op, [value], attributes={"keepdims": 0}, name=f"onnxq_calib/{op}/{name}")
            out = node.outputs[0]
            out.name = f"{name}::onnxq_{op[6:].lower()}"
            out.dtype = value.dtype
            out.shape = ir.Shape([])
            new_nodes.append(node)
            new_outputs.append(out)
        if name in values and reduce_on_host and value.producer() is not None and name not in direct_blocked:
            new_outputs.append(value)  # the tensor itself: an Identity would cost ORT a copy
        elif name in values:
            node = ir.node("Identity", [value], name=f"onnxq_calib/Identity/{name}")
            node.outputs[0].name = f"{name}::onnxq_value"
            node.outputs[0].dtype = value.dtype
            node.outputs[0].shape = value.shape
            new_nodes.append(node)
            new_outputs.append(node.outputs[0])
        axis = channel_axes.get(name)
        rank = len(value.shape) if value.shape is not None else None
        if axis is not None and rank is not None and -rank <= axis < rank:
            axis %= rank
            absnode = ir.node("Abs", [value], name=f"onnxq_calib/Abs/{name}")
            absnode.outputs[0].name = f"{name}::onnxq_abs"
            absnode.outputs[0].dtype = value.dtype
            reduce = _reduce("ReduceMax", absnode.outputs[0], [a for a in range(rank) if a != axis], opset, f"onnxq_calib/ReduceMaxChannel/{name}")
            out = reduce[-1].outputs[0]
            out.name = f"{name}::onnxq_channel_amax"
            out.dtype = value.dtype
            new_nodes += [absnode, *reduce]
            new_outputs.append(out)
            if name in channel_ranges:
                for op in ("ReduceMin", "ReduceMax"):
                    kind = op[6:].lower()
                    reduce = _reduce(op, value, [a for a in range(rank) if a != axis], opset, f"onnxq_calib/{op}ChannelRange/{name}")
                    out = reduce[-1].outputs[0]
                    out.name = f"{name}::onnxq_channel_{kind}"
                    out.dtype = value.dtype
                    new_nodes += reduce
                    new_outputs.append(out)
        _place(promotion, value.graph or graph, new_nodes, new_outputs)
        observed.append(name)
    original_outputs = list(graph.outputs)
    graph.outputs[:] = [*new_outputs, *(by_name[t] for t in passthrough)]
    try:
        proto = build(model)
    finally:
        graph.outputs[:] = original_outputs
        promotion.undo()
        modelio.release_detached_values(model)
    return proto, observed


def _place(promotion: Promotion, graph: ir.Graph, nodes: list[ir.Node], outputs: list[ir.Value]) -> None:
    """Add one tensor's statistic ``nodes`` to the graph that defines the tensor; the tensor's
    statistics among ``outputs`` (those produced by ``nodes``) are carried out to the main graph
    under the same names (:mod:`onnxq.calibrators.subgraphs`)."""
    promotion.add_nodes(graph, nodes)
    if graph is promotion.main:
        return
    mine = {id(o) for n in nodes for o in n.outputs}
    for i, out in enumerate(outputs):
        if id(out) in mine:
            name, out.name = out.name, f"{out.name}::inner"
            outputs[i] = promotion.to_main(out)
            outputs[i].name = name


def collect(
    model: ir.Model,
    tensors: Sequence[str],
    data: Iterable[dict[str, np.ndarray]],
    *,
    progress: bool = True,
    session_threads: int | None = None,
    histograms: bool | Iterable[str] = False,
    channel_axes: Mapping[str, int] | None = None,
    channel_ranges: Collection[str] = (),
    reservoirs: Mapping[str, RowReservoir] | None = None,
    batch: int | None = None,
    sink: Callable[[list, dict[str, np.ndarray]], None] | None = None,
    sink_outputs: Sequence[str] = (),
) -> CalibrationTable:
    """Run ``data`` through ``model`` once, collecting statistics of every tensor in ``tensors``.

    Always min/max (reduced in the graph). ``histograms``: True for every tensor, or the names
    that need one; each batch's tensor is fetched and folded into a fixed-size histogram, then
    dropped. ``channel_axes``: tensor -> axis for per-channel abs-max (reduced in the graph).
    ``channel_ranges``: tensors (with a channel axis) whose per-channel min and max are kept too.
    ``reservoirs``: tensor -> :class:`RowReservoir` offered every batch's rows (bounded memory).
    ``batch``: samples per ORT call (:mod:`onnxq.calibrators.batching`); None: the data source's
    ``batch`` or, without one, chosen from memory; 1: one sample per call. Memory does not grow
    with the number of samples. Inside :func:`onnxq.calibrators.blocks.use_calib_blocks` the pass
    runs block by block (:mod:`onnxq.calibrators.blocks`), with the same table.
    ``sink(feeds, {name: array})``: called with each batch's ``sink_outputs`` (the block runner's
    boundary tensors).
    """
    options = dict(
        session_threads=session_threads, progress=progress, histograms=histograms, channel_axes=channel_axes,
        channel_ranges=channel_ranges, reservoirs=reservoirs, batch=batch,
    )
    if sink is None and (by_blocks := maybe_by_blocks(model, tensors, data, collect, options)) is not None:
        return by_blocks
    reservoirs = dict(reservoirs or {})
    hist_names = set(tensors) if histograms is True else set(histograms) if histograms else set()
    channel_axes = dict(channel_axes or {})
    # one augmented model; a tensor's value is fetched only when it needs a histogram
    # the session is built from the augmented ir model itself (written with its weights in a side
    # file): no protobuf copy of the weights
    session, observed = augment_with_reductions(
        model, tensors, values=hist_names | set(reservoirs), channel_axes=channel_axes, channel_ranges=channel_ranges,
        build=lambda augmented: ort_rt.create_session(augmented, threads=session_threads or cpu_count()), passthrough=sink_outputs,
    )
    table = CalibrationTable(method="minmax", tensors={name: TensorStats() for name in observed})
    if not observed and sink is None:
        return table
    updates = _update_plan(session, table, observed, hist_names, channel_axes, reservoirs)
    inner = {name for name, v in _values_by_name(model.graph).items() if name in table.tensors and v.graph is not model.graph}
    promoted = {id(table.tensors[name]) for name in inner}  # defined inside an If/Loop/Scan body
    total = len(data) if hasattr(data, "__len__") and len(data) else None
    if batch is None:
        batch = getattr(data, "batch", None)
    if inner or not batchable(ort_rt.input_spec(session)):
        batch = 1  # control-flow statistics are stacked per sample; a fixed batch axis takes one
    bar = progress_bar(total, f"calibrating {len(observed)} tensors" + (f" ({len(hist_names & set(observed))} histograms)" if hist_names else ""), enabled=progress)
    with bar:
        for feeds, results in _batched_runs(session, iter(data), batch, total, updates, getattr(data, "replayed", False)):
            _update_all(updates, promoted, results, sample_count(feeds))
            if sink is not None:
                sink(feeds, dict(zip(sink_outputs, results[len(results) - len(sink_outputs):])))
            del results
            table.num_samples += sample_count(feeds)
            bar.update(len(feeds))
    if table.num_samples == 0:
        raise DataError("the calibration data holds no samples; give at least one")
    return table


def _update_plan(session, table: CalibrationTable, observed, hist_names, channel_axes, reservoirs) -> list[tuple]:
    """Per observed tensor: its stats and the session output indices each statistic reads."""
    out_index = {o.name: i for i, o in enumerate(session.get_outputs())}
    plan = []
    for name in observed:
        stats = table.tensors[name]
        vi = out_index.get(f"{name}::onnxq_value", out_index.get(name))
        ci = out_index.get(f"{name}::onnxq_channel_amax")
        if vi is not None and name in hist_names:
            stats.histogram = Histogram()
        if ci is not None:
            stats.channel_axis = channel_axes[name]
        rng = (out_index.get(f"{name}::onnxq_channel_min"), out_index.get(f"{name}::onnxq_channel_max"))
        plan.append((stats, out_index.get(f"{name}::onnxq_min"), out_index.get(f"{name}::onnxq_max"), vi, ci, rng, reservoirs.get(name)))
    return plan


def _update_all(updates: list[tuple], promoted: set[int], results: list, samples: int) -> None:
    """Fold one batch's outputs (of ``samples`` samples) into every tensor's statistics."""
    for stats, mi, ma, vi, ci, (cmin, cmax), reservoir in updates:
        if id(stats) in promoted:
            _update_promoted(stats, results, mi, ma, vi, ci, cmin, cmax)
            continue
        lo, hi = _min_max(results, mi, ma, vi)
        if lo is None:
            continue
        stats.update(lo, hi)
        if stats.histogram is not None:
            stats.histogram.update_sampled(results[vi], samples, max(abs(float(lo)), abs(float(hi))))
        if ci is not None:
            stats.update_channels(results[ci])
        if cmin is not None:
            stats.update_channel_range(results[cmin], results[cmax])
        if reservoir is not None and vi is not None:
            reservoir.update(results[vi])


def _min_max(results: list, mi: int | None, ma: int | None, vi: int | None) -> tuple:
    """A tensor's (min, max) in one batch: reduced in the graph, or from its fetched value
    (``mi`` None); (None, None) for an empty tensor."""
    if mi is not None:
        return results[mi], results[ma]
    value = results[vi]
    return (value.min(), value.max()) if value.size else (None, None)


def _batched_runs(session, feeds, batch: int | None, total: int | None, updates: list[tuple], replayed: bool = False):
    """(feeds, outputs) of each ORT call. The first samples run one at a time: the first fixes
    the automatic batch size (``batch`` None) from its fetched bytes, and the second, run alone
    and again with the first, checks that batching leaves every tensor's min/max unchanged (a
    graph that mixes samples across the batch axis, or refuses a batch, runs one at a time).
    ``replayed``: the feeds are batches a previous pass ran (a later calibration block), whose
    batch size that pass already logged."""
    first = next(feeds, None)
    if first is None:
        return
    results = ort_rt.run(session, first)
    if batch is None:
        batch = auto_batch(sum(np.asarray(r).nbytes for r in results) + sum(a.nbytes for a in first.values()), total)
    if batch > 1:
        second = next(feeds, None)
        if second is not None:
            second_results = ort_rt.run(session, second)
            if not _batch_agrees(session, [first, second], [results, second_results], updates):
                batch = 1
            yield [first], results
            results, first = second_results, second
    if not replayed:
        log(f"onnxq: calibration runs {batch} sample{'s' if batch > 1 else ''} per ORT call")
    yield [first], results
    del results
    for feeds_in_batch in group(feeds, batch):
        yield feeds_in_batch, ort_rt.run(session, concat(feeds_in_batch))


def _batch_agrees(session, feeds: list, singles: list[list], updates: list[tuple]) -> bool:
    """Whether two samples run as one batch give the min/max (float-rounding close) that they
    give one at a time."""
    try:
        together = ort_rt.run(session, concat(feeds))
    except OnnxqError as exc:
        log(f"onnxq: calibration runs one sample per ORT call: the model refuses a batch of two ({exc})")
        return False
    for _, mi, ma, vi, *_ in updates:
        ranges = [_min_max(s, mi, ma, vi) for s in singles]
        ranges = [r for r in ranges if r[0] is not None]
        both = _min_max(together, mi, ma, vi)
        if not ranges or both[0] is None:
            continue
        lo, hi = min(float(r[0]) for r in ranges), max(float(r[1]) for r in ranges)
        if not np.allclose([float(both[0]), float(both[1])], [lo, hi], rtol=1e-3, atol=1e-5 * max(1.0, abs(lo), abs(hi))):
            log("onnxq: calibration runs one sample per ORT call: the model's outputs change when samples share a batch")
            return False
    return True


def _update_promoted(stats: TensorStats, results, mi, ma, vi, ci, cmin, cmax) -> None:
    """Statistics of a tensor inside a control-flow body: stacked over iterations, or empty
    when its branch did not run on this sample (then nothing is updated)."""
    lo = reduce_promoted(results[mi], "min")
    if lo is None:
        return
    hi = reduce_promoted(results[ma], "max")
    stats.update(lo, hi)
    if stats.histogram is not None:
        stats.histogram.update(results[vi], max(abs(float(lo)), abs(float(hi))))
    if ci is not None:
        channels = np.asarray(results[ci]).shape[-1]
        stats.update_channels(reduce_promoted(results[ci], "channel_max", channels))
    if cmin is not None:
        channels = np.asarray(results[cmin]).shape[-1]
        stats.update_channel_range(reduce_promoted(results[cmin], "channel_min", channels), reduce_promoted(results[cmax], "channel_max", channels))
