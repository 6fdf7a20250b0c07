"""``onnxq diff A.onnx B.onnx``: what changed between two graphs, layer by layer.

Both graphs are read as layers (:mod:`onnxq.layers`: Q/DQ and Cast looked through, precision per
layer). Layers are matched by node name first; the rest by structure — same op type and the same
inputs (graph inputs by name, constants by shape, produced tensors by the matched producer) —
repeated until nothing new matches. A matched pair is *changed* when its op type, attributes,
precision, quantization parameters (dtype, scale, zero point, axis, per input), wiring or constant
inputs (max abs difference of the float, or dequantized, values) differ. Unmatched layers are
added (only in B) or removed (only in A). The two graphs are *equivalent* when no layer is added,
removed or changed and their inputs and outputs agree; the CLI exits 0 then, 1 otherwise, 2 on
error, like ``diff``.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from onnxq.layers import GraphLayers, Layer, LayerInput, graph_layers, precision_order, shape_list, summarize

FORMATS = ("text", "json", "html")


@dataclass
class LayerChange:
    name_a: str | None
    name_b: str | None
    status: str  # "same", "changed", "added", "removed"
    a: Layer | None = None
    b: Layer | None = None
    changes: list[str] = field(default_factory=list)
    weight_max_abs_diff: dict[int, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.name_b if self.name_a is None else self.name_a

    def to_json(self) -> dict:
        return {
            "name": self.name, "name_b": self.name_b if self.name_b != self.name_a else None,
            "status": self.status, "changes": self.changes,
            "op_type": {"a": self.a.op_type if self.a else None, "b": self.b.op_type if self.b else None},
            "precision": {"a": self.a.precision if self.a else None, "b": self.b.precision if self.b else None},
            "quantization": {"a": _quant_json(self.a), "b": _quant_json(self.b)},
            "attributes": {"a": self.a.attributes if self.a else None, "b": self.b.attributes if self.b else None},
            "weight_max_abs_diff": {str(k): v for k, v in self.weight_max_abs_diff.items()},
            "macs": (self.b or self.a).macs,
        }


def _quant_json(layer: Layer | None) -> dict | None:
    if layer is None:
        return None
    return {str(i.index): i.quant.to_json() for i in layer.inputs if i.quant is not None}


@dataclass
class GraphDiff:
    a: str
    b: str
    layers: list[LayerChange]
    graph_changes: list[str]
    summary: dict

    @property
    def equivalent(self) -> bool:
        return not self.graph_changes and all(c.status == "same" for c in self.layers)

    def counts(self) -> dict[str, int]:
        out = {"same": 0, "changed": 0, "added": 0, "removed": 0}
        for c in self.layers:
            out[c.status] += 1
        return out

    def quantized_layers(self, side: str = "b") -> list[LayerChange]:
        """Pairs whose layer on ``side`` reads at least one input through Q/DQ."""
        return [c for c in self.layers if getattr(c, side) is not None
                and any(i.quant is not None for i in getattr(c, side).inputs)]

    def to_json(self) -> dict:
        return {"format": "onnxq.diff/1", "a": self.a, "b": self.b, "equivalent": self.equivalent,
                "counts": self.counts(), "graph_changes": self.graph_changes, "summary": self.summary,
                "layers": [c.to_json() for c in self.layers if c.status != "same" or _has_quant(c)]}


def _has_quant(c: LayerChange) -> bool:
    return any(i.quant is not None for side in (c.a, c.b) if side is not None for i in side.inputs)


# ---------------------------------------------------------------------------------- matching


def _signature(layer: Layer, rename: Mapping[str, str]) -> tuple:
    keys = []
    for i in layer.inputs:
        if i.producer is not None:
            keys.append(("node", rename.get(i.producer, "?" + i.producer)))
        elif i.constant is not None:
            keys.append(("const", tuple(i.constant.shape)))
        else:
            keys.append(("value", i.source))
    return (layer.op_type, tuple(keys))


def match_layers(a: GraphLayers, b: GraphLayers) -> dict[str, str]:
    """A-name → B-name for every matched layer (by name, then by structure)."""
    matched = {n: n for n in a.layers if n in b.layers}
    for _ in range(len(a.layers) + 1):
        rev = {v: k for k, v in matched.items()}
        free_b: dict[tuple, list[str]] = {}
        for name, layer in b.layers.items():
            if name not in rev:
                free_b.setdefault(_signature(layer, rev), []).append(name)
        new = 0
        for name, layer in a.layers.items():
            if name in matched:
                continue
            # A's producers are already in A-names; B's signatures were mapped into A-names.
            candidates = free_b.get(_signature(layer, {k: k for k in matched}))
            if candidates:
                matched[name] = candidates.pop(0)
                new += 1
        if not new:
            break
    return matched


# ---------------------------------------------------------------------------------- comparing


def _compare(la: Layer, lb: Layer, rename_b_to_a: Mapping[str, str]) -> LayerChange:
    change = LayerChange(la.name, lb.name, "same", la, lb)
    notes = change.changes
    if la.op_type != lb.op_type:
        notes.append(f"op type {la.op_type} -> {lb.op_type}")
    if la.attributes != lb.attributes:
        keys = sorted(k for k in set(la.attributes) | set(lb.attributes) if la.attributes.get(k) != lb.attributes.get(k))
        notes.append("attributes " + ", ".join(f"{k}: {la.attributes.get(k)!r} -> {lb.attributes.get(k)!r}" for k in keys))
    if la.precision != lb.precision:
        notes.append(f"precision {la.precision} -> {lb.precision}")
    if len(la.inputs) != len(lb.inputs):
        notes.append(f"inputs {len(la.inputs)} -> {len(lb.inputs)}")
    for ia, ib in zip(la.inputs, lb.inputs):
        _compare_input(ia, ib, rename_b_to_a, change)
    change.status = "changed" if notes else "same"
    return change


def _compare_input(ia: LayerInput, ib: LayerInput, rename: Mapping[str, str], change: LayerChange) -> None:
    notes, k = change.changes, ia.index
    src_b = rename.get(ib.producer, ib.producer) if ib.producer else None
    if (ia.producer or None) != src_b or (ia.producer is None and ia.constant is None and ia.source != ib.source):
        notes.append(f"input {k} comes from {ia.producer or ia.source!r} -> {ib.producer or ib.source!r}")
    qa, qb = ia.quant, ib.quant
    if qa is None and qb is not None:
        notes.append(f"input {k} quantized ({qb.kind}, {qb.dtype.lower()})")
    elif qa is not None and qb is None:
        notes.append(f"input {k} no longer quantized")
    elif qa is not None and not qa.same_as(qb):
        parts = []
        if qa.dtype != qb.dtype:
            parts.append(f"dtype {qa.dtype.lower()} -> {qb.dtype.lower()}")
        if qa.axis != qb.axis:
            parts.append(f"axis {qa.axis} -> {qb.axis}")
        if qa.block_size != qb.block_size:
            parts.append(f"block size {qa.block_size or '-'} -> {qb.block_size or '-'}")
        if np.shape(qa.scale) != np.shape(qb.scale):
            parts.append(f"scale shape {list(np.shape(qa.scale))} -> {list(np.shape(qb.scale))}")
        elif not np.array_equal(qa.scale, qb.scale):
            d = float(np.max(np.abs(np.asarray(qa.scale, np.float64) - np.asarray(qb.scale, np.float64))))
            parts.append(f"scale max abs diff {d:.3g}")
        za = None if qa.zero_point is None else np.asarray(qa.zero_point).astype(np.float64)
        zb = None if qb.zero_point is None else np.asarray(qb.zero_point).astype(np.float64)
        if (za is None) != (zb is None) or (za is not None and (za.shape != zb.shape or not np.array_equal(za, zb))):
            parts.append(f"zero point {summarize(qa.zero_point)} -> {summarize(qb.zero_point)}")
        notes.append(f"input {k} quantization: " + (", ".join(parts) or "zero point dtype"))
    ca, cb = ia.constant, ib.constant
    if (ca is None) != (cb is None):
        notes.append(f"input {k} {'became' if cb is not None else 'is no longer'} a constant")
    elif ca is not None:
        if ca.shape != cb.shape:
            notes.append(f"input {k} constant shape {list(ca.shape)} -> {list(cb.shape)}")
        else:
            d = float(np.max(np.abs(ca.astype(np.float64) - cb.astype(np.float64)))) if ca.size else 0.0
            change.weight_max_abs_diff[k] = d
            # A quantized weight's difference is its rounding error, reported by the precision change.
            if d and qa is None and qb is None:
                notes.append(f"input {k} constant values changed (max abs diff {d:.3g})")


def diff(a: str | os.PathLike, b: str | os.PathLike, dims: Mapping[str, int] | None = None) -> GraphDiff:
    """Compare two ONNX models (paths; never modified). ``dims`` sizes dynamic dims for MACs (default 1)."""
    ga, gb = graph_layers(a, dims), graph_layers(b, dims)
    matched = match_layers(ga, gb)
    rename_b_to_a = {v: k for k, v in matched.items()}
    changes: list[LayerChange] = []
    for name, layer in ga.layers.items():
        if name in matched:
            changes.append(_compare(layer, gb.layers[matched[name]], rename_b_to_a))
        else:
            changes.append(LayerChange(name, None, "removed", layer, None, [f"{layer.op_type} only in A"]))
    for name, layer in gb.layers.items():
        if name not in rename_b_to_a:
            changes.append(LayerChange(None, name, "added", None, layer, [f"{layer.op_type} only in B"]))
    graph_changes = []
    for what, va, vb in (("inputs", ga.model.graph.inputs, gb.model.graph.inputs),
                         ("outputs", ga.model.graph.outputs, gb.model.graph.outputs)):
        sa = [(v.name, str(v.dtype), shape_list(v.shape)) for v in va if v.name not in ga.model.graph.initializers]
        sb = [(v.name, str(v.dtype), shape_list(v.shape)) for v in vb if v.name not in gb.model.graph.initializers]
        if sa != sb:
            graph_changes.append(f"graph {what} {sa} -> {sb}")
    summary = {
        "macs_by_precision": {"a": ga.macs_by_precision(), "b": gb.macs_by_precision()},
        "layers_by_precision": {"a": ga.layers_by_precision(), "b": gb.layers_by_precision()},
        "qdq_nodes": {"a": ga.qdq_nodes, "b": gb.qdq_nodes},
        "dims": dict(dims or {}),
    }
    return GraphDiff(str(a), str(b), changes, graph_changes, summary)


# ---------------------------------------------------------------------------------- rendering


def _scale_text(q) -> str:
    s = summarize(q.scale)
    scale = f"{s:.4g}" if isinstance(s, float) else f"[{s['n']}] {s['min']:.3g}..{s['max']:.3g}"
    z = summarize(q.zero_point)
    zp = "-" if z is None else (f"{z}" if not isinstance(z, dict) else f"[{z['n']}] {z['min']:g}..{z['max']:g}")
    axis = "" if q.axis is None else f" axis {q.axis}" + (f" block {q.block_size}" if q.block_size else "")
    return f"{q.kind[0]}:{q.dtype.lower()} scale {scale} zp {zp}{axis}"


def _layer_quant_text(layer: Layer | None) -> str:
    if layer is None:
        return "-"
    parts = [f"in{i.index} {_scale_text(i.quant)}" for i in layer.inputs if i.quant is not None]
    parts += [f"in{i.index} via Cast {', '.join(c.lower() for c in i.casts)}" for i in layer.inputs
              if i.quant is None and i.casts and i.casts[0] != "FLOAT"]
    return "; ".join(parts) if parts else ""


def _summary_lines(d: GraphDiff) -> list[str]:
    s = d.summary
    precisions = sorted(set(s["macs_by_precision"]["a"]) | set(s["macs_by_precision"]["b"]), key=precision_order)
    lines = ["MACs by precision (dynamic dims = 1 unless --dim):", f"  {'':<8} {'A':>16} {'B':>16}"]
    for p in precisions:
        lines.append(f"  {p:<8} {s['macs_by_precision']['a'].get(p, 0):>16,} {s['macs_by_precision']['b'].get(p, 0):>16,}")
    qa = ", ".join(f"{k} {v}" for k, v in s["qdq_nodes"]["a"].items()) or "none"
    qb = ", ".join(f"{k} {v}" for k, v in s["qdq_nodes"]["b"].items()) or "none"
    lines.append(f"Q/DQ/Cast nodes: A: {qa}; B: {qb}")
    return lines


def format_text(d: GraphDiff) -> str:
    counts = d.counts()
    lines = [f"--- {d.a}", f"+++ {d.b}",
             f"layers: {counts['same']} same, {counts['changed']} changed, {counts['added']} added, {counts['removed']} removed"
             + ("; equivalent" if d.equivalent else "")]
    lines += [f"! {g}" for g in d.graph_changes]
    lines += _summary_lines(d)
    for c in d.layers:
        if c.status == "same" and not _has_quant(c):
            continue
        mark = {"same": " ", "changed": "~", "added": "+", "removed": "-"}[c.status]
        pa = c.a.precision if c.a else "-"
        pb = c.b.precision if c.b else "-"
        name = c.name if not (c.name_a and c.name_b and c.name_a != c.name_b) else f"{c.name_a} => {c.name_b}"
        lines.append(f"{mark} {name} ({(c.b or c.a).op_type}) {pa} -> {pb}")
        qa, qb = _layer_quant_text(c.a), _layer_quant_text(c.b)
        if qa:
            lines.append(f"    A: {qa}")
        if qb:
            lines.append(f"    B: {qb}")
        for note in c.changes:
            if not note.startswith("precision"):
                lines.append(f"    {note}")
        if _weight_diff_text(c):
            lines.append(f"    {_weight_diff_text(c)}")
    return "\n".join(lines)


def _weight_diff_text(c: LayerChange) -> str:
    """Max abs difference of the (dequantized) constant inputs, when nonzero."""
    parts = [f"in{k} {v:.3g}" for k, v in sorted(c.weight_max_abs_diff.items()) if v]
    return "constant max abs diff (dequantized): " + ", ".join(parts) if parts else ""


_CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:18px} table{border-collapse:collapse;width:100%;table-layout:fixed}
td,th{border:1px solid #ddd;padding:3px 6px;vertical-align:top;word-wrap:break-word}
th{background:#f3f3f3;text-align:left} .num{text-align:right;font-variant-numeric:tabular-nums}
details{margin:2px 0} summary{cursor:pointer;padding:3px 4px}
summary.changed{background:#fff4d6} summary.added{background:#e3f7e3} summary.removed{background:#fde4e4}
summary.same{background:#f7f7f7} .side{display:grid;grid-template-columns:1fr 1fr;gap:8px;margin:4px 0 8px 16px}
.side>div{border:1px solid #ddd;padding:4px 8px;background:#fff} .notes{margin:2px 0 2px 16px;color:#8a5a00}
code{font-size:12px} .eq{color:#176b17;font-weight:bold} .ne{color:#a61b1b;font-weight:bold}
"""


def _side_html(layer: Layer | None, label: str) -> str:
    if layer is None:
        return f"<div><b>{label}</b>: <i>absent</i></div>"
    e = html.escape
    rows = [f"<b>{label}</b>: <code>{e(layer.name)}</code> {e(layer.op_type)} <b>{e(layer.precision)}</b>",
            f"MACs {layer.macs:,}" if layer.macs else ""]
    if layer.attributes:
        rows.append("attributes: " + ", ".join(f"{e(k)}={e(str(v))}" for k, v in layer.attributes.items()))
    for i in layer.inputs:
        desc = f"in{i.index} <code>{e(i.source)}</code>"
        if i.quant is not None:
            desc += " " + e(_scale_text(i.quant))
        elif i.constant is not None:
            desc += f" constant {list(i.constant.shape)}"
        if i.casts:
            desc += " via Cast " + e(", ".join(i.casts))
        rows.append(desc)
    return "<div>" + "<br>".join(r for r in rows if r) + "</div>"


def format_html(d: GraphDiff) -> str:
    """One self-contained HTML page: summary, then every layer as a collapsible A | B row."""
    e = html.escape
    counts = d.counts()
    s = d.summary
    precisions = sorted(set(s["macs_by_precision"]["a"]) | set(s["macs_by_precision"]["b"]), key=precision_order)
    verdict = '<span class="eq">equivalent</span>' if d.equivalent else '<span class="ne">different</span>'
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>onnxq diff {e(os.path.basename(d.a))} vs {e(os.path.basename(d.b))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>onnxq diff: {verdict}</h1>",
        f"<p>A: <code>{e(d.a)}</code><br>B: <code>{e(d.b)}</code></p>",
        f"<p>layers: {counts['same']} same, {counts['changed']} changed, {counts['added']} added, {counts['removed']} removed</p>",
    ]
    if d.graph_changes:
        out.append("<ul>" + "".join(f"<li>{e(g)}</li>" for g in d.graph_changes) + "</ul>")
    out.append('<table id="summary"><tr><th>precision</th><th class="num">MACs A</th><th class="num">MACs B</th>'
               '<th class="num">layers A</th><th class="num">layers B</th></tr>')
    for p in precisions:
        out.append(f"<tr><td>{e(p)}</td><td class='num'>{s['macs_by_precision']['a'].get(p, 0):,}</td>"
                   f"<td class='num'>{s['macs_by_precision']['b'].get(p, 0):,}</td>"
                   f"<td class='num'>{s['layers_by_precision']['a'].get(p, 0)}</td>"
                   f"<td class='num'>{s['layers_by_precision']['b'].get(p, 0)}</td></tr>")
    out.append("</table>")
    qa = ", ".join(f"{k} {v}" for k, v in s["qdq_nodes"]["a"].items()) or "none"
    qb = ", ".join(f"{k} {v}" for k, v in s["qdq_nodes"]["b"].items()) or "none"
    out.append(f"<p>Q/DQ/Cast nodes: A: {e(qa)}; B: {e(qb)}</p><h2>Layers</h2><div id='layers'>")
    for c in d.layers:
        pa = c.a.precision if c.a else "-"
        pb = c.b.precision if c.b else "-"
        op = (c.b or c.a).op_type
        title = f"{c.name} ({op}) {pa} → {pb}" + (f" · {len(c.changes)} change(s)" if c.changes else "")
        opened = " open" if c.status != "same" and len(d.layers) <= 200 else ""
        out.append(f'<details class="layer {c.status}"{opened} data-status="{c.status}">'
                   f'<summary class="{c.status}">{e(title)}</summary>')
        notes = c.changes + ([_weight_diff_text(c)] if _weight_diff_text(c) else [])
        if notes:
            out.append('<div class="notes">' + "<br>".join(e(n) for n in notes) + "</div>")
        out.append(f'<div class="side">{_side_html(c.a, "A")}{_side_html(c.b, "B")}</div></details>')
    out.append("</div></body></html>")
    return "\n".join(out)


def render(d: GraphDiff, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(d.to_json(), indent=1)
    if fmt == "html":
        return format_html(d)
    return format_text(d)
