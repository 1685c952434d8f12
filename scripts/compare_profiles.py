"""Compare latency profiles of the same model and grid: how far apart are they, and do they step alike?

Two uses. Repeatability (docs/PERFORMANCE.md): run `pomt profile` twice with the same
options (into two folders) and compare. Runtimes (issue 13): run the same `pomt profile`
with `--runtime eager`, `onnxruntime` and `compile` and compare, to see where the
curves' steps differ between runtimes.

Each profile is labelled by its runtime (from its metadata), or by its file name when two
share a runtime. Prints, per profile after the first and batch size, the median, the
90th percentile and the largest |L_i(n) - L_1(n)| / L_1(n) over the common points; the
largest steps of each profile (`find_steps`); and per batch size the steps found in one
profile but not in another (a step matches another when their token ranges overlap).

    python scripts/compare_profiles.py runs/a/latency_....parquet runs/b/latency_....parquet [more ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.table import Table

from pomt_cli.errors import PomtError
from pomt_cli.formats.latency import read_latency as read_latency_profile
from pomt_cli.measure.steps import find_steps
from pomt_cli.script_args import OneLineParser, number

KEY = ["batch_size", "tokens"]


def labels(paths: list[str], runtimes: list[str]) -> list[str]:
    """Each profile's runtime; its file name where two share a runtime; its path where two share that too."""
    names = [Path(p).name for p in paths]
    out = []
    for path, name, runtime in zip(paths, names, runtimes):
        if runtimes.count(runtime) == 1:
            out.append(runtime)
        else:
            out.append(name if names.count(name) == 1 else path)
    return out


def agreement(first: pl.DataFrame, other: pl.DataFrame) -> pl.DataFrame:
    """Per batch size: common points and the median, p90 and max of |L_i(n) - L_1(n)| / L_1(n)."""
    both = (
        first.select(*KEY, pl.col("latency_ms").alias("l1"))
        .join(other.select(*KEY, pl.col("latency_ms").alias("li")), on=KEY)
        .drop_nulls()
        .with_columns(rel=(pl.col("li") - pl.col("l1")).abs() / pl.col("l1"))
    )
    return both.group_by("batch_size").agg(
        points=pl.len(), median=pl.col("rel").median(), p90=pl.col("rel").quantile(0.9), max=pl.col("rel").max(),
    ).sort("batch_size")


def overlaps(a: dict, b: dict) -> bool:
    """Whether two steps' token ranges (from_tokens > to_tokens) overlap."""
    return a["to_tokens"] < b["from_tokens"] and b["to_tokens"] < a["from_tokens"]


def step_text(step: dict) -> str:
    return f"{step['from_tokens']}\u2192{step['to_tokens']} \u2212{step['drop_pct']:.0f}%"


def differences(steps: list[pl.DataFrame], names: list[str], batch_size: int, unmeasured: list[str]) -> str:
    """One line: each step of one profile that another profile lacks, and which profiles lack it
    (``unmeasured``: the profiles without measured points at this batch size, which have no steps)."""
    if unmeasured:
        return f"batch {batch_size}: no measured points in {', '.join(unmeasured)}"
    found = [s.filter(pl.col("batch_size") == batch_size).to_dicts() for s in steps]
    parts = []
    for i, mine in enumerate(found):
        for step in mine:
            lacking = [names[j] for j, theirs in enumerate(found)
                       if j != i and not any(overlaps(step, t) for t in theirs)]
            if lacking:
                parts.append(f"{names[i]} {step_text(step)} (not in {', '.join(lacking)})")
    return f"batch {batch_size}: " + ("; ".join(parts) if parts else "the same steps in every profile")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", nargs="+", metavar="PROFILE", help="two or more latency profiles (.parquet)")
    parser.add_argument("--steps", type=number(int, minimum=1, maximum=1000), default=4,
                        help="steps listed per profile and batch size (1 to 1000)")
    args = parser.parse_args(argv)
    if len(args.profiles) < 2:
        parser.error("give two or more latency profiles to compare")
    try:
        read = [read_latency_profile(p) for p in args.profiles]
    except PomtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    frames, metas = [f for f, _ in read], [m for _, m in read]
    measured = [f.drop_nulls("latency_ms") for f in frames]
    for path, frame in zip(args.profiles, measured):
        if frame.is_empty():
            print(f"error: {path} holds no measured points (none, or all out of memory): compare profiles "
                  "with measured points", file=sys.stderr)
            return 2
    for path, meta in zip(args.profiles[1:], metas[1:]):
        if meta.model != metas[0].model or meta.grid != metas[0].grid:
            print(f"error: {path} profiles {meta.model} on another grid than {args.profiles[0]} "
                  f"({metas[0].model}): compare profiles of one model and grid", file=sys.stderr)
            return 2
    names = labels(args.profiles, [m.runtime for m in metas])
    console = Console(highlight=False)
    first = metas[0]
    elapsed = ", ".join("?" if m.elapsed_s is None else f"{m.elapsed_s:.1f} s" for m in metas)
    console.print(f"{first.model}, {first.device_name}, {first.dtype}, {first.timing_mode}; measuring {elapsed}",
                  markup=False)
    table = Table(title=f"|L_i(n) - L_1(n)| / L_1(n) over the common points, 1 = {names[0]}", title_justify="left")
    for name in ("profile", "batch", "points", "median", "p90", "max"):
        table.add_column(name, justify="left" if name == "profile" else "right", overflow="fold")
    for name, frame in zip(names[1:], frames[1:]):
        for row in agreement(frames[0], frame).iter_rows(named=True):
            table.add_row(name, str(row["batch_size"]), str(row["points"]), f"{100 * row['median']:.2f}%",
                          f"{100 * row['p90']:.2f}%", f"{100 * row['max']:.2f}%")
    console.print(table)
    steps = [find_steps(frame, top=args.steps) for frame in frames]
    batch_sizes = sorted({b for frame in frames for b in frame["batch_size"].unique().to_list()})
    console.print("Largest steps (from\u2192to tokens, drop):")
    for batch_size in batch_sizes:
        for name, found in zip(names, steps):
            listed = ", ".join(step_text(s) for s in found.filter(pl.col("batch_size") == batch_size).to_dicts())
            console.print(f"  batch {batch_size}, {name}: {listed or 'none'}", markup=False, soft_wrap=True)
    console.print("Steps found in one profile but not in another:")
    for batch_size in batch_sizes:
        unmeasured = [name for name, frame in zip(names, measured)
                      if frame.filter(pl.col("batch_size") == batch_size).is_empty()]
        console.print("  " + differences(steps, names, batch_size, unmeasured), markup=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
