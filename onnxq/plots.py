"""PNG charts of the sweep and the solver. matplotlib is imported here only (the ``plot`` extra):
quantization itself does not need it, so without it the JSON and Markdown are still written and a
note says how to get the chart."""

from __future__ import annotations

import math
import os
from pathlib import Path

from onnxq import modelio
from onnxq.progress import log


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("onnxq: matplotlib is not installed, no chart written; pip install 'onnxq[plot]'")
        return None
    return plt


def _save(fig, plt, path: Path) -> Path:
    with modelio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def sweep_chart(result, path: str | os.PathLike) -> Path | None:
    """Bar chart of each layer's SNR (dB, lower = more sensitive) per precision and mode."""
    plt = _pyplot()
    if plt is None:
        return None
    names = [layer.name for layer in result.layers]
    series = []
    for p in result.precisions:
        if result.local:
            series.append((f"local {p}", [result.local[n][p]["snr_db"] for n in names]))
        if result.e2e:
            series.append((f"e2e {p}", [result.e2e[n][p]["snr_db"] for n in names]))
    fig, ax = plt.subplots(figsize=(min(18.0, max(6.0, 0.12 * len(names) * max(1, len(series)))), 4.5))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series):
        finite = [v if math.isfinite(v) else 0.0 for v in values]
        ax.bar([x + i * width for x in range(len(names))], finite, width=width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))])
    ax.set_xticklabels([n[-28:] for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("SNR dB (lower = more sensitive)")
    title = f"per-layer sensitivity ({result.target})"
    if result.spearman:
        title += "; Spearman local vs e2e " + ", ".join(f"{k} {v:.2f}" for k, v in result.spearman.items() if v is not None)
    ax.set_title(title, fontsize=9)
    ax.set_xlim(-0.6, len(names))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, Path(path))


def solver_curve(candidates: list[dict], path: str | os.PathLike, *, accuracy_label: str, target: float | None) -> Path | None:
    """Accuracy against cost of every candidate the solver evaluated; the chosen one circled."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    pts = sorted(candidates, key=lambda c: c["cost"])
    ax.plot([c["cost"] for c in pts], [c["accuracy"] for c in pts], "o-", ms=4)
    for c in pts:
        ax.annotate(str(c["high_precision_layers"]), (c["cost"], c["accuracy"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if c.get("chosen"):
            ax.plot([c["cost"]], [c["accuracy"]], "o", ms=11, mfc="none", mec="red")
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("cost (relative to all layers in 8 bits)")
    ax.set_ylabel(accuracy_label)
    ax.set_title("solver candidates (labels: layers kept in high precision)", fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, Path(path))
