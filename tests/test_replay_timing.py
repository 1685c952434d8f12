"""scripts/replay_timing.py: recorded samples replayed through pomt's own stopping rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script, script_refusal

replay_timing = load_script("replay_timing")

WARM_S = 0.004


def _visit(n: int, samples: list[float], phase: str = "measure") -> dict:
    """A visit as gpu_report.py's engine section records it: one warm-up call of WARM_S."""
    measure_s = WARM_S + sum(samples) / 1e3
    return {"n": n, "phase": phase, "status": "ok", "warmup_calls": 1, "wall_s": measure_s + 0.001,
            "measure_s": measure_s, "samples_ms": samples}


@pytest.fixture
def report(tmp_path) -> Path:
    """Three points: constant (2 ms), bimodal (1 and 2 ms in turn, 3,000 calls), and too short a bimodal one."""
    bimodal = [1.0, 2.0] * 1500
    visits = [_visit(9, [2.0] * 30), _visit(5, bimodal[:2000]), _visit(3, [1.0, 2.0] * 10),
              _visit(9, [2.0] * 5), _visit(5, bimodal[2000:]), _visit(9, [2.0] * 5, "remeasure")]
    run = {"name": "tiny", "wall_s": 9.0, "summary": {"outside_visits_s": 0.5}, "visits": visits}
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"engine": {"status": "complete", "results": {"runs": [run]}}}))
    return path


def _replayed(report: Path, settings) -> dict:
    (run,) = replay_timing.engine_runs(report)
    return {p.tokens: p for p in (replay_timing.replay_point(rec, settings) for rec in replay_timing.recordings(run))}


def test_a_constant_recording_stops_at_min_samples_and_a_bimodal_one_at_the_budget(report):
    points = _replayed(report, replay_timing.Settings(rel_precision=0.01, budget_s=1.0, min_samples=10, warmup=1,
                                                      passes=1))
    constant, bimodal, short = points[9], points[5], points[3]
    assert (constant.status, constant.timed, constant.warmup) == ("ok", 10, 1)
    assert constant.seconds == pytest.approx(WARM_S + 10 * 2.0e-3)
    assert constant.median_ms == constant.all_median_ms == 2.0
    # Half the calls at 1 ms and half at 2 ms: the interval of the median never narrows to 1%.
    assert bimodal.status == "budget" and 1.0 <= bimodal.seconds < 1.0 + 0.01
    assert bimodal.timed == pytest.approx((1.0 - WARM_S) / 1.5e-3, abs=5)
    # 20 samples were recorded; the rule wanted more and the replay says so.
    assert (short.status, short.timed) == ("short", 20)


def test_passes_split_min_samples_and_budget_as_the_grid_does(report):
    points = _replayed(report, replay_timing.Settings(rel_precision=0.01, budget_s=1.0, min_samples=10, warmup=3,
                                                      passes=2))
    constant, bimodal = points[9], points[5]
    # Five calls per visit at least, but no interval of the median below six samples: the first
    # visit takes seven (5, then a chunk of 2), the second five more; three warm-ups, then one.
    assert (constant.status, constant.timed, constant.warmup) == ("ok", 12, 4)
    # Each of the two visits spends half the budget.
    assert bimodal.status == "budget" and 1.0 <= bimodal.seconds < 1.0 + 0.02


def test_the_script_prints_a_table_within_80_columns_and_the_full_profile(report, capsys):
    assert replay_timing.main([str(report), "--budget", "0.1", "--passes", "1"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "a full profile (n = 2..9)" in out and "recording ran out" in out and "n = 3" in out
    assert "1 re-measuring visits" in out


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "none.json"
    assert replay_timing.main([str(missing)]) == 2
    assert replay_timing.main([str(missing), "--rel-precision", "2"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)


@pytest.mark.parametrize("content, words", [
    ("[1, 2]", ("is no gpu_report.py report", "'list' object")),
    ('{"engine": {"results": {"runs": 5}}}', ("is no gpu_report.py report",)),
    ('{"engine": {"results": {"runs": [{"name": "x", "visits": [{"n": 3}]}]}}}', ("is no gpu_report.py report",)),
    ("", ("is no gpu_report.py report", "Expecting value")),
    ("tokens,latency_ms\n17,4.0\n", ("is no gpu_report.py report",)),
    (b"\x89PNG\r\n\x1a\n", ("is no gpu_report.py report", "utf-8")),
])
def test_a_file_that_is_no_engine_report_is_one_line(tmp_path, capsys, content, words):
    path = tmp_path / "report.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = script_refusal(replay_timing.main, [str(path)], capsys)
    assert all(word in line for word in words), line
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    (tmp_path / "folder.json").mkdir()
    assert "Is a directory" in script_refusal(replay_timing.main, [str(tmp_path / "folder.json")], capsys)


@pytest.mark.parametrize("args, words", [
    (["--budget", "inf"], ("a finite --budget > 0",)),
    (["--budget", "nan"], ("a finite --budget > 0",)),
    (["--budget", "x"], ("argument --budget", "'x'", "--help")),
    (["--min-samples", str(10**23)], ("--min-samples <= 10000",)),
    (["--passes", "two"], ("argument --passes", "'two'")),
])
def test_bad_settings_are_one_line(report, capsys, args, words):
    line = script_refusal(replay_timing.main, [str(report), *args], capsys)
    assert all(word in line for word in words), line
