"""pareto.png of `llmshrink compare`: size on disk against a quality metric, with the Pareto front."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from llmshrink.fileio import atomic_save_png

if TYPE_CHECKING:
    from llmshrink.compare import Row

X_KEY = "size_bytes"  # the x axis of every comparison


def save_pareto_png(path: str | os.PathLike, rows: Sequence[Row], metric: str, higher_better: bool,
                    label: str | None = None) -> Path:
    """Scatter size (MB) vs `metric`, labelled, base rows as stars, the Pareto front as a step line.

    `label`: the y axis's name, by default the metric key."""
    # Figure + Agg canvas, not pyplot: no global state, no GUI backend (as in eval/plots.py).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    drawn = [r for r in rows if r.pareto is not None]  # pareto is None exactly when a coordinate is missing
    for kind, style in (("checkpoint", {"marker": "o", "s": 40, "color": "C0"}),
                        ("base", {"marker": "*", "s": 180, "color": "C3"})):
        points = [r for r in drawn if r.kind == kind]
        if points:
            ax.scatter([r.metrics[X_KEY] / 1e6 for r in points], [r.metrics[metric] for r in points],
                       label="base model" if kind == "base" else "checkpoint", zorder=3,
                       edgecolors=["black" if r.pareto else "none" for r in points],
                       **style)
    front = sorted((r for r in drawn if r.pareto), key=lambda r: (r.metrics[X_KEY], r.metrics[metric]))
    if len(front) > 1:
        # post-steps: with a size budget between two front points, the better one reachable is the smaller's
        ax.step([r.metrics[X_KEY] / 1e6 for r in front], [r.metrics[metric] for r in front], where="post",
                color="C1", linewidth=1.5, label="Pareto front", zorder=2)
    for r in drawn:
        ax.annotate(r.name, (r.metrics[X_KEY] / 1e6, r.metrics[metric]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    if not higher_better and "perplexity" in metric and all(r.metrics[metric] > 0 for r in drawn):
        from matplotlib.ticker import LogFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter())  # "60", not "6x10^1"; minor ticks labelled when few
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.margins(x=0.12)  # room for the labels of the outermost points
    label = label or metric
    ax.set(xlabel="size on disk (MB)", ylabel=label)
    ax.set_title(f"size vs {label} ({'higher' if higher_better else 'lower'} is better)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)

    return atomic_save_png(fig, path)
