"""Figures, written as PNG files with matplotlib's object API (no pyplot state, no display).

Each plotting function takes data frames and a path, draws one figure and writes it
atomically through :func:`save_figure`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pomt_cli.formats.outputs import atomic_output

if TYPE_CHECKING:
    from pomt_cli.formats.report import Report

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


#: Inches per batch size's panel in the latency figure.
LATENCY_PANEL_HEIGHT = 3.4


def latency_figure(frame: pl.DataFrame, *, title: str, steps: pl.DataFrame | None = None) -> Figure:
    """Latency against kept tokens, one panel per batch size (each with its own y axis, so that
    the steps of a fast curve are as visible as those of a slow one), one line per POMT layer,
    with the p10-p90 band.

    Args:
        frame: a latency profile (``batch_size, tokens, latency_ms, p10_ms, p90_ms, status``).
        title: the figure's title.
        steps: rows of :func:`pomt_cli.measure.steps.find_steps`; each is marked where the
            curve drops, with its relative drop.
    """
    if "layer" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, dtype=pl.Int64).alias("layer"))
    batch_sizes = frame["batch_size"].unique().sort().to_list() or [None]
    fig = Figure(figsize=(8.0, max(4.8, LATENCY_PANEL_HEIGHT * len(batch_sizes))), layout="constrained")
    axes = fig.subplots(len(batch_sizes), 1, sharex=True, squeeze=False)[:, 0]
    proxy = frame["layer"].is_null().all()
    for ax, batch_size in zip(axes, batch_sizes):
        ax.grid(True, alpha=0.3)
        panel = frame.filter(pl.col("batch_size") == batch_size)
        colors = {}
        for (layer,), part in panel.sort("layer", nulls_last=False).group_by(["layer"], maintain_order=True):
            curve = part.filter(pl.col("latency_ms").is_not_null()).sort("tokens")
            name = f"batch {batch_size}" if layer is None else f"POMT at layer {layer}, batch {batch_size}"
            line = ax.plot(curve["tokens"], curve["latency_ms"], lw=1.3, marker="." if curve.height < 60 else None,
                           label=name)[0]
            colors[layer] = line.get_color()
            ax.fill_between(curve["tokens"], curve["p10_ms"], curve["p90_ms"], color=line.get_color(), alpha=0.18,
                            lw=0)
            oom = part.filter(pl.col("status") == "oom")["tokens"]
            if len(oom):
                ax.plot(oom, [0.02] * len(oom), "x", color=line.get_color(), transform=ax.get_xaxis_transform(),
                        label=f"{name}: out of memory")
        measured = panel.filter(pl.col("latency_ms").is_not_null())
        if measured.height:
            low, high = measured["latency_ms"].min(), measured["latency_ms"].max()
            if low and low > 0 and high / low > LOG_SCALE_RATIO:
                ax.set_yscale("log")
        if steps is not None and steps.height:
            for row in steps.filter(pl.col("batch_size") == batch_size).iter_rows(named=True):
                x = (row["from_tokens"] + row["to_tokens"]) / 2
                color = colors.get(row.get("layer"), "black")
                ax.annotate("", xy=(x, row["to_ms"]), xytext=(x, row["from_ms"]),
                            arrowprops={"arrowstyle": "->", "color": color, "lw": 1.2})
                ax.annotate(f"{row['from_tokens']}\u2192{row['to_tokens']}: \u2212{row['drop_pct']:.0f}%",
                            xy=(x, row["from_ms"]), xytext=(3, 4), textcoords="offset points", fontsize=7,
                            color=color)
        ax.set_ylabel("latency (ms, median;\nband p10-p90)")
        if panel.height:
            ax.legend(fontsize=8)
    axes[-1].set_xlabel("kept tokens n (entering the first block)" if proxy else "kept tokens n (leaving POMT's block)")
    fig.suptitle(title, fontsize=10)
    return fig


def plot_latency(
    frame: pl.DataFrame,
    path: str | Path,
    *,
    title: str,
    steps: pl.DataFrame | None = None,
) -> Path:
    """Write :func:`latency_figure` to ``path`` as a PNG."""
    return save_figure(latency_figure(frame, title=title, steps=steps), path)


def plot_accuracy(frame: pl.DataFrame, path: str | Path, *, title: str) -> Path:
    """Top-1 (and top-5) accuracy in percent against kept tokens n (one curve per POMT layer), written as a PNG.

    Args:
        frame: an accuracy profile (``tokens``, ``accuracy``, ``top5``, optionally ``layer``).
        path: the PNG to write (atomically).
        title: the figure's title.
    """
    fig, ax = new_figure()
    if "layer" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, dtype=pl.Int64).alias("layer"))
    for (layer,), curve in frame.group_by(["layer"], maintain_order=True):
        curve = curve.sort("tokens")
        marker = "." if curve.height < 60 else None
        where = "" if layer is None else f", POMT at layer {layer}"
        line = ax.plot(curve["tokens"], curve["accuracy"], lw=1.5, marker=marker, label=f"top-1{where}")[0]
        ax.plot(curve["tokens"], curve["top5"], lw=1.0, ls="--", marker=marker, color=line.get_color(),
                label=f"top-5{where}")
    ax.set_xlabel("kept tokens n (leaving the last block)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    return save_figure(fig, path)


#: Inches per batch size's panel in the compute-r figure.
PANEL_HEIGHT = 3.6


def _panel(ax: Axes, curve: pl.DataFrame, report: Report, batch_size: int) -> None:
    """One batch size: latency on the left axis, accuracy and utility on two right axes."""
    choice = report.choice_for(batch_size)
    marker = "." if curve.height < 60 else None
    acc_ax = ax.twinx()
    util_ax = ax.twinx()
    util_ax.spines["right"].set_position(("axes", 1.12))
    lines = []
    if "layer" not in curve.columns or curve["layer"].is_null().all():
        groups = [(None, curve.sort("tokens"))]
    else:
        # The unpruned point (n = N, one row) belongs to every layer's curve.
        full = curve.filter(pl.col("R") == 0)
        groups = [(layer, pl.concat([full.with_columns(layer=pl.lit(layer, dtype=full["layer"].dtype)),
                                     curve.filter((pl.col("layer") == layer) & (pl.col("R") != 0))]).sort("tokens"))
                  for layer in curve["layer"].drop_nulls().unique().sort().to_list()]
    styles = ["-", "--", ":", "-."]
    for i, (layer, part) in enumerate(groups):
        where = "" if layer is None else f", layer {layer}"
        ls = styles[i % len(styles)]
        lines += [
            ax.plot(part["tokens"], part["latency_ms"], color="tab:blue", lw=1.4, ls=ls, marker=marker,
                    label=f"latency{where}")[0],
            acc_ax.plot(part["tokens"], part["accuracy"], color="tab:red", lw=1.4, ls=ls, marker=marker,
                        label=f"top-1 accuracy{where}")[0],
            util_ax.plot(part["tokens"], part["utility"], color="tab:green", lw=1.1, ls=ls,
                         label=f"utility (\u03b1={report.alpha:g}){where}")[0],
        ]
    if report.latency_budget_ms is not None:
        lines.append(ax.axhline(report.latency_budget_ms, color="tab:blue", lw=0.9, ls=":",
                                label=f"latency budget {report.latency_budget_ms:g} ms"))
    if report.max_accuracy_drop is not None and choice is not None:
        floor = choice.accuracy + choice.accuracy_lost - report.max_accuracy_drop
        lines.append(acc_ax.axhline(floor, color="tab:red", lw=0.9, ls=":",
                                    label=f"accuracy floor (\u2212{report.max_accuracy_drop:g} pts)"))
    if choice is not None:
        where = "" if choice.layer is None else f" at layer {choice.layer}"
        lines.append(ax.axvline(choice.tokens, color="black", lw=1.0, ls="-.",
                                label=f"n* = {choice.tokens} (R = {choice.R}{where})"))
    ax.set_xlabel("kept tokens n")
    ax.set_ylabel("latency (ms)", color="tab:blue")
    acc_ax.set_ylabel("top-1 accuracy (%)", color="tab:red")
    util_ax.set_ylabel("utility", color="tab:green")
    util_ax.set_ylim(0, 1.05)
    ax.set_title(f"batch {batch_size}", fontsize=9)
    util_ax.legend(handles=lines, fontsize=7, loc="lower right")


def plot_selection(curves: dict[int, pl.DataFrame], report: Report, path: str | Path, *, title: str) -> Path:
    """Latency, accuracy and utility against kept tokens, n* marked; one panel per batch size.

    Args:
        curves: per batch size, the scored points (:func:`pomt_cli.selection.score`).
        report: the report (for the choices, alpha and budgets).
        path: the PNG to write (atomically).
        title: the figure's title.
    """
    batch_sizes = list(curves)
    fig, first = new_figure(9.0, PANEL_HEIGHT * max(1, len(batch_sizes)))
    grid = fig.add_gridspec(max(1, len(batch_sizes)), 1)
    first.set_subplotspec(grid[0])
    axes = [first]
    for i in range(1, len(batch_sizes)):
        ax = fig.add_subplot(grid[i])
        ax.grid(True, alpha=0.3)
        axes.append(ax)
    for ax, b in zip(axes, batch_sizes):
        _panel(ax, curves[b], report, b)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
