"""`pomt profile` and its library: grid logic on synthetic data, real runs on small models.

Latency values are never asserted; the tests check what was measured, in which order,
what was re-measured, what was written, and how bad input is refused.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from conftest import FakeTools, preset_file, run_in_process, sigint_default, tiny_vit

from pomt_cli.errors import PomtError
from pomt_cli.formats.latency import SCHEMA, read_latency as read_latency_profile
from pomt_cli.measure.grid import LatencySettings, find_spikes, find_unsettled, run_grid
from pomt_cli.measure.steps import find_steps
from pomt_cli.measure.workload import kept_patches, profile_latency
from pomt_cli.plots import latency_figure, plot_latency
from pomt_cli.formats.common import LATENCY_COLUMNS, write_profile
from pomt_cli.measure.timing import Measurement, Task


def curve(latency: dict[int, float | None], batch_size: int = 1, halfwidth: float = 0.002) -> pl.DataFrame:
    """A profile frame from n -> latency (ms), with a CI of +-halfwidth (relative)."""
    rows = []
    for n, ms in latency.items():
        rows.append({
            "batch_size": batch_size, "tokens": n, "latency_ms": ms,
            "p10_ms": ms, "p90_ms": ms, "samples": 0 if ms is None else 20,
            "status": "oom" if ms is None else "ok",
            "ci_low_ms": None if ms is None else ms * (1 - halfwidth),
            "ci_high_ms": None if ms is None else ms * (1 + halfwidth),
        })
    return pl.DataFrame(rows)


def linear(ns, per_token: float = 0.05, base: float = 2.0) -> dict[int, float]:
    return {n: base + per_token * n for n in ns}


def test_a_spike_is_found_and_a_step_is_not():
    lat = linear(range(200, 140, -1))
    lat[180] *= 1.10  # one slow point: a spike
    lat.update({n: v * 0.8 for n, v in lat.items() if n <= 160})  # a step between 161 and 160
    lat[150] *= 0.90  # one fast point: a spike too
    assert find_spikes(curve(lat), tol=0.02) == [(1, 180), (1, 150)]


def test_spikes_need_a_clear_difference():
    lat = linear(range(100, 80, -1))
    lat[90] *= 1.015  # within the 2% tolerance
    assert find_spikes(curve(lat), tol=0.02) == []
    lat[90] *= 1.05
    assert find_spikes(curve(lat), tol=0.02) == [(1, 90)]
    assert find_spikes(curve(lat, halfwidth=0.05), tol=0.02) == []  # intervals overlap: noise, not a spike


def test_a_coarse_monotone_grid_has_no_spikes_and_oom_points_are_skipped():
    assert find_spikes(curve(linear(range(197, 16, -20), per_token=1.0)), tol=0.02) == []
    lat = linear(range(50, 40, -1))
    lat[45] = None  # out of memory: its neighbours become neighbours
    lat[46] *= 1.2
    assert find_spikes(curve(lat), tol=0.02) == [(1, 46)]


def fake_measurement(ms: float | None) -> Measurement:
    if ms is None:
        return Measurement.out_of_memory("CUDA out of memory", mode="eager", rel_precision=0.01)
    return Measurement("ok", "eager", [ms * f for f in (0.999, 1.0, 1.0, 1.0, 1.001, 1.0, 0.9995, 1.0005, 1.0, 1.0)],
                       rel_precision=0.01)


class FakeDevice:
    """measure_point for run_grid: a linear curve, with optional transient or lasting oddities."""

    def __init__(self, transient: dict | None = None, lasting: dict | None = None, oom=()) -> None:
        self.transient = dict(transient or {})
        self.lasting = lasting or {}
        self.oom = set(oom)
        self.calls: list[tuple[int, int]] = []

    def __call__(self, batch_size: int, tokens: int, prior: list[float] = ()) -> Measurement:
        self.calls.append((batch_size, tokens))
        if (batch_size, tokens) in self.oom:
            return fake_measurement(None)
        ms = batch_size * (1.0 + 0.05 * tokens)
        ms *= self.transient.pop((batch_size, tokens), 1.0) * self.lasting.get((batch_size, tokens), 1.0)
        return fake_measurement(ms)


POINTS = [(b, n) for b in (1, 4) for n in range(60, 40, -1)]


def test_run_grid_visits_every_point_once_in_a_seeded_shuffled_order():
    device = FakeDevice()
    frame = run_grid(POINTS, device, seed=0)
    assert sorted(device.calls) == sorted(POINTS) and len(device.calls) == len(POINTS)
    assert device.calls != POINTS  # shuffled
    again = FakeDevice()
    run_grid(POINTS, again, seed=0)
    assert again.calls == device.calls
    other = FakeDevice()
    run_grid(POINTS, other, seed=1)
    assert other.calls != device.calls
    assert frame.columns == list(SCHEMA)
    assert frame["tokens"].to_list()[:3] == [60, 59, 58]  # sorted by batch size, n descending
    assert frame["visit"].sort().to_list() == list(range(len(POINTS)))


def test_run_grid_pools_the_visits_of_a_transient_spike_until_it_is_outvoted():
    device = FakeDevice(transient={(4, 50): 1.3})
    frame = run_grid(POINTS, device, seed=0, spike_tol=0.02, remeasure_rounds=2)
    # Visit 2 pools 10 slow and 10 normal samples (still a spike); visit 3 outvotes the slow ones.
    assert device.calls.count((4, 50)) == 3
    assert set(device.calls[len(POINTS):]) <= {(4, n) for n in (50, 49)}  # the spike and the drop it made
    row = frame.filter((pl.col("batch_size") == 4) & (pl.col("tokens") == 50)).row(0, named=True)
    assert row["attempts"] == 3 and row["samples"] == 30
    assert row["latency_ms"] == pytest.approx(4 * (1 + 0.05 * 50), rel=1e-3)
    assert find_spikes(frame, 0.02) == [] and find_steps(frame).is_empty()


def test_run_grid_keeps_a_lasting_feature_after_the_rounds():
    device = FakeDevice(lasting={(1, 48): 0.8})
    frame = run_grid(POINTS, device, seed=0, spike_tol=0.02, remeasure_rounds=2)
    assert device.calls.count((1, 48)) == 3  # measured, then re-measured in each of two rounds
    row = frame.filter((pl.col("batch_size") == 1) & (pl.col("tokens") == 48)).row(0, named=True)
    assert row["attempts"] == 3 and row["latency_ms"] == pytest.approx(0.8 * (1 + 0.05 * 48), rel=1e-3)
    none = FakeDevice(lasting={(1, 48): 0.8})
    run_grid(POINTS, none, seed=0, remeasure_rounds=0)
    assert none.calls.count((1, 48)) == 1


def test_run_grid_records_out_of_memory_and_goes_on():
    device = FakeDevice(oom=[(4, n) for n in range(60, 55, -1)])
    frame = run_grid(POINTS, device, seed=0)
    oom = frame.filter(pl.col("status") == "oom")
    assert sorted(oom["tokens"].to_list()) == [56, 57, 58, 59, 60]
    assert oom["latency_ms"].null_count() == 5 and oom["samples"].to_list() == [0] * 5
    assert frame.filter(pl.col("status") == "ok").height == len(POINTS) - 5


def test_run_grid_resumes_without_measuring_finished_points():
    first = run_grid(POINTS, FakeDevice(), seed=0)
    previous = first.filter(pl.col("tokens") > 50).with_columns(pl.lit(123.0).alias("latency_ms"))
    device = FakeDevice()
    events = []
    # No re-measuring rounds: the changed rows make a step whose ends would be confirmed.
    frame = run_grid(POINTS, device, seed=0, previous=previous, progress=events.append, remeasure_rounds=0)
    assert sorted(device.calls) == sorted(p for p in POINTS if p[1] <= 50)
    assert frame.filter(pl.col("tokens") > 50)["latency_ms"].to_list() == [123.0] * previous.height
    done = [e for e in events if e.frame is not None]
    assert [e.done for e in done] == list(range(1, len(device.calls) + 1))
    assert all(e.total == len(device.calls) for e in done)
    assert done[-1].frame.height == len(POINTS)


def noisy_measurement(ms: float) -> Measurement:
    """A measurement whose samples spread over +-60%: its CI of the median is wide."""
    return Measurement("budget", "eager", [ms * f for f in (0.4, 1.6, 0.5, 1.5, 1.0, 0.6, 1.4, 0.7, 1.3, 1.0)],
                       rel_precision=0.01)


def test_unsettled_neighbours_are_remeasured_although_they_agree_with_each_other():
    device = FakeDevice(transient={(1, 50): 2.5, (1, 49): 2.5})
    noisy = {(1, 50), (1, 49)}

    def measure_point(b, n, prior):
        m = device(b, n)
        if (b, n) in noisy:
            noisy.discard((b, n))
            return noisy_measurement(m.median_ms)
        return m

    frame = run_grid(POINTS, measure_point, seed=0, spike_tol=0.02, remeasure_rounds=2)
    assert device.calls.count((1, 50)) >= 2 and device.calls.count((1, 49)) >= 2
    assert find_unsettled(frame, 0.02) == []
    assert frame.filter((pl.col("batch_size") == 1) & pl.col("tokens").is_in([49, 50]))["latency_ms"].to_list() == \
        pytest.approx([1 + 0.05 * 50, 1 + 0.05 * 49], rel=1e-3)


def test_run_grid_confirms_steps_drift_made_and_keeps_real_ones():
    ns = range(120, 60, -1)
    points = [(1, n) for n in ns]
    lasting = {(1, n): 0.75 for n in ns if n <= 90}  # a real step between 91 and 90
    transient = {(1, 110): 1.2, (1, 109): 1.2}  # two neighbours slowed by the same burst
    device = FakeDevice(transient=transient, lasting=lasting)
    frame = run_grid(points, device, seed=0, spike_tol=0.02, remeasure_rounds=2)
    steps = [(r["from_tokens"], r["to_tokens"]) for r in find_steps(frame).iter_rows(named=True)]
    assert steps == [(91, 90)]
    assert device.calls.count((1, 91)) == 2 and device.calls.count((1, 90)) == 2  # confirmed once
    assert device.calls.count((1, 110)) >= 2 and device.calls.count((1, 109)) >= 2


def test_a_fast_spell_of_the_machine_leaves_no_dips_behind():
    device = FakeDevice()

    def drifting(b, n, prior):  # the machine runs 15% faster during four calls early on
        m = device(b, n)
        return fake_measurement(m.median_ms * (0.85 if 3 <= len(device.calls) <= 6 else 1.0))

    frame = run_grid(POINTS, drifting, seed=0, spike_tol=0.02, remeasure_rounds=2)
    assert find_spikes(frame, 0.02) == [] and find_steps(frame).is_empty()
    expected = [b * (1 + 0.05 * n) for b, n in frame.select("batch_size", "tokens").iter_rows()]
    assert frame["latency_ms"].to_list() == pytest.approx(expected, rel=1e-3)


def test_passes_visit_every_point_in_fresh_orders_and_pool_the_samples():
    device = FakeDevice()

    def slow_spell(b, n, prior):  # the machine runs 20% slower during the first sweep's second half
        m = device(b, n)
        return fake_measurement(m.median_ms * (1.2 if len(POINTS) // 2 < len(device.calls) <= len(POINTS) else 1.0))

    frame = run_grid(POINTS, slow_spell, seed=0, passes=3, remeasure_rounds=0)
    sweeps = [device.calls[i * len(POINTS):(i + 1) * len(POINTS)] for i in range(3)]
    assert len(device.calls) == 3 * len(POINTS) and all(sorted(s) == sorted(POINTS) for s in sweeps)
    assert sweeps[0] != sweeps[1] != sweeps[2]
    assert frame["samples"].to_list() == [30] * len(POINTS) and frame["attempts"].to_list() == [3] * len(POINTS)
    expected = [b * (1 + 0.05 * n) for b, n in frame.select("batch_size", "tokens").iter_rows()]
    assert frame["latency_ms"].to_list() == pytest.approx(expected, rel=2e-3)  # two normal visits outvote one slow


def test_find_steps_ignores_drops_within_the_noise():
    lat = linear(range(197, 1, -1))
    lat.update({n: v * 0.8 for n, v in lat.items() if n <= 120})
    assert [(r["from_tokens"], r["to_tokens"]) for r in find_steps(curve(lat)).iter_rows(named=True)] == [(121, 120)]
    assert find_steps(curve(lat, halfwidth=0.15)).is_empty()  # the intervals overlap: not significant


def test_find_steps_takes_touching_intervals_for_overlapping_ones():
    # The drop at 121 -> 120 is found while its intervals are apart; when the interval of 121
    # begins exactly where that of 120 ends, they share a value: not significant, no step.
    lat = linear(range(197, 1, -1))
    lat.update({n: v * 0.8 for n, v in lat.items() if n <= 120})
    frame = curve(lat)
    assert [(r["from_tokens"], r["to_tokens"]) for r in find_steps(frame).iter_rows(named=True)] == [(121, 120)]
    edge = 6.0  # between L(120) = 6.4 and L(121) = 8.05
    touching = frame.with_columns(
        ci_low_ms=pl.when(pl.col("tokens") == 121).then(edge).otherwise(pl.col("ci_low_ms")),
        ci_high_ms=pl.when(pl.col("tokens") == 120).then(edge).otherwise(pl.col("ci_high_ms")))
    assert find_steps(touching).is_empty()
    apart = touching.with_columns(ci_low_ms=pl.when(pl.col("tokens") == 121).then(edge + 1e-9)
                                  .otherwise(pl.col("ci_low_ms")))
    assert [(r["from_tokens"], r["to_tokens"]) for r in find_steps(apart).iter_rows(named=True)] == [(121, 120)]


def test_find_steps_finds_the_large_drops_beyond_the_trend():
    rng = torch.Generator().manual_seed(0)
    ns = list(range(197, 1, -1))
    lat = {}
    for n in ns:
        ms = 0.04 * n + 1.0
        ms *= 0.80 if n <= 176 else 1.0
        ms *= 0.78 if n <= 88 else 1.0
        lat[n] = ms * (1 + 0.003 * float(torch.randn(1, generator=rng)))
    steps = find_steps(curve(lat, batch_size=64), top=5)
    first = steps.row(0, named=True)
    second = steps.row(1, named=True)
    assert {(first["from_tokens"], first["to_tokens"]), (second["from_tokens"], second["to_tokens"])} == {
        (177, 176), (89, 88)}
    assert steps.filter(pl.col("from_tokens") == 177)["drop_pct"].item() == pytest.approx(20.5, abs=1.5)
    assert steps.filter(pl.col("from_tokens") == 89)["drop_pct"].item() == pytest.approx(23, abs=1.5)
    assert steps.height == 2  # noise alone makes no steps


def test_find_steps_takes_excursions_of_a_host_bound_region_for_noise_not_steps():
    # The H200's batch-64 float32 profile: eager timing at small n is bound by the host, so
    # the curve flattens near 2.9 ms and single points or pairs sit about 50% higher,
    # elsewhere in each run. Each such point drops to its neighbour with intervals apart,
    # but the curve rises back to it on the other side: an excursion, not a step.
    lat = {}
    for n in range(197, 1, -1):
        ms = 0.085 * n
        ms *= 0.80 if n <= 176 else 1.0
        ms *= 0.78 if n <= 88 else 1.0
        lat[n] = max(ms, 2.9)
    for n in (6, 8, 10, 11, 20, 23, 27, 34):
        lat[n] = 4.4  # one slow point (6, 8, ...) or two (11 and 10)
    lat[15] = 2.2  # one fast point
    steps = find_steps(curve(lat, batch_size=64), top=8)
    assert [(r["from_tokens"], r["to_tokens"]) for r in steps.iter_rows(named=True)] == [(89, 88), (177, 176)]
    # A real step next to a noisy neighbour is still a step.
    lat = {n: 0.085 * n * (0.8 if n <= 120 else 1.0) + 1.0 for n in range(197, 1, -1)}
    lat[122] *= 1.04  # a slow point just above the step
    lat[118] *= 0.96  # a fast one just below it
    steps = find_steps(curve(lat, batch_size=64), top=8)
    assert [(r["from_tokens"], r["to_tokens"]) for r in steps.iter_rows(named=True)] == [(121, 120)]


def test_find_steps_on_smooth_and_coarse_curves_finds_nothing():
    assert find_steps(curve(linear(range(197, 1, -1)))).is_empty()
    assert find_steps(curve(linear(range(197, 16, -20), per_token=1.0))).is_empty()
    coarse = linear(range(197, 16, -20), per_token=1.0)
    coarse.update({n: v * 0.7 for n, v in coarse.items() if n < 100})  # a drop somewhere in 97..117
    assert find_steps(curve(coarse)).is_empty()  # 20 tokens apart: a step cannot be placed
    fine = linear(range(120, 90, -4), per_token=1.0)
    fine.update({n: v * 0.7 for n, v in fine.items() if n < 100})
    assert [(r["from_tokens"], r["to_tokens"]) for r in find_steps(curve(fine)).iter_rows(named=True)] == [(100, 96)]


def test_kept_patches_are_sorted_unique_and_seeded():
    keep = kept_patches(196, 100, seed=7)
    assert keep.shape == (100,) and keep.dtype == torch.int64
    assert torch.equal(keep, keep.sort().values) and keep.unique().numel() == 100
    assert torch.equal(keep, kept_patches(196, 100, seed=7))
    assert not torch.equal(keep, kept_patches(196, 100, seed=8))
    assert torch.equal(kept_patches(196, 196, seed=1), torch.arange(196))


def test_profile_latency_on_a_tiny_vit():
    model = tiny_vit()  # 16 patches + 1 class token
    settings = LatencySettings(batch_sizes=[1, 2], grid=[17, 9, 2], budget_s=0.05, min_samples=3, warmup=1)
    events = []
    frame = profile_latency(model, settings, device=torch.device("cpu"), progress=events.append)
    assert frame.height == 6
    assert frame.select("batch_size", "tokens").rows() == [(1, 17), (1, 9), (1, 2), (2, 17), (2, 9), (2, 2)]
    assert set(frame["status"]) <= {"ok", "budget"}
    assert (frame["latency_ms"] > 0).all() and (frame["samples"] >= 1).all()
    assert (frame["p10_ms"] <= frame["latency_ms"]).all() and (frame["latency_ms"] <= frame["p90_ms"]).all()
    assert len([e for e in events if e.frame is None]) >= 6
    with pytest.raises(PomtError, match="CUDA graphs need a CUDA device"):
        profile_latency(model, settings.model_copy(update={"cuda_graphs": True}), device=torch.device("cpu"))
    with pytest.raises(PomtError, match="do not fit"):
        profile_latency(model, settings.model_copy(update={"grid": [18]}), device=torch.device("cpu"))


def test_the_pomt_workload_times_the_patched_model_at_each_layer(monkeypatch):
    import pomt_cli.measure.workload as latency
    from pomt_cli.pruning import geometry, token_counts

    model = tiny_vit()  # 16 patches + 1 class token, 3 blocks
    seen: list[tuple[int, list[int]]] = []
    tasks = []

    def fake_measure(fn, **kwargs):
        out = fn()
        seen.append((out.shape[0], token_counts(model)))
        tasks.append(kwargs["task"])
        return Measurement("ok", "eager", [1.0] * 3, rel_precision=kwargs["rel_precision"], task=kwargs["task"])

    monkeypatch.setattr(latency, "measure", fake_measure)
    settings = LatencySettings(batch_sizes=[1, 2], grid=[17, 9, 2], budget_s=0.05, min_samples=3, warmup=1,
                               passes=1, remeasure_rounds=0, workload="pomt", layers=[0, 2])
    events = []
    frame = profile_latency(model, settings, device=torch.device("cpu"), progress=events.append)
    assert frame.select("layer", "batch_size", "tokens").rows() == [
        (layer, b, n) for layer in (0, 2) for b in (1, 2) for n in (17, 9, 2)]
    # The real POMT model ran: all N tokens up to the pruning block, n after it.
    assert (2, [17, 9, 9, 9]) in seen and (1, [17, 17, 17, 2]) in seen and (2, [17, 17, 17, 17]) in seen
    # Each measurement says what it measured.
    assert Task("pomt @2", geometry(model).name, 2, 9, "float32") in tasks
    assert {(t.label, t.batch_size, t.tokens) for t in tasks} >= {
        (f"pomt @{layer}", b, n) for layer in (0, 2) for b in (1, 2) for n in (17, 9, 2)}
    assert not hasattr(model, "pomt_config")  # left unpatched
    done = [e for e in events if e.frame is not None]
    assert [e.done for e in done] == list(range(1, 13)) and done[-1].total == 12
    assert done[-1].frame.height == 12 and {e.layer for e in done} == {0, 2}
    # Resuming keeps the finished rows of each layer.
    partial = frame.filter(~((pl.col("layer") == 2) & (pl.col("tokens") == 9)))
    seen.clear()
    again = profile_latency(model, settings, device=torch.device("cpu"), previous=partial)
    assert again.height == 12
    measured = [c for _, c in seen]
    assert [17, 17, 17, 9] in measured and [17, 9, 9, 9] not in measured
    proxy = profile_latency(model, settings.model_copy(update={"workload": "proxy", "layers": None}),
                            device=torch.device("cpu"))
    assert proxy["layer"].is_null().all() and proxy.height == 6
    with pytest.raises(PomtError, match=r"--layer 3 is out of range: .* has 3 blocks \(layer 0..2\)"):
        profile_latency(model, settings.model_copy(update={"layers": [3]}), device=torch.device("cpu"))


def test_plot_latency_writes_a_png(tmp_path):
    lat = linear(range(60, 40, -1))
    frame = pl.concat([curve(lat, 1), curve({**{n: 10 * v for n, v in lat.items()}, 41: None}, 8)], how="vertical")
    steps = pl.DataFrame({"batch_size": [8], "from_tokens": [50], "to_tokens": [49], "k": [1], "from_ms": [45.0],
                          "to_ms": [36.0], "drop_pct": [20.0], "excess_pct": [19.9]})
    path = plot_latency(frame, tmp_path / "latency.png", title="test", steps=steps)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["latency.png"]


def test_each_batch_size_has_its_own_panel_so_the_fast_curve_shows_its_steps():
    lat = linear(range(60, 40, -1))
    frame = pl.concat([curve(lat, 1), curve({n: 30 * v for n, v in lat.items()}, 32)], how="vertical")
    steps = pl.DataFrame({"batch_size": [1], "from_tokens": [50], "to_tokens": [49], "k": [1], "from_ms": [1.5],
                          "to_ms": [1.2], "drop_pct": [20.0], "excess_pct": [19.9]})
    fig = latency_figure(frame, title="two batches", steps=steps)
    assert len(fig.axes) == 2
    batch1, batch32 = fig.axes
    assert [line.get_label() for line in batch1.lines] == ["batch 1"]
    assert [line.get_label() for line in batch32.lines] == ["batch 32"]
    # Each panel's y axis spans its own curve: batch 1's is not squashed under batch 32's.
    low, high = batch1.get_ylim()
    assert high < min(batch32.lines[0].get_ydata())
    assert high - low < 2 * (max(batch1.lines[0].get_ydata()) - min(batch1.lines[0].get_ydata()))
    # The step is marked in batch 1's panel only.
    assert [t.get_text() for t in batch1.texts if t.get_text()] == ["50\u219249: \u221220%"]
    assert not batch32.texts




FAST = ["--budget", "0.1", "--min-samples", "3", "--warmup", "1"]
TINY = ["--device", "cpu", "--model", "deit_tiny_patch16_224", "--batch-size", "1"]
STEM = "latency_deit-tiny-patch16-224_cpu_bs1_float32"


def test_profile_command_writes_the_profile_and_the_plot(tmp_path, capsys):
    code, out, err = run_in_process(["profile", *TINY, "--tokens", "197:97:50", "--no-lock-clocks",
                              "--output-dir", str(tmp_path), *FAST], capsys)
    assert code == 0, err
    parquet, png = tmp_path / f"{STEM}.parquet", tmp_path / f"{STEM}.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([parquet.name, png.name])
    frame, meta = read_latency_profile(parquet)
    assert frame.columns[: len(LATENCY_COLUMNS)] == list(LATENCY_COLUMNS)
    assert frame["tokens"].to_list() == [197, 147, 97] and frame["batch_size"].to_list() == [1, 1, 1]
    assert meta.model == "deit_tiny_patch16_224" and (meta.num_tokens, meta.num_prefix) == (197, 1)
    assert meta.grid == [197, 147, 97] and meta.batch_sizes == [1]
    assert meta.timing_mode == "eager" and meta.device_preset == "cpu" and meta.complete
    assert meta.clocks.mode == "unlocked" and meta.clocks_locked is False
    assert "--no-lock-clocks" in meta.command and meta.torch_version == torch.__version__
    assert "profile:" in out and "grid's stride is 50" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_profile_of_the_pomt_model_writes_one_curve_per_layer(tmp_path, capsys):
    args = ["profile", "--device", "cpu", "--model", "digits-vit", "--batch-size", "2", "--tokens", "65:25:20",
            "--method", "pomt", "--layer", "0,3", "--no-lock-clocks", "--output-dir", str(tmp_path), *FAST]
    code, out, err = run_in_process(args, capsys)
    assert code == 0, err
    parquet = tmp_path / "latency_digits-vit_cpu_bs2_float32_pomt-layers0-3.parquet"
    frame, meta = read_latency_profile(parquet)
    assert frame.select("layer", "tokens").rows() == [(0, 65), (0, 45), (0, 25), (3, 65), (3, 45), (3, 25)]
    assert meta.workload == "pomt" and meta.layers == [0, 3] and meta.complete
    assert "POMT at layer 3, batch 2:" in out and "R = 65 - n pruned in blocks 0, 3 (one curve per layer)" in " ".join(
        out.split())
    code, _, err = run_in_process([*args[:-8], "--layer", "1", "--output-dir", str(tmp_path / "o"), *FAST,
                                   "--resume", str(parquet)], capsys)
    assert code == 2 and "measured with layers [0, 3], but this run has [1]" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("given, expected", [
    ([], (0.1, 1, 2)),  # --budget 0.1 --warmup 1 --passes 2
    (["--budget", "0.05", "--passes", "1"], (0.05, 1, 1)),  # what is given wins
])
def test_quick_sets_the_short_settings_and_given_options_win(tmp_path, capsys, given, expected):
    code, _, err = run_in_process(["profile", "--device", "cpu", "--model", "digits-vit", "--tokens", "65:45:20",
                                   "--no-lock-clocks", "--min-samples", "3", "--quick", *given,
                                   "--output-dir", str(tmp_path)], capsys)
    assert code == 0, err
    _, meta = read_latency_profile(next(tmp_path.glob("*.parquet")))
    assert (meta.budget_s, meta.warmup, meta.passes) == expected and "--quick" in meta.command


def test_profile_resumes_an_interrupted_run(tmp_path, capsys):
    args = ["profile", *TINY, "--tokens", "197:97:50", "--output-dir", str(tmp_path), *FAST]
    assert run_in_process(args, capsys)[0] == 0
    parquet = tmp_path / f"{STEM}.parquet"
    frame, meta = read_latency_profile(parquet)
    # Every statistic 99 ms (a file whose median lay outside its own percentiles would be refused as damaged).
    partial = frame.filter(pl.col("tokens") != 147).with_columns(pl.col("^.*_ms$") * 0 + 99.0)
    write_profile(parquet, partial, meta.model_copy(update={"complete": False}))
    code, out, err = run_in_process([*args, "--resume", str(parquet)], capsys)
    assert code == 0, err
    resumed, meta2 = read_latency_profile(parquet)
    assert resumed["tokens"].to_list() == [197, 147, 97]
    assert resumed.filter(pl.col("tokens") != 147)["latency_ms"].to_list() == [99.0, 99.0]  # not measured again
    assert resumed.filter(pl.col("tokens") == 147)["latency_ms"].item() != 99.0
    assert meta2.complete and meta2.resumed_rows == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no_such_vit"], "unknown model 'no_such_vit'"),
        (["--model", "resnet18"], "not supported"),
        (["--tokens", "197:1:1"], "STOP 1 must exceed"),
        (["--tokens", "197:17:0"], "STRIDE must be positive"),
        (["--tokens", "300:17:1"], "exceeds the model's 197 tokens"),
        (["--batch-size", "0"], "is below 1"),
        (["--dtype", "float8"], "Invalid value for '--dtype'"),
        (["--device", "jetson-nano"], "unknown device 'jetson-nano'"),
        (["--cuda-graphs"], "--cuda-graphs needs a CUDA device"),
        (["--rel-precision", "0"], "--rel-precision"),
        (["--budget", "-1"], "--budget"),
        (["--img-size", "0"], "--img-size 0 must be positive"),
        (["--img-size", "100"], "--img-size 100 is not a multiple of the model's patch size 16: give e.g. 96 or 112"),
        (["--method", "pomt", "--layer", "2,12"],
         "--layer 12 is out of range: deit_tiny_patch16_224 has 12 blocks (layer 0..11)"),
        (["--method", "pomt", "--layer", "-1"], "(layer 0..11)"),
        (["--layer", "3"], "--layer applies to --method pomt only"),
        (["--method", "best"], "Invalid value for '--method'"),
        (["--min-samples", "10001"], "--min-samples"),
    ],
)
def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, capsys, args, message):
    out_dir = tmp_path / "runs"
    # Click keeps the last value of a repeated option, so the bad one comes last.
    code, _, err = run_in_process(["profile", *TINY, "--output-dir", str(out_dir), *FAST, *args], capsys)
    assert code == 2
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_but_absent(tmp_path, capsys):
    code, _, err = run_in_process(["profile", *TINY, "--torch-device", "cuda", "--output-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "CUDA is not available" in err
    code, _, err = run_in_process(["profile", *TINY[2:], "--device", "h100", "--output-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "CUDA is not available" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(Path("/etc/nv_tegra_release").exists(), reason="this machine is a Jetson")
def test_the_orin_preset_profiles_on_the_cpu_of_a_machine_that_is_not_a_jetson(tmp_path, capsys):
    code, out, err = run_in_process(["profile", "--device", "orin", "--torch-device", "cpu", "--model", "digits-vit",
                                     "--tokens", "65:45:20", "--passes", "1", "--remeasure", "0",
                                     "--output-dir", str(tmp_path), *FAST], capsys)
    assert code == 0, err
    frame, meta = read_latency_profile(tmp_path / "latency_digits-vit_orin_bs1_float32.parquet")
    assert frame["tokens"].to_list() == [65, 45] and meta.device_preset == "orin" and meta.torch_device == "cpu"
    assert meta.clocks.mode == "unavailable" and "not a Jetson" in meta.clocks.detail
    assert "clocks: not locked: /etc/nv_tegra_release does not exist" in " ".join(out.split())


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run_in_process(["profile", *TINY, "--tokens", "197:97:50", "--output-dir", str(blocker / "runs"), *FAST],
                           capsys)
    assert code == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1


def test_resume_from_another_model_or_grid_is_refused(tmp_path, capsys):
    args = ["profile", *TINY, "--tokens", "197:97:50", "--output-dir", str(tmp_path), *FAST]
    assert run_in_process(args, capsys)[0] == 0
    parquet = tmp_path / f"{STEM}.parquet"
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    other = tmp_path / "other"
    for changed, message in (
        (["--tokens", "197:17:20"], "measured with grid [197, 147, 97]"),
        (["--model", "vit_tiny_patch16_224"], "measured with model deit_tiny_patch16_224"),
        (["--dtype", "bfloat16"], "measured with dtype float32"),
    ):
        run = [*args[:1], *TINY, *changed, "--output-dir", str(other), *FAST, "--resume", str(parquet)]
        if "--tokens" not in changed:
            run += ["--tokens", "197:97:50"]
        code, _, err = run_in_process(run, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    not_a_profile = tmp_path / "x.parquet"
    not_a_profile.write_bytes(b"nonsense")
    code, _, err = run_in_process([*args, "--resume", str(not_a_profile)], capsys)
    assert code == 2 and "not a readable Parquet file" in err
    assert not other.exists()
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != "x.parquet"} == before


def test_resume_with_other_threads_timing_or_versions_is_refused(tmp_path, capsys):
    threads = torch.get_num_threads()
    args = ["profile", *TINY, "--tokens", "197:97:50", "--threads", "1", "--output-dir", str(tmp_path), *FAST]
    try:
        assert run_in_process(args, capsys)[0] == 0
        parquet = tmp_path / f"{STEM}.parquet"
        frame, meta = read_latency_profile(parquet)
        info = {**meta.runtime_info, "torch_version": "2.0.0"}
        upgraded = tmp_path / "upgraded.parquet"
        write_profile(upgraded, frame.head(1), meta.model_copy(update={"complete": False, "runtime_info": info}))
        write_profile(parquet, frame.head(1), meta.model_copy(update={"complete": False}))
        other = tmp_path / "other"
        for resume, changed, message in (
            (parquet, ["--threads", "2"], "measured with num_threads 1, but this run has 2: resume with the same "
                                          "options (--threads; without it, OMP_NUM_THREADS or the cores)"),
            (parquet, ["--budget", "0.2"], "measured with budget_s 0.1, but this run has 0.2"),
            (parquet, ["--seed", "1"], "measured with seed 0"),
            (upgraded, [], "measured with runtime_info.torch_version 2.0.0, but this run has"),
        ):
            run = [*args[:-6], "--output-dir", str(other), *FAST, *changed, "--resume", str(resume)]
            code, _, err = run_in_process(run, capsys)
            assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not other.exists()
        code, _, err = run_in_process([*args, "--resume", str(parquet)], capsys)
        assert code == 0, err
        assert read_latency_profile(parquet)[1].complete
    finally:
        torch.set_num_threads(threads)


def test_ctrl_c_restores_the_clocks_and_keeps_progress_for_resume(tmp_path):
    tools = FakeTools(tmp_path)
    preset = preset_file(tmp_path, "nvidia")
    out_dir = tmp_path / "runs"
    cmd = [sys.executable, "-m", "pomt_cli", "profile", "--device", str(preset), "--torch-device", "cpu",
           "--model", "deit_tiny_patch16_224", "--tokens", "197:2:1", "--threads", "1", "--output-dir", str(out_dir),
           *FAST]
    proc = subprocess.Popen(cmd, env=tools.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)
    parquet = out_dir / "latency_deit-tiny-patch16-224_fake-nvidia_bs1_float32.parquet"
    deadline = time.monotonic() + 120
    while not parquet.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    calls = tools.calls()
    assert calls[1:3] == ["nvidia-smi -i 0 --lock-gpu-clocks=1980,1980", "nvidia-smi -i 0 --lock-memory-clocks=2619,2619"]
    assert calls[-2:] == ["nvidia-smi -i 0 --reset-gpu-clocks", "nvidia-smi -i 0 --reset-memory-clocks"]
    frame, meta = read_latency_profile(parquet)
    assert not meta.complete and 0 < frame.height < 196
    assert meta.clocks.mode == "locked" and meta.clocks.values["max_graphics"] == "1980"
    assert not list(out_dir.glob(".*.tmp"))
    assert json.loads(pl.read_parquet_metadata(parquet)["pomt"])["complete"] is False
    assert not any((tools.state / "clocks").glob("*/state.json"))
    # The one interrupt line names what was saved and how to go on; the clocks were reset once.
    assert f"interrupted: {frame.height} points saved in {parquet}; continue with: pomt profile" in err
    assert f" --resume {parquet}" in err
    assert calls.count("nvidia-smi -i 0 --reset-gpu-clocks") == 1


def test_the_interrupted_hint_is_a_command_that_finishes_the_profile(tmp_path):
    # --resume alone would take the default model and grid and be refused: the hint repeats the options.
    out_dir = tmp_path / "runs"
    cmd = ["profile", "--model", "digits-vit", "--device", "cpu", "--no-lock-clocks", "--tokens", "65:5:2",
           "--threads", "1", "--passes", "1", "--remeasure", "0", "--budget", "0.2", "--min-samples", "3",
           "--warmup", "1", "--output-dir", str(out_dir)]
    proc = subprocess.Popen([sys.executable, "-m", "pomt_cli", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    parquet = out_dir / "latency_digits-vit_cpu_bs1_float32.parquet"
    deadline = time.monotonic() + 120
    while not parquet.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    hint = next(line for line in err.splitlines() if line.startswith("interrupted:"))
    command = hint.split("; continue with: ", 1)[1]
    assert command.startswith("pomt profile --model digits-vit") and command.endswith(f"--resume {parquet}")
    resumed = subprocess.run([sys.executable, "-m", "pomt_cli", *shlex.split(command)[1:]], capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    frame, meta = read_latency_profile(parquet)
    assert meta.complete and meta.resumed_rows > 0 and frame["tokens"].to_list() == list(range(65, 4, -2))


def test_a_point_that_spent_its_budget_is_not_visited_again_for_its_noise():
    device = FakeDevice()

    def measure_point(b, n, prior):
        m = device(b, n)
        return noisy_measurement(m.median_ms) if (b, n) == (1, 50) else m

    run_grid(POINTS, measure_point, seed=0, spike_tol=0.02, remeasure_rounds=2, point_budget_s=None)
    assert device.calls.count((1, 50)) == 3  # noisy: visited again in both rounds
    device.calls.clear()
    run_grid(POINTS, measure_point, seed=0, spike_tol=0.02, remeasure_rounds=2, point_budget_s=0.0)
    assert device.calls.count((1, 50)) == 1


def test_later_visits_receive_the_samples_of_earlier_ones():
    seen: dict[tuple[int, int], list[int]] = {}

    def measure_point(b, n, prior):
        seen.setdefault((b, n), []).append(len(prior))
        return fake_measurement(1.0 + n)

    run_grid(POINTS[:3], measure_point, seed=0, passes=3, remeasure_rounds=0)
    assert seen == {point: [0, 10, 20] for point in POINTS[:3]}


def test_dinov2_at_the_papers_224_px_has_257_tokens(tmp_path, capsys):
    args = ["profile", "--device", "cpu", "--model", "vit_small_patch14_dinov2", "--img-size", "224",
            "--tokens", "257:141:116", "--no-lock-clocks", "--passes", "1", "--remeasure", "0",
            "--output-dir", str(tmp_path), *FAST]
    code, _, err = run_in_process(args, capsys)
    assert code == 0, err
    stem = "latency_vit-small-patch14-dinov2_cpu_bs1_float32_img224"
    frame, meta = read_latency_profile(tmp_path / f"{stem}.parquet")
    assert (meta.num_tokens, meta.num_prefix) == (257, 1) and meta.grid == [257, 141]
    assert meta.img_size == [224, 224] and meta.img_size_option == 224
    assert frame["tokens"].to_list() == [257, 141] and (tmp_path / f"{stem}.png").exists()
