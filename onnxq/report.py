"""Rendering of a :class:`onnxq.check.CheckReport`: JSON, Markdown, and one self-contained HTML page.

The HTML page carries its plots inline (SVG drawn by matplotlib: per output, the distribution of
log10 |candidate − reference| for every candidate; per batch size, median/p90/p99 latency bars),
so it can be mailed or archived as one file. Without matplotlib (``pip install 'onnxq[plot]'``)
the page has the same tables and says why it has no plots.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from pathlib import Path

from onnxq import modelio

FORMATS = ("json", "md", "html")


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def _accuracy_rows(report) -> list[list[str]]:
    rows = []
    for c in report.candidates:
        for a in c.outputs:
            rows.append([
                c.label, a.name, _fmt(a.cosine_mean, 6), _fmt(a.cosine_min, 6), _fmt(a.snr_db, 4),
                _fmt(a.max_abs_error), _fmt(a.max_rel_error), _fmt(a.top1_agreement), _fmt(a.top5_agreement),
                f"{_fmt(a.worst_slice_snr_db, 4)} ({a.worst_slice})" if a.worst_slice_snr_db is not None else "–",
                "; ".join(a.notes) or "–",
            ])
    return rows


ACCURACY_HEADER = ["candidate", "output", "cosine (mean)", "cosine (min)", "SNR dB", "max abs err", "max rel err", "top-1 agr.", "top-5 agr.", "worst slice SNR dB", "notes"]
LATENCY_HEADER = ["model", "batch", "median ms", "p90 ms", "p99 ms", "ratio to FP32 (median)"]
LAYER_HEADER = ["local SNR (dB)", "SNR at DQ vs FP32 (dB)", "SNR of Q input vs FP32 (dB)", "tensor", "compared with", "read by"]


def _latency_rows(report) -> list[list[str]]:
    rows = [[Path(report.reference).name + " (reference)", str(lat.batch), _fmt(lat.median_ms), _fmt(lat.p90_ms), _fmt(lat.p99_ms), "1"] for lat in report.reference_latency]
    for c in report.candidates:
        for lat in c.latency:
            rows.append([c.label, str(lat.batch), _fmt(lat.median_ms), _fmt(lat.p90_ms), _fmt(lat.p99_ms), _fmt(c.latency_ratio.get(lat.batch), 3)])
    return rows


def _layer_rows(stats, top: int) -> list[list[str]]:
    return [
        [_fmt(s.snr_local_db, 4), _fmt(s.snr_dq_db, 4), _fmt(s.snr_input_db, 4), s.pair.tensor, s.pair.float_ref, ", ".join(s.pair.consumers)]
        for s in stats[:top]
    ]


def _verdict_lines(report) -> list[str]:
    return [f"{c.label}: {report.verdict(c)}" for c in report.candidates]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[cell.replace("|", "\\|") for cell in row] for row in rows]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(out)


def to_markdown(report, layer_rows: int = 20) -> str:
    env = report.environment
    parts = [
        f"# onnxq check: {'PASS' if report.passed else 'FAIL'}",
        "",
        f"Reference: `{report.reference}` (ONNX Runtime, CPU, FP32). Data: `{report.data}`, {report.samples} samples. "
        f"Threads: {report.threads}. onnxruntime {env.get('onnxruntime')}, TensorRT {env.get('tensorrt') or 'not installed'}, "
        f"GPU {env.get('gpu') or 'none'}.",
        "",
        "## Verdict",
        "",
        *[f"- {line}" for line in _verdict_lines(report)],
        "",
        "## Accuracy",
        "",
        _md_table(ACCURACY_HEADER, _accuracy_rows(report)),
    ]
    if report.reference_latency:
        parts += ["", "## Latency", "", _md_table(LATENCY_HEADER, _latency_rows(report))]
    header, metrics = report.metric_table()
    if metrics:
        parts += ["", "## Task metric", "", _md_table(header, metrics)]
    for c in report.candidates:
        if c.layers is not None:
            parts += ["", f"## Per-layer SNR: {c.label} (lowest {min(layer_rows, c.layers.matched)} of {c.layers.matched})", "",
                      f"{c.layers.summary()}.", "", _md_table(LAYER_HEADER, _layer_rows(c.layers.stats, layer_rows))]
            parts += [""] * bool(c.layers.unmatched) + [f"- unmatched: `{t}` ({r})" for t, r in c.layers.unmatched]
    return "\n".join(parts) + "\n"


# --- HTML --------------------------------------------------------------------------------------


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: the SVG is inlined


def _error_plots(report) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from onnxq.metrics import ERROR_HIST_EDGES

    names = [a.name for a in report.candidates[0].outputs] if report.candidates else []
    plots = []
    centres = (ERROR_HIST_EDGES[:-1] + ERROR_HIST_EDGES[1:]) / 2
    width = ERROR_HIST_EDGES[1] - ERROR_HIST_EDGES[0]
    for i, name in enumerate(names):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        n = len(report.candidates)
        used = [k for c in report.candidates if i < len(c.outputs) for k, v in enumerate(c.outputs[i].error_histogram()["counts"]) if v]
        for j, c in enumerate(report.candidates):
            if i >= len(c.outputs):
                continue
            h = c.outputs[i].error_histogram()
            total = max(1, sum(h["counts"]) + h["exact"] + h["below"] + h["above"])
            frac = np.array(h["counts"]) / total
            ax.bar(centres + (j - (n - 1) / 2) * width / n, frac, width=width / n, label=c.label, alpha=0.85)
        if used:  # zoom on the populated bins (the edges span 1e-8 .. 1e3)
            ax.set_xlim(ERROR_HIST_EDGES[max(min(used) - 2, 0)], ERROR_HIST_EDGES[min(max(used) + 3, len(ERROR_HIST_EDGES) - 1)])
        ax.set_xlabel("log10 |candidate − reference|")
        ax.set_ylabel("fraction of elements")
        ax.set_title(f"error distribution: {name}")
        ax.legend(fontsize=7)
        plots.append((f"Error distribution — {name}", _svg(fig)))
    return plots


def _latency_plot(report) -> tuple[str, str] | None:
    if not report.reference_latency:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = [(Path(report.reference).name + " (FP32)", report.reference_latency)] + [(c.label, c.latency) for c in report.candidates]
    batches = [lat.batch for lat in report.reference_latency]
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * len(models) * len(batches)))
    y = 0.0
    ticks, labels = [], []
    for b_index, batch in enumerate(batches):
        for label, lats in models:
            lat = lats[b_index]
            ax.barh(y, lat.median_ms, color="tab:blue")
            ax.errorbar(lat.p90_ms, y, xerr=0, fmt="|", color="tab:orange", markersize=12)
            ax.errorbar(lat.p99_ms, y, xerr=0, fmt="|", color="tab:red", markersize=12)
            ticks.append(y)
            labels.append(f"{label} · batch {batch}")
            y += 1
        y += 0.5
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("latency ms (bar: median; orange: p90; red: p99)")
    ax.set_title("latency")
    ax.set_xlim(0, max(np.max([lat.p99_ms for _, lats in models for lat in lats]), 1e-6) * 1.1)
    return "Latency", _svg(fig)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2} td:first-child,th:first-child{text-align:left}
.pass{color:#186a1f;font-weight:bold}.fail{color:#b00020;font-weight:bold}
figure{margin:1em 0} figure svg{max-width:100%;height:auto}
"""


def to_html(report, layer_rows: int = 20) -> str:
    env = report.environment
    verdict = "".join(
        f"<li class='{'pass' if c.passed else 'fail'}'>{html.escape(line)}</li>"
        for c, line in zip(report.candidates, _verdict_lines(report))
    )
    body = [
        f"<h1>onnxq check: <span class='{'pass' if report.passed else 'fail'}'>{'PASS' if report.passed else 'FAIL'}</span></h1>",
        f"<p>Reference <code>{html.escape(report.reference)}</code> (ONNX Runtime, CPU, FP32); data "
        f"<code>{html.escape(report.data)}</code>, {report.samples} samples; threads {report.threads}; "
        f"onnxruntime {html.escape(str(env.get('onnxruntime')))}; TensorRT {html.escape(str(env.get('tensorrt') or 'not installed'))}; "
        f"GPU {html.escape(str(env.get('gpu') or 'none'))}.</p>",
        f"<h2>Verdict</h2><ul id='verdict'>{verdict}</ul>",
        "<h2>Accuracy</h2>",
        _html_table(ACCURACY_HEADER, _accuracy_rows(report)),
    ]
    if report.reference_latency:
        body += ["<h2>Latency</h2>", _html_table(LATENCY_HEADER, _latency_rows(report))]
    header, metrics = report.metric_table()
    if metrics:
        body += ["<h2>Task metric</h2>", _html_table(header, metrics)]
    for c in report.candidates:
        if c.layers is not None:
            body += [f"<h2>Per-layer SNR: {html.escape(c.label)}</h2>",
                     f"<p>lowest {min(layer_rows, c.layers.matched)} of {c.layers.matched} quantized activations; {html.escape(c.layers.summary())}</p>",
                     _html_table(LAYER_HEADER, _layer_rows(c.layers.stats, layer_rows))]
            body += [f"<p>unmatched: {html.escape(t)} ({html.escape(r)})</p>" for t, r in c.layers.unmatched]
    body.append("<h2>Plots</h2>")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        body.append("<p id='no-plots'>No plots: matplotlib is not installed (pip install 'onnxq[plot]').</p>")
    else:
        plots = _error_plots(report)
        lat = _latency_plot(report)
        if lat:
            plots.append(lat)
        for title, svg in plots:
            body.append(f"<figure class='plot'><figcaption>{html.escape(title)}</figcaption>{svg}</figure>")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>onnxq check</title>"
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def to_json_text(report) -> str:
    return json.dumps(report.to_json(), indent=1, default=str)


def report_paths(base: str | os.PathLike, formats=FORMATS) -> dict[str, Path]:
    """``{format: <base>.<format>}`` (a ``.json``/``.md``/``.html`` suffix on ``base`` is dropped)."""
    base = Path(base)
    base = base.with_name(base.name.removesuffix(".json").removesuffix(".md").removesuffix(".html"))
    return {fmt: base.with_name(f"{base.name}.{fmt}") for fmt in formats}


def write_reports(report, base: str | os.PathLike, formats=FORMATS) -> dict[str, Path]:
    """Write ``<base>.json``, ``<base>.md`` and ``<base>.html`` as one transaction; return the paths."""
    render = {"json": to_json_text, "md": to_markdown, "html": to_html}
    out = report_paths(base, formats)
    with modelio.transaction(out.values(), [report.reference]):
        for fmt, path in out.items():
            text = render[fmt](report)
            with modelio.atomic_path(path) as tmp:
                tmp.write_text(text, encoding="utf-8")
    return out
