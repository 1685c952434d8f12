"""The pipelines called from Python: typed settings in, typed results with the paths written out."""

from __future__ import annotations

import json

import pytest

from conftest import write_accuracy, write_latency
from pomt_cli import digits, pipelines
from pomt_cli.accuracy.evaluate import EstimateConfig
from pomt_cli.errors import PomtError
from pomt_cli.options import TokenRange
from pomt_cli.pipelines import demonstration
from pomt_cli.pipelines import (
    AccuracySettings,
    ComputeRSettings,
    ProfileSettings,
    Reporter,
)
from pomt_cli.formats.accuracy import read_accuracy
from pomt_cli.formats.latency import read_latency
from pomt_cli.selection import SelectionSettings
from pomt_cli.formats.report import read_report

FAST = dict(budget_s=0.05, min_samples=3, warmup=1, passes=1, remeasure=0, lock_clocks=False)


class Recorder(Reporter):
    def __init__(self) -> None:
        self.points: list[tuple[int, int]] = []
        self.notes: list[str] = []

    def grid(self, event) -> None:
        if event.frame is not None:
            self.points.append((event.batch_size, event.tokens))

    def note(self, text: str) -> None:
        self.notes.append(text)


def test_profile_returns_the_files_it_wrote_and_resumes_a_complete_one(tmp_path):
    recorder = Recorder()
    settings = ProfileSettings(model=digits.NAME, device="cpu", batch_sizes=[1, 2],
                               tokens=TokenRange(start=65, stop=25, stride=20), output_dir=tmp_path,
                               command="pomt profile --model digits-vit", **FAST)
    result = pipelines.profile(settings, recorder)
    assert result.profile.parent == tmp_path and result.profile.suffix == ".parquet" and result.plot.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([result.profile.name, result.plot.name])
    frame, meta = read_latency(result.profile)
    assert sorted(zip(frame["batch_size"], frame["tokens"])) == sorted((b, n) for b in (1, 2) for n in (65, 45, 25))
    assert sorted(recorder.points) == sorted(zip(frame["batch_size"], frame["tokens"]))
    assert meta.complete and meta.command == "pomt profile --model digits-vit"
    assert result.frame.equals(frame.select(result.frame.columns))

    again = pipelines.profile(settings.model_copy(update={"resume": result.profile}), recorder)
    assert again.resumed_complete and again.profile == result.profile
    assert recorder.notes == [f"{result.profile} is complete: nothing to measure"]


def test_profile_refuses_bad_settings_before_writing(tmp_path):
    with pytest.raises(PomtError, match="--layer applies to --method pomt only"):
        pipelines.profile(ProfileSettings(model=digits.NAME, device="cpu", layers=[1], output_dir=tmp_path / "o"))
    with pytest.raises(PomtError, match="STOP 1 must exceed"):
        pipelines.profile(ProfileSettings(model=digits.NAME, device="cpu", tokens=TokenRange(start=65, stop=1, stride=1),
                                          output_dir=tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_compute_r_finds_the_pair_chooses_r_and_returns_its_files(tmp_path):
    lat = write_latency(tmp_path / "lat.parquet")
    acc = write_accuracy(tmp_path / "acc.parquet")
    recorder = Recorder()
    result = pipelines.compute_r(ComputeRSettings(output_dir=tmp_path, selection=SelectionSettings(alpha=0.5),
                                                  command="pomt compute-r"), recorder)
    assert (result.latency, result.accuracy) == (lat, acc)
    assert recorder.notes[0].startswith(f"latency profile: {lat}") and recorder.notes[1].startswith(
        f"accuracy profile: {acc}")
    assert result.report.is_file() and result.plot.is_file() and result.report.parent == tmp_path
    report = read_report(result.report)
    assert report.command == "pomt compute-r" and report.choices == result.selection.report.choices
    assert json.loads(result.report.read_text())["criterion"] == "utility"


def test_estimate_accuracy_on_the_digits_model(tmp_path):
    config = EstimateConfig(model=digits.NAME, data="digits", tokens=TokenRange(start=65, stop=33, stride=32),
                            limit=40, batch_size=40)
    result = pipelines.estimate_accuracy(AccuracySettings(estimate=config, torch_device="cpu", output_dir=tmp_path,
                                                          command="pomt estimate-accuracy"))
    assert result is not None and result.world_size == 1
    frame, meta = read_accuracy(result.profile)
    assert frame["tokens"].to_list() == [65, 33] and frame["images"].to_list() == [40, 40]
    assert meta.command == "pomt estimate-accuracy" and result.plot.is_file()
    assert frame.select("accuracy").equals(result.run.frame.select("accuracy"))


@pytest.mark.parametrize("device, torch_device, expected", [
    ("cpu", None, "cpu"),  # the preset's torch device
    ("orin", "cpu", "cpu"),  # --torch-device overrides it, for accuracy as for latency
    ("nvidia", None, "cuda"),
])
def test_demo_estimates_accuracy_where_it_measures_latency(tmp_path, monkeypatch, device, torch_device, expected):
    seen = {}

    class Steps(Reporter):
        def step(self, title, args) -> None:
            seen.setdefault("steps", []).append(list(args))

    def accuracy_step(settings, reporter):
        seen["settings"] = settings
        raise PomtError("stop after the accuracy step's settings")

    # the demo calls the pipelines it imported into its own module
    monkeypatch.setattr(demonstration, "profile", lambda settings, reporter: seen.setdefault("profile", settings))
    monkeypatch.setattr(demonstration, "estimate_accuracy", accuracy_step)
    with pytest.raises(PomtError, match="stop after"):
        pipelines.demo(pipelines.DemoSettings(output_dir=tmp_path / "demo", device=device, torch_device=torch_device),
                       Steps())
    assert seen["settings"].torch_device == expected
    printed = seen["steps"][1]
    assert printed[0] == "estimate-accuracy" and printed[printed.index("--torch-device") + 1] == expected
    assert seen["profile"].torch_device == torch_device and seen["profile"].device == device


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ProfileSettings(batch_size=[1, 4]), "batch_size\n  Extra inputs are not permitted"),
        (lambda: ProfileSettings(batch_sizes=[0]), "batch_sizes.0\n  Input should be greater than 0"),
        (lambda: ComputeRSettings(batch_size=[4]), "batch_size\n  Extra inputs are not permitted"),
        (lambda: AccuracySettings(estimate=EstimateConfig(model="digits-vit", data="digits", estimater="pomt")),
         "estimater\n  Extra inputs are not permitted"),
        (lambda: SelectionSettings(latency_budget=5.0), "latency_budget\n  Extra inputs are not permitted"),
        (lambda: SelectionSettings(latency_budget_ms=5.0), "latency_budget_ms is the parameter of criterion 'latency_budget'"),
        (lambda: SelectionSettings(criterion="max_accuracy_drop"), "criterion 'max_accuracy_drop' needs max_accuracy_drop"),
    ],
)
def test_settings_refuse_misspelled_and_impossible_fields_when_made(make, match):
    """A library caller's typo must not fall back to a default silently (batch_size= profiling batch 1)."""
    with pytest.raises(ValueError, match=match):
        make()


def test_a_demo_where_pruning_never_pays_leaves_tome_and_topk_out_and_says_so(tmp_path, monkeypatch):
    # refine (stood in for here) found no candidate faster at any batch size: R = 0 everywhere.
    # ToMe and Top-K would then be benched at r = 1 each, matching nothing POMT removes.
    from pomt_cli.formats.report import write_report
    from pomt_cli.pipelines.refinement import RefineResult

    steps = []

    class Steps(Reporter):
        def step(self, title, args) -> None:
            steps.append((title, list(args)))

    def unpruned(settings, reporter):
        report = read_report(settings.report)
        choices = [c.model_copy(update=dict(
            R=0, tokens=c.reference_tokens, latency_ms=c.reference_ms, latency_saved_pct=0.0,
            accuracy=c.accuracy + c.accuracy_lost, accuracy_lost=0.0, pays=False, layer=None, latency_ratio=None,
            latency_ratio_low=None, latency_ratio_high=None, unpruned_ms=None)) for c in report.choices]
        report = report.model_copy(update=dict(choices=choices, R=0, tokens=choices[0].tokens, layer=None))
        write_report(report, settings.report)
        return RefineResult(report=report, before=[], rechoices={}, path=settings.report, plot=None)

    monkeypatch.setattr(demonstration, "refine", unpruned)
    result = pipelines.demo(pipelines.DemoSettings(output_dir=tmp_path / "demo", device="cpu", budget_s=0.02),
                            Steps())
    title, args = steps[-1]
    assert args[0] == "bench" and "--tome-r" not in args and "--topk-r" not in args
    assert "ToMe and Top-K are left out" in title
    assert sorted(set(result.benched.frame["method"].to_list())) == ["none"]
    summary = result.summary.read_text()
    assert "## The methods compared\n\nR = 0 at every batch size: POMT prunes nothing here, so ToMe and Top-K" in summary
