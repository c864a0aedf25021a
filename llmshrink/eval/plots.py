"""Line charts of training and evaluation curves, written as one PNG (matplotlib, no display needed)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmshrink.fileio import atomic_save_png


@dataclass
class Panel:
    """One chart: each series is a named line, (x values, y values)."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[list[float], list[float]]]
    log_y: bool = False


def save_curves_png(path: str | os.PathLike, panels: Sequence[Panel]) -> Path:
    """Draw `panels` side by side into the PNG at `path`, atomically (readers never see half a file)."""
    if not panels:
        raise ValueError("plots: no panels to draw")
    for panel in panels:
        if not panel.series:
            raise ValueError(f"plots: panel {panel.title!r} has no series to draw")
        for name, (xs, ys) in panel.series.items():
            if len(xs) != len(ys):
                raise ValueError(f"plots: series {name!r} in panel {panel.title!r} has {len(xs)} x and {len(ys)} y values")
    # Lazy: matplotlib is slow to import and only needed here. Figure + Agg canvas, not pyplot, so
    # no global figure state and no GUI backend is ever picked.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for name, (xs, ys) in panel.series.items():
            ax.plot(xs, ys, label=name, marker="o" if len(xs) < 20 else None, markersize=3)
        ax.set(xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.set_title(textwrap.fill(panel.title, 48), fontsize=10)  # a long title wraps instead of being cut
        if panel.log_y:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()

    return atomic_save_png(fig, path)
