"""Compare two latency profiles of the same grid: how far apart are they, point by point?

The repeatability benchmark of docs/PERFORMANCE.md: run `pomt profile` twice with the
same options (into two folders) and compare. Prints, per batch size, the median and the
90th percentile over points of |L1(n) - L2(n)| / L2(n), the largest difference, and the
largest steps of each run, so that one sees whether both runs found the same steps.

    python scripts/compare_profiles.py runs/a/latency_....parquet runs/b/latency_....parquet
"""

from __future__ import annotations

import argparse

import polars as pl
from rich.console import Console
from rich.table import Table

from pomt_cli.formats.latency import read_latency as read_latency_profile
from pomt_cli.measure.steps import find_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--steps", type=int, default=4, help="steps listed per run and batch size")
    args = parser.parse_args()
    one, meta_one = read_latency_profile(args.first)
    two, meta_two = read_latency_profile(args.second)
    key = ["batch_size", "tokens"]
    both = (
        one.select(*key, pl.col("latency_ms").alias("l1"))
        .join(two.select(*key, pl.col("latency_ms").alias("l2")), on=key)
        .drop_nulls()
        .with_columns(rel=(pl.col("l1") - pl.col("l2")).abs() / pl.col("l2"))
    )
    console = Console(highlight=False)
    console.print(f"{meta_one.model}, {meta_one.device_name}, {meta_one.dtype}, {meta_one.timing_mode}; "
                  f"measuring {meta_one.elapsed_s:.1f} s and {meta_two.elapsed_s:.1f} s")
    table = Table(title="|L1(n) - L2(n)| / L2(n) over the common points", title_justify="left")
    for name in ("batch", "points", "median", "p90", "max", "steps run 1", "steps run 2"):
        table.add_column(name, justify="right" if name not in ("steps run 1", "steps run 2") else "left")
    steps = [find_steps(one, top=args.steps), find_steps(two, top=args.steps)]
    for (batch_size,), part in both.sort("batch_size").group_by(["batch_size"], maintain_order=True):
        rel = part["rel"]
        listed = [
            ", ".join(f"{r['from_tokens']}\u2192{r['to_tokens']} \u2212{r['drop_pct']:.0f}%"
                      for r in s.filter(pl.col("batch_size") == batch_size).iter_rows(named=True)) or "none"
            for s in steps
        ]
        table.add_row(str(batch_size), str(part.height), f"{100 * rel.median():.2f}%",
                      f"{100 * rel.quantile(0.9):.2f}%", f"{100 * rel.max():.2f}%", *listed)
    console.print(table)


if __name__ == "__main__":
    main()
