"""Figures, written as PNG files with matplotlib's object API (no pyplot state, no display).

Each plotting function takes data frames and a path, draws one figure and writes it
atomically through :func:`save_figure`.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pomt_cli.outputs import atomic_output

#: Above this ratio between the largest and smallest latency the y axis is logarithmic.
LOG_SCALE_RATIO = 20.0


def new_figure(width: float = 8.0, height: float = 4.8) -> tuple[Figure, Axes]:
    """A figure with one set of axes and a light grid."""
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    return fig, ax


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` as PNG, atomically."""
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def plot_latency(
    frame: pl.DataFrame,
    path: str | Path,
    *,
    title: str,
    steps: pl.DataFrame | None = None,
) -> Path:
    """Latency against kept tokens, one line per batch size, with the p10-p90 band.

    Args:
        frame: a latency profile (``batch_size, tokens, latency_ms, p10_ms, p90_ms, status``).
        path: the PNG to write.
        title: the figure's title.
        steps: rows of :func:`pomt_cli.latency.find_steps`; each is marked where the
            curve drops, with its relative drop.
    """
    fig, ax = new_figure()
    measured = frame.filter(pl.col("latency_ms").is_not_null())
    colors = {}
    for (batch_size,), part in frame.sort("batch_size").group_by(["batch_size"], maintain_order=True):
        curve = part.filter(pl.col("latency_ms").is_not_null()).sort("tokens")
        line = ax.plot(curve["tokens"], curve["latency_ms"], lw=1.3, marker="." if curve.height < 60 else None,
                       label=f"batch {batch_size}")[0]
        colors[batch_size] = line.get_color()
        ax.fill_between(curve["tokens"], curve["p10_ms"], curve["p90_ms"], color=line.get_color(), alpha=0.18, lw=0)
        oom = part.filter(pl.col("status") == "oom")["tokens"]
        if len(oom):
            ax.plot(oom, [0.02] * len(oom), "x", color=line.get_color(), transform=ax.get_xaxis_transform(),
                    label=f"batch {batch_size}: out of memory")
    if measured.height:
        low, high = measured["latency_ms"].min(), measured["latency_ms"].max()
        if low and low > 0 and high / low > LOG_SCALE_RATIO:
            ax.set_yscale("log")
    if steps is not None:
        for row in steps.iter_rows(named=True):
            x = (row["from_tokens"] + row["to_tokens"]) / 2
            color = colors.get(row["batch_size"], "black")
            ax.annotate("", xy=(x, row["to_ms"]), xytext=(x, row["from_ms"]),
                        arrowprops={"arrowstyle": "->", "color": color, "lw": 1.2})
            ax.annotate(f"{row['from_tokens']}\u2192{row['to_tokens']}: \u2212{row['drop_pct']:.0f}%",
                        xy=(x, row["from_ms"]), xytext=(3, 4), textcoords="offset points", fontsize=7, color=color)
    ax.set_xlabel("kept tokens n (entering the first block)")
    ax.set_ylabel("latency per forward pass (ms, median; band p10-p90)")
    ax.set_title(title, fontsize=10)
    if frame.height:
        ax.legend(fontsize=8)
    return save_figure(fig, path)
