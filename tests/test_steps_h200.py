"""find_steps on the four profiles of the H200 run of 2026-11-28 (docs/gpu/data): two runs
of each kind, consecutive, whose points agree to 0.26% (median) must report the same steps."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pomt_cli.formats.latency import read_latency
from pomt_cli.measure.steps import find_steps

DATA = Path(__file__).resolve().parents[1] / "docs" / "gpu" / "data" / "2026-11-28-h200"


def steps_of(kind: str, run: str, batch_size: int) -> set[tuple[int, int]]:
    frame, _ = read_latency(DATA / f"profile-{kind}-{run}.parquet")
    found = find_steps(frame.filter(pl.col("batch_size") == batch_size), top=50)
    return {(r["from_tokens"], r["to_tokens"]) for r in found.iter_rows(named=True)}


@pytest.mark.parametrize("batch_size", [1, 4])
def test_both_cuda_graph_runs_report_the_same_steps(batch_size):
    # 33 -> 32 and 129 -> 128 drop 6% in both runs with tight, disjoint intervals, on a curve
    # whose neighbours alternate by 1-2%: the rule once took one in each run (the spread's
    # threshold moved by 8% between runs, and 128's neighbour 127 by 0.55%).
    a = steps_of("bs1-4_float16_cudagraphs", "a", batch_size)
    assert a == steps_of("bs1-4_float16_cudagraphs", "b", batch_size)
    if batch_size == 1:  # the intervals' gap (5%) does not clear the roughness (5.4-5.8%)
        assert not {(33, 32), (129, 128)} & a


def test_both_eager_runs_at_batch_64_report_the_same_steps():
    a, b = (steps_of("bs64_float32_eager", run, 64) for run in "ab")
    assert a == b
    # Below n = 46 eager timing is bound by the host: points that spent their budget
    # (42 in run b: 5.02 ms, [4.96, 5.08]) place no step.
    assert all(n >= 46 for n, _ in a)


@pytest.mark.parametrize("run", ["a", "b"])
def test_the_h100_like_steps_at_batch_64_are_found(run):
    frame, _ = read_latency(DATA / f"profile-bs64_float32_eager-{run}.parquet")
    top = find_steps(frame, top=2)
    assert {(r["from_tokens"], r["to_tokens"]) for r in top.iter_rows(named=True)} == {(177, 176), (89, 88)}
    assert top["drop_pct"].to_list() == pytest.approx([22.1, 19.9], abs=0.2)
