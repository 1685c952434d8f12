"""`pomt refine`: compute-r's best candidates measured again beside the unpruned model, and the choice made again.

The re-choice is checked as a pure function on the synthetic layered profiles of
test_compute_r.py with side-by-side measurements written out by hand; the command runs end
to end on the bundled digits model with a coarse grid and small budgets.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch

from conftest import FakeTools, preset_file, run_in_process, sigint_default
from test_compute_r import write_layered
from pomt_cli.cli.compute_r import selection_settings
from pomt_cli.formats.report import read_report, sha256_file, write_report
from pomt_cli.selection import compute_r, rechoose, refine_candidates

MEASURED_SCHEMA = {"layer": pl.Int64, "tokens": pl.Int64, "R": pl.Int64, "ms": pl.Float64, "ci_low_ms": pl.Float64,
                   "ci_high_ms": pl.Float64, "samples": pl.Int64}


def measured(rows: list[tuple]) -> pl.DataFrame:
    """``(layer, tokens, ms, ci_low, ci_high)`` rows as refine measures them (N = 17; R = 0 is unpruned)."""
    return pl.DataFrame([{"layer": layer, "tokens": n, "R": 17 - n, "ms": ms, "ci_low_ms": low, "ci_high_ms": high,
                          "samples": 30} for layer, n, ms, low, high in rows], schema=MEASURED_SCHEMA)


def test_candidates_are_ranked_without_the_interval_filter(tmp_path):
    lat, acc = write_layered(tmp_path)
    selection = compute_r(lat, acc, selection_settings())
    # At batch 1 compute-r found nothing faster beyond its interval (R = 0), yet its best pruned points are measured.
    assert selection.report.choices[1].R == 0
    b1 = refine_candidates(selection.curves[1], selection_settings(), 1, 3)
    assert b1.select("layer", "tokens").rows() == [(2, 9), (2, 13), (0, 13)]
    b4 = refine_candidates(selection.curves[4], selection_settings(), 4, 2)
    assert b4.select("layer", "tokens").rows() == [(0, 13), (2, 9)] and b4["R"].min() > 0


def test_a_candidate_that_pays_side_by_side_is_chosen_on_the_profiles_scale(tmp_path):
    lat, acc = write_layered(tmp_path)
    selection = compute_r(lat, acc, selection_settings())
    again = rechoose(selection.curves[1], selection.points[1],
                     measured([(None, 17, 1.25, 1.24, 1.26), (2, 9, 1.0, 0.99, 1.01), (2, 13, 1.3, 1.2, 1.4)]),
                     selection_settings(), 1, 17)
    c = again.choice
    assert (c.R, c.layer, c.tokens, c.refined, c.pays) == (8, 2, 9, True, True)
    # The refined ratio (1.0 / 1.25) times the profile's unpruned latency (1.0 ms at batch 1).
    assert c.latency_ratio == pytest.approx(0.8) and c.latency_ms == pytest.approx(0.8)
    assert c.latency_ratio_low == pytest.approx(0.99 / 1.26) and c.latency_ratio_high == pytest.approx(1.01 / 1.24)
    assert (c.refined_ms, c.refined_unpruned_ms, c.unpruned_ms, c.reference_ms) == (1.0, 1.25, 1.25, 1.0)
    # The utility keeps the maxima of the whole curve (1.2 ms, 80%), as compute-r's choice did.
    assert c.utility == pytest.approx(0.5 * (1 - 0.8 / 1.2) + 0.5 * 78 / 80)
    table = again.table
    assert table.select("R", "layer").rows() == [(0, 2), (4, 2), (8, 2)] or table["R"].to_list() == [0, 4, 8]
    assert table["chosen"].to_list() == [False, False, True]
    # Profile ratios: each candidate over its own curve's unpruned point (layer 2: 1.0 ms).
    assert table["profile_ratio"].to_list() == pytest.approx([1.0, 1.2, 0.98])
    assert table["ratio"].to_list() == pytest.approx([1.0, 1.3 / 1.25, 0.8])


def test_r_is_0_when_no_candidate_is_faster_beyond_the_interval(tmp_path):
    lat, acc = write_layered(tmp_path)
    selection = compute_r(lat, acc, selection_settings())
    # compute-r chose R = 4 at layer 0 at batch 4; side by side it is faster by its median only.
    assert (selection.report.choices[0].R, selection.report.choices[0].layer) == (4, 0)
    again = rechoose(selection.curves[4], selection.points[4],
                     measured([(None, 17, 10.0, 9.8, 10.2), (0, 13, 9.9, 9.7, 10.3), (0, 9, 10.5, 10.3, 10.7)]),
                     selection_settings(), 4, 17)
    c = again.choice
    assert (c.R, c.tokens, c.pays, c.refined, c.latency_ratio) == (0, 17, False, True, 1.0)
    assert c.latency_ms == pytest.approx(10.1)  # the unpruned model keeps its profile latency
    assert c.latency_ratio_low is None and c.refined_unpruned_ms == 10.0
    assert again.table["chosen"].to_list() == [True, False, False]


def test_a_candidate_measured_too_briefly_for_an_interval_does_not_count(tmp_path):
    lat, acc = write_layered(tmp_path)
    selection = compute_r(lat, acc, selection_settings())
    # Layer 2 at n = 9 reads 20% faster by its median, but its few samples gave no interval.
    again = rechoose(selection.curves[1], selection.points[1],
                     measured([(None, 17, 1.25, 1.24, 1.26), (2, 9, 1.0, None, None), (2, 13, 1.3, 1.2, 1.4)]),
                     selection_settings(), 1, 17)
    assert (again.choice.R, again.choice.pays) == (0, False)
    assert again.table.filter(pl.col("R") == 8)["ratio_high"].item() is None


def test_the_accuracy_drop_criterion_chooses_among_the_refined_points(tmp_path):
    lat, acc = write_layered(tmp_path)
    selection = compute_r(lat, acc, selection_settings(max_accuracy_drop=2.0))
    settings = selection_settings(max_accuracy_drop=2.0)
    candidates = refine_candidates(selection.curves[4], settings, 4, 3)
    assert candidates.select("layer", "tokens").rows() == [(2, 9), (2, 13)]  # layer 0 loses 10 points or more
    # Measured side by side, layer 2 at n = 13 is the faster one: the criterion now picks it.
    again = rechoose(selection.curves[4], selection.points[4],
                     measured([(None, 17, 10.0, 9.9, 10.1), (2, 9, 9.0, 8.9, 9.1), (2, 13, 8.0, 7.9, 8.1)]),
                     settings, 4, 17)
    assert (again.choice.layer, again.choice.R) == (2, 4)


def test_a_report_of_format_3_is_read_unrefined(tmp_path):
    lat, acc = write_layered(tmp_path)
    data = json.loads(compute_r(lat, acc, selection_settings()).report.model_dump_json())
    data["format_version"] = 3
    del data["refine"]
    for choice in data["choices"]:
        for key in ("refined", "refined_ms", "refined_unpruned_ms"):
            del choice[key]
    (tmp_path / "v3.json").write_text(json.dumps(data))
    old = read_report(tmp_path / "v3.json")
    assert old.format_version == 3 and old.refine is None
    assert [(c.refined, c.refined_ms) for c in old.choices] == [(False, None), (False, None)]


# The command, on the bundled digits model


@pytest.fixture(scope="module")
def digits_report(tmp_path_factory) -> Path:
    """A pomt-workload report of digits-vit (65 tokens) at layers 0 and 1, batch 1, on the grid 65:17:16."""
    from pomt_cli.accuracy.evaluate import EstimateConfig
    from pomt_cli.options import TokenRange
    from pomt_cli.pipelines import AccuracySettings, ComputeRSettings, ProfileSettings
    from pomt_cli.pipelines import compute_r as run_compute_r
    from pomt_cli.pipelines import estimate_accuracy, profile

    folder = tmp_path_factory.mktemp("refine") / "runs"
    tokens = TokenRange(start=65, stop=17, stride=16)
    threads = torch.get_num_threads()
    latency = profile(ProfileSettings(model="digits-vit", device="cpu", batch_sizes=[1], tokens=tokens, budget_s=0.02,
                                      workload="pomt", layers=[0, 1], lock_clocks=False, output_dir=folder))
    accuracy = estimate_accuracy(AccuracySettings(
        estimate=EstimateConfig(model="digits-vit", data="digits", estimator="pomt", layer=0, layers=[0, 1],
                                tokens=tokens, batch_size=150), output_dir=folder))
    chosen = run_compute_r(ComputeRSettings(latency=latency.profile, accuracy=accuracy.profile, output_dir=folder))
    torch.set_num_threads(threads)
    return chosen.report


def copy_report(report: Path, folder: Path) -> Path:
    """The report and its plot copied to ``folder`` (the profiles stay where the report records them)."""
    folder.mkdir()
    for suffix in (".json", ".png"):
        shutil.copy(report.with_suffix(suffix), folder / report.with_suffix(suffix).name)
    return folder / report.name


def test_refine_rewrites_the_report_with_the_side_by_side_choice(tmp_path, digits_report, capsys):
    report = copy_report(digits_report, tmp_path / "r")
    before = read_report(report)
    profiles = {p: sha256_file(p) for p in (Path(before.latency.path), Path(before.accuracy.path))}
    png = report.with_suffix(".png").stat().st_ino
    threads = torch.get_num_threads()
    code, out, err = run_in_process(["refine", str(report), "--budget", "0.02", "--rounds", "2",
                                     "--no-lock-clocks"], capsys)
    torch.set_num_threads(threads)
    assert code == 0, err
    after = read_report(report)
    assert after.format_version == 4 and after.refine is not None
    assert (after.refine.candidates, after.refine.rounds, after.refine.budget_s) == (3, 2, 0.02)
    assert [c.model_dump() for c in after.refine.before] == [c.model_dump() for c in before.choices]
    choice = after.choices[0]
    assert choice.refined and choice.batch_size == 1
    rows = after.refine.settings
    # The unpruned model and the three best pruned points, each measured in both rounds.
    assert [r.R == 0 for r in rows].count(True) == 1 and len(rows) == 4 and all(r.samples > 0 for r in rows)
    unpruned = next(r for r in rows if r.R == 0)
    for r in rows:
        assert r.ratio == pytest.approx(r.ms / unpruned.ms)
    # Two rounds each: every candidate's interval comes from its rounds too, so it holds its ratio and
    # is never narrower than the range over the two pooled intervals.
    for r in (r for r in rows if r.R):
        assert r.ratio_low <= r.ratio <= r.ratio_high
        if None not in (r.ci_low_ms, unpruned.ci_high_ms):
            assert r.ratio_low <= r.ci_low_ms / unpruned.ci_high_ms + 1e-12
            assert r.ratio_high >= r.ci_high_ms / unpruned.ci_low_ms - 1e-12
    (picked,) = [r for r in rows if r.chosen]
    assert (picked.R, picked.layer if picked.R else None) == (choice.R, choice.layer if choice.R else None)
    assert choice.refined_ms == picked.ms and choice.refined_unpruned_ms == unpruned.ms
    assert choice.latency_ratio == pytest.approx(picked.ms / unpruned.ms)
    if choice.R:
        assert picked.ratio_high < 1 and choice.latency_ms == pytest.approx(picked.ratio * choice.reference_ms)
    elif not choice.pays:  # R = 0 because no candidate was faster beyond its ratio's interval; one
        # with too few samples for an interval is unproven, whatever its ratio
        assert all(r.ratio_high is None or r.ratio_high >= 1 for r in rows if r.R)
    assert report.with_suffix(".png").stat().st_ino != png  # the plot was written again, with the report
    assert {p: sha256_file(p) for p in profiles} == profiles
    assert sorted(p.name for p in report.parent.iterdir()) == sorted([report.name, report.with_suffix(".png").name])
    text = " ".join(out.split())
    assert "Batch 1, side by side" in text and f"report: {report}" in text
    assert "compute-r chose" in text
    assert max(len(line) for line in out.splitlines() if not line.startswith(("report:", "plot:"))) <= 80


def test_compute_r_hints_at_refine_for_the_pomt_workload(tmp_path, digits_report, capsys):
    before = read_report(digits_report)
    code, out, err = run_in_process(["compute-r", "--latency", before.latency.path, "--accuracy",
                                     before.accuracy.path, "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert "measure the choices again side by side on the device: pomt refine " in " ".join(out.split())


def test_bench_hints_at_refine_only_while_the_report_is_unrefined(tmp_path, digits_report, capsys):
    report = copy_report(digits_report, tmp_path / "r")
    bench = ["bench", "--model", "digits-vit", "--device", "cpu", "--no-lock-clocks", "--method", "none",
             "--method", "pomt", "--r-from", str(report), "--budget", "0.02", "--rounds", "1"]
    hint = "the choices were not refined: measuring them side by side on the device first"
    threads = torch.get_num_threads()
    code, out, err = run_in_process([*bench, "--output-dir", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert hint in " ".join(out.split())
    assert "profile: the latency profile's own ms" in " ".join(out.split())
    assert f"  pomt refine {report}\n" in out  # the command, path whole, on a line of its own
    assert "the report's latency was profiled on" not in out  # the same device
    code, _, err = run_in_process(["refine", str(report), "--budget", "0.02", "--rounds", "1", "--no-lock-clocks"],
                                  capsys)
    assert code == 0, err
    code, out, err = run_in_process([*bench, "--output-dir", str(tmp_path / "b")], capsys)
    torch.set_num_threads(threads)
    assert code == 0, err
    text = " ".join(out.split())
    assert "not refined" not in text and "from the ratios pomt refine measured side by side" in text
    # A refined choice's profile ms is its refined ratio on the profile's scale, not a point of the profile.
    assert "profile: the latency profile's own ms" not in text
    assert ("profile: the report's ms on the latency profile's scale (a refined choice: the ratio refine measured "
            "x the profile's unpruned ms)") in text


def test_bench_says_when_the_report_was_profiled_on_another_device(tmp_path, digits_report, capsys):
    report = copy_report(digits_report, tmp_path / "r")
    data = json.loads(report.read_text())
    data["latency"]["device_name"] = "NVIDIA Jetson AGX Orin"
    report.write_text(json.dumps(data))
    threads = torch.get_num_threads()
    code, out, err = run_in_process(["bench", "--model", "digits-vit", "--device", "cpu", "--no-lock-clocks",
                                     "--method", "pomt", "--r-from", str(report), "--budget", "0.02", "--rounds", "1",
                                     "--output-dir", str(tmp_path / "a")], capsys)
    torch.set_num_threads(threads)
    assert code == 0, err
    text = " ".join(out.split())
    assert "the report's latency was profiled on NVIDIA Jetson AGX Orin, not on " in text
    assert "its R and predictions are that device's; profile here and run compute-r again" in text


def refused(args: list[str], capsys, message: str, unchanged: Path | None = None) -> None:
    """Exit code 2, one line naming ``message``, and ``unchanged`` left as it was."""
    content = unchanged.read_bytes() if unchanged is not None else None
    code, _, err = run_in_process(args, capsys)
    assert code == 2, err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    if unchanged is not None:
        assert unchanged.read_bytes() == content


def test_bad_input_is_refused_in_one_line(tmp_path, digits_report, capsys):
    report = copy_report(digits_report, tmp_path / "r")
    refused(["refine", str(tmp_path / "none.json")], capsys, "does not exist")
    refused(["refine", str(report.parent)], capsys,
            f"report {report.parent} is a folder: give the .json file written by pomt compute-r, e.g. {report}")
    # A folder refine cannot rewrite the report in (a read-only mount; root writes elsewhere).
    writable = os.access
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "access", lambda path, mode: Path(path) != report.parent and writable(path, mode))
        refused(["refine", str(report)], capsys,
                f"cannot rewrite report {report}: its folder {report.parent} is not writable", report)
    (tmp_path / "text.json").write_text("{}")
    refused(["refine", str(tmp_path / "text.json")], capsys, "is not a pomt compute-r report")
    for option, value in (("--candidates", "0"), ("--budget", "0"), ("--rounds", "0")):
        refused(["refine", str(report), option, value], capsys, option, report)
    if not torch.cuda.is_available():
        refused(["refine", str(report), "--torch-device", "cuda", "--no-lock-clocks"], capsys,
                "CUDA is not available", report)
    # A proxy report.
    lat, acc = write_layered(tmp_path)
    proxy = compute_r(tmp_path / "lat.parquet", tmp_path / "acc.parquet", selection_settings()).report
    proxy = proxy.model_copy(update={"workload": "proxy"})
    write_report(proxy, tmp_path / "proxy.json")
    refused(["refine", str(tmp_path / "proxy.json")], capsys,
            "refine measures the POMT-patched model: profile with --method pomt --layer L", tmp_path / "proxy.json")
    # Profiles changed or missing since compute-r.
    data = json.loads(report.read_text())
    moved = tmp_path / "lat.parquet"
    data["latency"]["sha256"] = "0" * 64
    report.write_text(json.dumps(data))
    refused(["refine", str(report)], capsys, f"changed since compute-r wrote {report}: run pomt compute-r again",
            report)
    data["latency"]["path"] = str(tmp_path / "gone.parquet")
    report.write_text(json.dumps(data))
    refused(["refine", str(report)], capsys, "is missing: run pomt compute-r again", report)
    assert moved.is_file()


def test_more_threads_than_cores_is_refused_before_torch_starts_them(tmp_path, digits_report, capsys):
    """100000 threads exhausted memory while torch started them: a traceback, not an error."""
    report = copy_report(digits_report, tmp_path / "r")
    threads = torch.get_num_threads()
    refused(["refine", str(report), "--threads", "100000", "--no-lock-clocks"], capsys,
            "--threads 100000 exceeds the", report)
    # A profile that records more threads than this machine has (edited, or from a larger machine).
    data = json.loads(report.read_text())
    profile = tmp_path / "lat.parquet"
    meta = json.loads(pl.read_parquet_metadata(data["latency"]["path"])["pomt"])
    pl.read_parquet(data["latency"]["path"]).write_parquet(
        profile, metadata={"pomt": json.dumps({**meta, "num_threads": 100000})})
    data["latency"].update(path=str(profile), sha256=sha256_file(profile))
    report.write_text(json.dumps(data))
    refused(["refine", str(report), "--no-lock-clocks"], capsys,
            f"the thread count of {profile} 100000 exceeds the", report)
    assert torch.get_num_threads() == threads


def test_ctrl_c_while_timing_restores_the_clocks_and_leaves_the_report_as_it_was(tmp_path, digits_report):
    report = copy_report(digits_report, tmp_path / "copy")
    before = {p.name: p.read_bytes() for p in report.parent.iterdir()}
    tools = FakeTools(tmp_path)
    preset = preset_file(tmp_path, "nvidia")
    cmd = [sys.executable, "-m", "pomt_cli", "refine", str(report), "--device", str(preset), "--torch-device", "cpu",
           "--budget", "2", "--rounds", "3", "--threads", "1"]
    proc = subprocess.Popen(cmd, env=tools.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)
    deadline = time.monotonic() + 120
    while not any("lock-gpu-clocks" in c for c in tools.calls()) and time.monotonic() < deadline \
            and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.5)  # well inside the timing: 4 settings x 3 rounds x 2 s
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "aborted", err
    calls = tools.calls()
    assert "nvidia-smi -i 0 --lock-gpu-clocks=1980,1980" in calls
    assert calls[-2:] == ["nvidia-smi -i 0 --reset-gpu-clocks", "nvidia-smi -i 0 --reset-memory-clocks"]
    assert {p.name: p.read_bytes() for p in report.parent.iterdir()} == before
