"""The visits' own medians: recorded by the grid, and what they let a point say about a step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import load_script

from pomt_cli.cli.compute_r import selection_settings
from pomt_cli.cli.profile import budget_note, steps_tables
from pomt_cli.formats.common import write_profile
from pomt_cli.formats.latency import read_latency
from pomt_cli.measure.grid import run_grid
from pomt_cli.measure.steps import VISITS_AGREE, cut_steps, find_curve_steps, find_steps, visits_agree
from pomt_cli.measure.timing import Measurement
from pomt_cli.selection import compute_r

ROOT = Path(__file__).resolve().parents[1]
H200 = ROOT / "docs" / "gpu" / "data" / "2026-11-28-h200"

simulate_profile = load_script("simulate_profile")


def _visit(ms: float, status: str = "ok") -> Measurement:
    """Ten samples around ``ms`` (their median is ``ms``)."""
    return Measurement(status, "eager", [ms * f for f in (0.999, 1.0, 1.0, 1.0, 1.001, 1.0, 0.9995, 1.0005, 1.0, 1.0)],
                       rel_precision=0.01)


class DriftingDevice:
    """A linear curve; ``levels`` sets a point's level visit by visit (relative), e.g. {(1, 50): [1.0, 1.1]}."""

    def __init__(self, levels: dict | None = None) -> None:
        self.levels = {p: list(v) for p, v in (levels or {}).items()}
        self.calls: list[tuple[int, int]] = []

    def __call__(self, batch_size: int, tokens: int, prior: list[float]) -> Measurement:
        self.calls.append((batch_size, tokens))
        factors = self.levels.get((batch_size, tokens))
        factor = factors.pop(0) if factors else 1.0
        return _visit((1.0 + 0.05 * tokens) * factor)


POINTS = [(1, n) for n in range(60, 40, -1)]


def test_the_grid_records_the_lowest_and_highest_median_of_the_visits():
    device = DriftingDevice({(1, 50): [1.0, 1.004], (1, 45): [1.003, 1.0]})
    frame = run_grid(POINTS, device, seed=0, passes=2, remeasure_rounds=0)
    rows = {r["tokens"]: r for r in frame.iter_rows(named=True)}
    level = {n: 1.0 + 0.05 * n for n in (50, 45, 44)}
    assert rows[50]["visit_low_ms"] == pytest.approx(level[50]) and rows[50]["visit_high_ms"] == pytest.approx(
        1.004 * level[50])
    assert rows[45]["visit_low_ms"] == pytest.approx(level[45]) and rows[45]["visit_high_ms"] == pytest.approx(
        1.003 * level[45])
    assert rows[44]["visit_low_ms"] == pytest.approx(level[44]) == rows[44]["visit_high_ms"]
    once = run_grid(POINTS, DriftingDevice(), seed=0, passes=1, remeasure_rounds=0)
    assert once["visit_low_ms"].null_count() == once["visit_high_ms"].null_count() == once.height


def test_a_revisited_resumed_point_compares_its_new_visit_with_the_file():
    first = run_grid(POINTS, DriftingDevice(), seed=0, passes=1, remeasure_rounds=0)
    # A resumed file whose point n = 50 lies 30% above its neighbours: a spike, visited again
    # (with n = 49, the lower end of the drop it makes).
    previous = first.with_columns(
        pl.when(pl.col("tokens") == 50).then(pl.col("latency_ms") * 1.3).otherwise(pl.col("latency_ms"))
        .alias("latency_ms"))
    device = DriftingDevice()
    frame = run_grid(POINTS, device, seed=0, passes=1, previous=previous, remeasure_rounds=1)
    assert (1, 50) in device.calls and set(device.calls) <= {(1, 50), (1, 49)}
    row = frame.filter(pl.col("tokens") == 50).row(0, named=True)
    assert row["visit_low_ms"] == pytest.approx(3.5) and row["visit_high_ms"] == pytest.approx(1.3 * 3.5)


def _budget_curve(visits: dict[int, tuple[float, float] | None], status: str = "budget") -> pl.DataFrame:
    """A curve of n = 60..41 with a 20% step from 50 to 49; wide intervals (+-3%); each point's
    visits' medians (relative to its own) from ``visits`` (None: visited once)."""
    rows = []
    for n in range(60, 40, -1):
        ms = (1.0 + 0.05 * n) * (0.8 if n < 50 else 1.0)
        spread = visits.get(n, (1.0, 1.0))
        rows.append({"batch_size": 1, "tokens": n, "latency_ms": ms, "status": status,
                     "ci_low_ms": 0.97 * ms, "ci_high_ms": 1.03 * ms,
                     "visit_low_ms": None if spread is None else spread[0] * ms,
                     "visit_high_ms": None if spread is None else spread[1] * ms})
    return pl.DataFrame(rows)


def _steps(frame: pl.DataFrame) -> list[tuple[int, int]]:
    found = find_steps(frame)
    return list(zip(found["from_tokens"].to_list(), found["to_tokens"].to_list()))


def test_points_short_of_the_precision_place_a_step_when_their_visits_agree():
    agreeing = _budget_curve({})
    assert visits_agree(agreeing).all()
    assert _steps(agreeing) == [(50, 49)]
    # The same curve without the visits' medians (a profile from before they were recorded):
    # points that spent their budget place no step.
    assert _steps(agreeing.drop("visit_low_ms", "visit_high_ms")) == []
    # Visited once, or visits apart by more than VISITS_AGREE: drift, no step.
    assert _steps(_budget_curve({50: None})) == []
    apart = 1.0 + 2 * VISITS_AGREE
    assert _steps(_budget_curve({49: (1.0, apart)})) == []
    assert _steps(_budget_curve({49: (1.0, 1.0 + 0.9 * VISITS_AGREE)})) == [(50, 49)]


def test_visits_that_disagree_widen_a_precise_points_level():
    # Both ends reached the precision, but n = 49's visits ranged up to n = 50's level: the
    # drop lies within the drift, so it is no step. Narrower visits leave it one.
    precise = _budget_curve({49: (0.95, 1.3)}, status="ok")
    assert _steps(precise) == []
    assert _steps(_budget_curve({49: (0.99, 1.01)}, status="ok")) == [(50, 49)]


def test_the_note_leaves_out_the_points_whose_visits_agree():
    frame = _budget_curve({n: (1.0, 1.05) for n in (44, 43, 42)})
    note = budget_note(frame, 0.01, 0.1)
    assert note.startswith("3 point(s) did not reach \u00b11.0% within 0.1 s and their visits did not agree "
                           "within 2% (batch 1: n = 42-44); they place no step")
    assert budget_note(_budget_curve({}), 0.01, 0.1) is None


@pytest.fixture(scope="module")
def h200_model():
    report = json.loads((H200 / "third-run-report.json").read_text())
    a = pl.read_parquet(H200 / "profile-bs64_float32_eager-a.parquet")
    b = pl.read_parquet(H200 / "profile-bs64_float32_eager-b.parquet")
    return simulate_profile.device_model(report, "bs64_float32_eager", a, b), simulate_profile.true_steps(a, b, 64)


def test_the_h200_model_is_drawn_from_its_recordings(h200_model):
    model, truth = h200_model
    # The 15 steps that both full H200 profiles list, the two ~20% drops among them.
    assert len(truth) == 15 and {(89, 88), (177, 176)} <= truth
    assert len(model.levels) == 196 and sorted(model.residuals)[:2] == [5, 13]
    # Host-bound points drift between visits, points bound by the GPU hardly.
    assert model.drift[13] > 0.1 and model.drift[149] < 0.01
    assert model.nearest(48) == 45 and model.nearest(49) == 45 and model.nearest(50) == 53


def test_a_short_budget_profile_of_the_h200_model_lists_true_steps_and_no_false_one(h200_model):
    model, truth = h200_model
    setting = simulate_profile.Setting("0.2s 2 pass", 0.2, 2, 1)
    outcome = simulate_profile.simulate(model, truth, setting, draws=2, seed=0)
    # With the visits' medians the short profile lists true steps that the rule before could not.
    assert outcome.true[0] > outcome.true[1]
    assert outcome.listed[0] == outcome.true[0] and outcome.true[0] >= 4
    assert outcome.seconds < 60 and outcome.agreement < 0.01


def test_simulate_profile_refuses_bad_input_in_one_line(tmp_path, capsys):
    code = simulate_profile.main([str(tmp_path / "missing.json"), str(tmp_path / "a.parquet"),
                                  str(tmp_path / "b.parquet")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot model the device" in err
    code = simulate_profile.main([str(H200 / "third-run-report.json")] * 3 + ["--setting", "fast=0,1,1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "BUDGET > 0" in err
    code = simulate_profile.main([str(H200 / "third-run-report.json")] * 3 + ["--setting", "fast"])
    assert code == 2 and "--setting fast=0.1,1,1" in capsys.readouterr().err


def test_a_cut_step_list_says_how_many_steps_it_leaves_out():
    frame = pl.read_parquet(H200 / "profile-bs64_float32_eager-a.parquet")
    every = find_curve_steps(frame, top=frame.height)
    kept, unlisted = cut_steps(every, 8)
    assert every.height == 15 and kept.height == 8 and unlisted == {(None, 64): 7}
    assert kept.columns == every.columns and kept.equals(every.head(8))
    assert cut_steps(every, 15)[1] == {}
    lines = [item for item in steps_tables(kept, [64], list(range(197, 1, -1)), None, unlisted)
             if isinstance(item, str)]
    assert lines == ["batch 64: 7 more step(s) stand out, smaller than these; --top-steps 15 lists them all"]


def test_drifting_points_do_not_raise_the_roughness_a_step_must_clear():
    # n = 197..2: a smooth curve whose points reached the precision, with a 6% step at
    # 150 -> 149, and a host-bound stretch (n <= 110, more than half the pairs) that drifts
    # by +-10% from point to point and ended on its budget, visited once. The drifting stretch places no step;
    # were the roughness taken over it too, the 6% step would not clear it.
    rng = np.random.default_rng(0)
    rows = []
    for n in range(197, 1, -1):
        ms = (5.0 + 0.05 * n) * (0.94 if n < 150 else 1.0)
        drifting = n <= 110
        if drifting:
            ms *= 1.0 + 0.1 * rng.standard_normal()
        rows.append({"batch_size": 1, "tokens": n, "latency_ms": ms, "status": "budget" if drifting else "ok",
                     "ci_low_ms": ms * 0.998, "ci_high_ms": ms * 1.002})
    frame = pl.DataFrame(rows)
    assert _steps(frame) == [(150, 149)]
    # The same curve with every point at status ok: the drifting stretch sets the roughness.
    assert (150, 149) not in _steps(frame.with_columns(status=pl.lit("ok")))


def _with_visits(path: Path, spread: dict[tuple[int, int], float]) -> Path:
    """The latency profile at ``path`` with its visits' medians: ``spread`` (relative) at (batch, n), 0.5% elsewhere."""
    frame, meta = read_latency(path)
    rel = pl.Series([spread.get((b, n), 0.005) for b, n in frame.select("batch_size", "tokens").iter_rows()])
    frame = frame.with_columns(visit_low_ms=pl.col("latency_ms") * (1 - rel / 2),
                               visit_high_ms=pl.col("latency_ms") * (1 + rel / 2))
    return write_profile(path, frame, meta)


def test_compute_r_notes_a_choice_whose_visits_disagreed(profiles):
    lat, acc = profiles
    report = compute_r(lat, acc, selection_settings()).report
    assert [(c.batch_size, c.tokens) for c in report.choices] == [(1, 9), (4, 13)]
    assert not any("visits disagreed" in n for n in report.notes)  # no visits recorded: nothing to say
    _with_visits(lat, {})
    assert not any("visits disagreed" in n for n in compute_r(lat, acc, selection_settings()).report.notes)
    # The chosen point of batch 1 and the unpruned point of batch 4 drifted by 5% and 3%.
    _with_visits(lat, {(1, 9): 0.05, (4, 17): 0.03, (4, 9): 0.2})
    notes = [n for n in compute_r(lat, acc, selection_settings()).report.notes if "visits disagreed" in n]
    assert notes == [
        "batch 1: the profile's visits disagreed (n = 9: 1.950 to 2.050 ms, 5.0% of its median): the device "
        "drifted between them, which the predicted interval does not include: measure the choice side by side "
        "(pomt refine, pomt bench)",
        "batch 4: the profile's visits disagreed (n = 17: 9.850 to 10.150 ms, 3.0% of its median): the device "
        "drifted between them, which the predicted interval does not include: measure the choice side by side "
        "(pomt refine, pomt bench)"]


def test_the_grid_visits_again_a_drop_that_a_neighbours_slow_visit_would_hide():
    # The unpruned end n = 60 was slow in both its visits (120 ms, where the curve is near
    # 4 ms), and n = 59 had one slow visit (130 ms) among fast ones. Judged with the visits,
    # the levels overlap: no step. The grid's search for drops to visit again judges the
    # intervals alone, so n = 60 is visited again (a third visit finds its true level).
    rows = [{"batch_size": 1, "tokens": 60, "latency_ms": 120.0, "status": "budget", "ci_low_ms": None,
             "ci_high_ms": None, "visit_low_ms": 119.9, "visit_high_ms": 120.1}]
    for n in range(59, 40, -1):
        ms = 1.0 + 0.05 * n
        rows.append({"batch_size": 1, "tokens": n, "latency_ms": ms, "status": "ok", "ci_low_ms": 0.99 * ms,
                     "ci_high_ms": 1.01 * ms, "visit_low_ms": ms, "visit_high_ms": 130.0 if n == 59 else ms})
    frame = pl.DataFrame(rows)
    assert _steps(frame) == []
    again = find_steps(frame, excursions=True)
    assert (60, 59) in list(zip(again["from_tokens"].to_list(), again["to_tokens"].to_list()))


@pytest.mark.parametrize("args, words", [
    (["--setting", "a=nan,1,1"], ("BUDGET nan", "not a finite number")),
    (["--setting", "a=inf,1,1"], ("BUDGET inf", "not a finite number")),
    (["--seed", "-1"], ("--seed: -1 is out of range", ">= 0")),
    (["--draws", "x"], ("argument --draws", "'x'", "--help")),
    (["--report-only"], ("unrecognized arguments: --report-only",)),
])
def test_simulate_profile_refuses_bad_settings_in_one_line(tmp_path, capsys, args, words):
    from conftest import script_refusal, write_latency

    files = [str(tmp_path / "report.json"), str(write_latency(tmp_path / "a.parquet")),
             str(write_latency(tmp_path / "b.parquet"))]
    (tmp_path / "report.json").write_text("[1, 2]")
    line = script_refusal(simulate_profile.main, [*files, *args], capsys)
    assert all(word in line for word in words), line
    line = script_refusal(simulate_profile.main, files, capsys)  # a JSON list: no gpu_report.py report
    assert "cannot model the device" in line and "'list' object" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet", "report.json"]
