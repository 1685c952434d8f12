"""The ratio of two settings timed in rounds: Student t quantiles, the paired-round interval,
and refine and bench judging with it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import load_script
from test_compute_r import write_layered
from test_refine import MEASURED_SCHEMA, measured
from pomt_cli.bench import bench_frame, slower_than_none
from pomt_cli.cli.compute_r import selection_settings
from pomt_cli.formats.bench import MethodSetting
from pomt_cli.measure.ratio import (
    incomplete_beta,
    paired_ratio,
    round_interval,
    student_t_cdf,
    student_t_quantile,
)
from pomt_cli.measure.timing import Measurement
from pomt_cli.selection import compute_r, rechoose


def test_student_t_quantiles_match_the_printed_table():
    # Two-sided 95% (the 0.975 quantile) and 99% (0.995) critical values, as tables print them.
    table = {(0.975, 1): 12.7062, (0.975, 2): 4.3027, (0.975, 5): 2.5706, (0.975, 10): 2.2281,
             (0.975, 30): 2.0423, (0.995, 2): 9.9248, (0.995, 5): 4.0321, (0.95, 4): 2.1318}
    for (p, df), value in table.items():
        assert student_t_quantile(p, df) == pytest.approx(value, abs=1e-4)
        assert student_t_quantile(1 - p, df) == pytest.approx(-value, abs=1e-4)
    assert student_t_quantile(0.975, 1e6) == pytest.approx(1.959966, abs=1e-5)  # the normal's
    assert student_t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-9)
    # With 1 degree of freedom t is Cauchy: P(T <= t) = 1/2 + atan(t) / pi.
    for t in (-3.0, -0.5, 0.0, 0.7, 10.0):
        assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    with pytest.raises(ValueError):
        student_t_quantile(1.0, 3)


def test_the_incomplete_beta_function_keeps_its_identities():
    for x in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert incomplete_beta(1.0, 1.0, x) == pytest.approx(x)  # uniform
        assert incomplete_beta(2.0, 1.0, x) == pytest.approx(x * x)
        assert incomplete_beta(1.0, 3.0, x) == pytest.approx(1 - (1 - x) ** 3)
    for a, b, x in ((0.5, 7.0, 0.2), (6.0, 0.5, 0.97), (3.0, 3.0, 0.35)):
        assert incomplete_beta(a, b, x) + incomplete_beta(b, a, 1 - x) == pytest.approx(1.0, abs=1e-12)
    assert incomplete_beta(4.5, 4.5, 0.5) == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError):
        incomplete_beta(0.0, 1.0, 0.5)


def rounds_of(levels: list[float], spread: float = 0.001, samples: int = 20) -> Measurement:
    """One measurement pooled from rounds of ``samples`` calls each, around each round's level."""
    offsets = np.linspace(-spread, spread, samples)
    return Measurement.pool([Measurement("ok", "eager", tuple(level + offsets), 0.01) for level in levels])


def test_a_pooled_measurement_keeps_each_rounds_median():
    m = rounds_of([7.0, 8.0, 9.0])
    assert m.part_medians == pytest.approx((7.0, 8.0, 9.0)) and m.samples == 60 and m.part_sizes == (20, 20, 20)
    with pytest.raises(ValueError, match="do not split"):
        Measurement("ok", "eager", (1.0, 2.0, 3.0), 0.01, part_sizes=(1, 1))
    assert Measurement.pool([m]).part_medians == pytest.approx((8.0,))
    assert Measurement("ok", "eager", (1.0, 2.0), 0.01).part_medians == ()


def test_rounds_that_disagree_widen_the_ratio_beyond_the_pooled_samples():
    none, pruned = rounds_of([10.0, 10.0, 10.0]), rounds_of([7.0, 8.0, 9.0])
    # Pooled, the 60 samples put the median at 8 ms within +-0.001 ms: the ratio reads 0.8 to 0.1%.
    assert pruned.ci_low_ms == pytest.approx(8.0, abs=2e-3) and pruned.ci_high_ms == pytest.approx(8.0, abs=2e-3)
    r = paired_ratio(pruned, none)
    logs = [math.log(0.7), math.log(0.8), math.log(0.9)]
    mean = sum(logs) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in logs) / 2)
    half = 4.302652729749752 * sd / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert r.ratio == pytest.approx(0.8, abs=1e-4) and r.rounds == 3
    assert (r.low, r.high) == pytest.approx((math.exp(mean - half), math.exp(mean + half)))
    assert r.low < 0.6 and r.high > 1.0  # no longer proven faster
    assert slower_than_none(pruned, none) is False
    # Rounds that agree leave the pooled interval, which then is the wider one.
    only = rounds_of([8.0, 8.0, 8.0], spread=0.2)
    steady = paired_ratio(only, none)
    assert steady.rounds == 3
    assert steady.low == pytest.approx(only.ci_low_ms / none.ci_high_ms)
    assert steady.high == pytest.approx(only.ci_high_ms / none.ci_low_ms)


def test_without_paired_rounds_the_interval_is_the_pooled_samples_alone():
    none = rounds_of([10.0])
    pruned = rounds_of([8.0])
    r = paired_ratio(pruned, none)
    assert r.rounds == 0 and round_interval(pruned, none, 0.95) is None
    assert (r.low, r.high) == pytest.approx((pruned.ci_low_ms / none.ci_high_ms, pruned.ci_high_ms / none.ci_low_ms))
    # Rounds that do not pair (two against three) are not paired.
    assert round_interval(rounds_of([8.0, 9.0]), rounds_of([10.0, 10.0, 10.0]), 0.95) is None
    oom = Measurement.out_of_memory("too big", mode="eager", rel_precision=0.01)
    assert paired_ratio(oom, none) is None and paired_ratio(pruned, oom) is None


def test_slower_than_none_needs_the_rounds_to_agree():
    none = rounds_of([10.0, 10.0, 10.0, 10.0])
    steady, drifting = rounds_of([11.0, 11.1, 10.9, 11.0]), rounds_of([10.6, 12.5, 10.7, 13.0])
    assert steady.ci_low_ms > none.ci_high_ms and drifting.ci_low_ms > none.ci_high_ms
    assert slower_than_none(steady, none) is True
    assert slower_than_none(drifting, none) is False  # its rounds: 6% to 30% slower


def test_bench_reports_the_interval_of_each_change():
    none = rounds_of([10.0, 10.0, 10.0])
    pomt = MethodSetting(method="pomt", r=5, layer=1)
    timed = {(32, "none"): (none, 17), (32, pomt.label): (rounds_of([7.0, 8.0, 9.0]), 12)}
    frame = bench_frame({32: [MethodSetting(method="none"), pomt]}, timed, None)
    base, row = frame.rows(named=True)
    assert base["change_low_pct"] is None and base["change_high_pct"] is None
    r = paired_ratio(timed[(32, pomt.label)][0], none)
    assert row["latency_change_pct"] == pytest.approx(-20.0, abs=0.01)
    assert (row["change_low_pct"], row["change_high_pct"]) == pytest.approx((100 * (r.low - 1), 100 * (r.high - 1)))
    assert row["slower_than_none"] is False


def test_refine_counts_a_candidate_only_when_its_rounds_agree(tmp_path):
    lat, acc = write_layered(tmp_path)
    selection = compute_r(lat, acc, selection_settings())
    rows = [(None, 17, 1.25, 1.24, 1.26), (2, 9, 1.0, 0.99, 1.01), (2, 13, 1.3, 1.2, 1.4)]
    # By the pooled samples alone layer 2 at n = 9 pays (see test_refine.py); its rounds say 0.7 to 1.1.
    frame = measured(rows).with_columns(ratio_low=np.array([np.nan, 0.7, 0.95]), ratio_high=np.array([np.nan, 1.1, 1.2]))
    frame = frame.with_columns(frame["ratio_low"].fill_nan(None), frame["ratio_high"].fill_nan(None))
    assert set(MEASURED_SCHEMA) < set(frame.columns)
    again = rechoose(selection.curves[1], selection.points[1], frame, selection_settings(), 1, 17)
    assert (again.choice.R, again.choice.pays) == (0, False)
    row = again.table.filter(again.table["R"] == 8).row(0, named=True)
    assert (row["ratio_low"], row["ratio_high"]) == (0.7, 1.1)
    # With rounds that agree the same candidate is chosen, and its interval is theirs.
    agreeing = frame.with_columns(ratio_low=frame["ratio_low"].replace(0.7, 0.78),
                                  ratio_high=frame["ratio_high"].replace(1.1, 0.83))
    again = rechoose(selection.curves[1], selection.points[1], agreeing, selection_settings(), 1, 17)
    assert (again.choice.R, again.choice.latency_ratio_low, again.choice.latency_ratio_high) == (8, 0.78, 0.83)


def test_the_simulation_shows_pooled_intervals_miss_drift_and_paired_ones_cover_it():
    stats_check = load_script("stats_check")
    rng = np.random.default_rng(3)
    calm = stats_check.ratio_coverage(300, rng, rounds=3, drift=0.0)
    drifting = stats_check.ratio_coverage(300, rng, rounds=6, drift=0.05)
    assert calm["pooled covers"] >= 0.93 and calm["paired covers"] >= 0.93
    assert drifting["pooled covers"] < 0.8 and drifting["paired covers"] >= 0.92


def test_the_coverage_script_times_side_by_side_and_prints_both_intervals(capsys):
    script = load_script("ratio_coverage")
    assert script.main(["--runs", "2", "--rounds", "2", "--budget", "0.02", "--r", "8,16"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "2 runs of 2 rounds x 0.02 s (digits-vit, batch 32, cpu)" in out
    for label in ("pomt r=8 @0", "pomt r=16 @0"):
        assert label in out
    assert out.count("pooled") == 2 and out.count("paired") == 2
    rows = [{"ratio": 0.8, "pooled": (0.79, 0.81), "paired": (0.7, 0.9)},
            {"ratio": 0.85, "pooled": (0.84, 0.86), "paired": (0.75, 0.95)},
            {"ratio": 0.9, "pooled": (None, None), "paired": (0.8, 1.0)}]
    assert script.coverage(rows, "pooled") == pytest.approx({"truth": 0.85, "covers": 1 / 3, "next": 0.0,
                                                             "width": 0.02})
    assert script.coverage(rows, "paired") == pytest.approx({"truth": 0.85, "covers": 1.0, "next": 1.0,
                                                             "width": 0.2})


@pytest.mark.parametrize(("argv", "said"), [
    (["--r", "8,x"], "--r '8,x': give whole numbers"),
    (["--r", "100"], "r=100 is too large: digits-vit has 65 tokens"),
    (["--layer", "9"], "layer=9 is out of range: digits-vit has 4 blocks"),
    (["--model", "no_such_vit"], "unknown model 'no_such_vit'"),
    (["--device", "foo"], "--device foo: torch device 'foo' is not a device name"),
])
def test_the_coverage_script_refuses_bad_input_in_one_line_before_timing(argv, said, capsys):
    from conftest import script_refusal

    line = script_refusal(load_script("ratio_coverage").main, ["--runs", "2", *argv], capsys)
    assert said in line


def test_the_interval_holds_the_ratio_of_the_pooled_medians():
    # Too few samples for pooled intervals. Both rounds read 0.8 (1.6 / 2 and 3.2 / 4), so
    # their t interval is the point 0.8; the pooled medians, over unequal rounds, read 3.2 / 3.
    none = Measurement.pool([Measurement("ok", "eager", (2.0, 2.0), 0.01), Measurement("ok", "eager", (4.0, 4.0), 0.01)])
    pruned = Measurement.pool([Measurement("ok", "eager", (1.6,), 0.01), Measurement("ok", "eager", (3.2, 3.2), 0.01)])
    assert none.ci_low_ms is None and pruned.ci_low_ms is None and pruned.part_medians == (1.6, 3.2)
    assert round_interval(pruned, none, 0.95) == pytest.approx((0.8, 0.8))
    r = paired_ratio(pruned, none)
    assert r.ratio == pytest.approx(3.2 / 3.0) and r.rounds == 2
    assert (r.low, r.high) == pytest.approx((0.8, 3.2 / 3.0))
