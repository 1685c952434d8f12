"""The ``pomt demo`` pipeline: every other pipeline in turn on the bundled digits model; a summary page.

It calls the other pipelines; none of them imports it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from pomt_cli import digits
from pomt_cli.accuracy.evaluate import EstimateConfig
from pomt_cli.defaults import DEMO_BUDGET_S, ROUNDS
from pomt_cli.devices.presets import default_preset_name, load_preset
from pomt_cli.errors import PomtError
from pomt_cli.formats.outputs import check_output_dir, write_set
from pomt_cli.formats.report import Report
from pomt_cli.options import TokenRange
from pomt_cli.pipelines.accuracy import AccuracyResult, AccuracySettings, estimate_accuracy
from pomt_cli.pipelines.benchmark import BenchResult, BenchSettings, bench
from pomt_cli.pipelines.choice import ComputeRResult, ComputeRSettings, compute_r
from pomt_cli.pipelines.common import SILENT, Reporter, Settings
from pomt_cli.pipelines.latency import ProfileResult, ProfileSettings, profile
from pomt_cli.pipelines.refinement import RefineResult, RefineSettings, refine
from pomt_cli.pruning import method_names
from pomt_cli.pruning.registry import get as get_method
from pomt_cli.report import SUMMARY_TITLE, summary_page
from pomt_cli.selection import REFINE_CANDIDATES

#: Batch sizes profiled and benched: one image, and a batch that fills a CPU's cores.
DEMO_BATCH_SIZES = [1, 32]
#: POMT's pruning blocks profiled: every block of digits-vit; compute-r chooses among them.
DEMO_LAYERS = list(range(digits.ARCHITECTURE["depth"]))
#: The kept-token grid of both profiles: N = 65 down to 5 in steps of 4 (16 points per curve).
DEMO_TOKENS = TokenRange(start=65, stop=5, stride=4)
#: What the summary's comparison says when R = 0 at every batch size.
LEFT_OUT = ("R = 0 at every batch size: POMT prunes nothing here, so ToMe and Top-K, which the demo sets to "
            "remove about as many tokens as POMT, are left out; bench timed the unpruned model alone.")


class DemoSettings(Settings):
    """The settings of ``pomt demo``: where it writes and measures."""

    output_dir: Path = Path("runs/demo")
    device: str | None = None
    torch_device: str | None = None
    lock_clocks: bool = False
    budget_s: float = Field(DEMO_BUDGET_S, gt=0, description="seconds per profile point")


@dataclass(frozen=True)
class DemoResult:
    """The results of the demo's five steps and the summary page written beside them."""

    latency: ProfileResult
    accuracy: AccuracyResult
    chosen: ComputeRResult
    refined: RefineResult
    benched: BenchResult
    summary: Path
    elapsed_s: float

    def paths(self) -> dict[str, Path]:
        """Every file the demo wrote, by name."""
        return {
            "latency": self.latency.profile, "latency_plot": self.latency.plot,
            "accuracy": self.accuracy.profile, "accuracy_plot": self.accuracy.plot,
            "report": self.chosen.report, "report_plot": self.chosen.plot, "bench": self.benched.parquet,
            "summary": self.summary,
        }


def _layers_text(layers: Sequence[int]) -> str:
    return ",".join(map(str, layers))


def _clear_demo_summary(folder: Path) -> Path:
    """The summary's path in ``folder``, with an earlier demo's summary removed.

    The steps replace the files that page describes, so a demo stopped halfway must not
    leave it behind; a ``summary.md`` that no demo wrote is the user's and is kept.

    Raises:
        PomtError: ``folder`` holds a summary.md (or a folder of that name) that no demo wrote.
    """
    path = folder / "summary.md"
    if not path.exists():
        return path
    try:
        ours = path.is_file() and path.read_text(errors="replace").startswith(SUMMARY_TITLE)
    except OSError:
        ours = False
    if not ours:
        raise PomtError(f"--output-dir {folder} holds a {path.name} that pomt demo did not write: give an empty or "
                        "new folder, or move that file")
    path.unlink()
    return path


def write_summary(path: Path, page: str) -> Path:
    """Write the summary ``page`` to ``path`` as a set of one file (the temporaries of a killed demo go).

    Raises:
        PomtError: it cannot be written (a full disk...); ``path`` is left as it was.
    """
    suffix = path.suffix[1:]
    return write_set(path.parent, path.stem, {suffix: lambda tmp: tmp.write_text(page, encoding="utf-8")})[suffix]


def demo(settings: DemoSettings, reporter: Reporter = SILENT) -> DemoResult:
    """Profile, estimate accuracy, choose R, refine it and bench on the bundled digits model; write a summary.

    Raises:
        PomtError: an unknown preset, an unwritable folder, a summary.md there that no
            demo wrote, or any step's error.
    """
    s = settings
    device = s.device or default_preset_name()
    preset = load_preset(device)  # an unknown preset fails before anything runs
    # Accuracy runs where latency does: the preset's torch device, or the one --torch-device names.
    accuracy_device = s.torch_device or preset.torch_device
    folder = check_output_dir(s.output_dir)  # each step creates it when it writes its files
    summary_path = _clear_demo_summary(folder)
    began = time.perf_counter()
    common = ["--device", device, *(["--torch-device", s.torch_device] if s.torch_device else []),
              "--lock-clocks" if s.lock_clocks else "--no-lock-clocks"]
    sizes = _layers_text(DEMO_BATCH_SIZES)

    reporter.step("latency of the POMT-patched model against kept tokens, at every layer", [
        "profile", "--model", digits.NAME, "--method", "pomt", "--layer", _layers_text(DEMO_LAYERS),
        "--batch-size", sizes, "--tokens", str(DEMO_TOKENS), "--budget", f"{s.budget_s:g}",
        "--output-dir", str(folder), *common])
    latency = profile(ProfileSettings(
        model=digits.NAME, device=device, torch_device=s.torch_device, batch_sizes=DEMO_BATCH_SIZES,
        tokens=DEMO_TOKENS, budget_s=s.budget_s, workload="pomt", layers=DEMO_LAYERS, lock_clocks=s.lock_clocks,
        output_dir=folder, command=s.command), reporter)
    reporter.finished(latency)

    reporter.step("POMT's accuracy against kept tokens, at every layer", [
        "estimate-accuracy", "--model", digits.NAME, "--data", "digits", "--estimator", "pomt",
        "--layer", _layers_text(DEMO_LAYERS), "--tokens", str(DEMO_TOKENS), "--batch-size", "150",
        "--torch-device", accuracy_device, "--output-dir", str(folder)])
    accuracy = estimate_accuracy(AccuracySettings(
        estimate=EstimateConfig(model=digits.NAME, data="digits", estimator="pomt", layer=DEMO_LAYERS[0],
                                layers=DEMO_LAYERS, tokens=DEMO_TOKENS, batch_size=150),
        torch_device=accuracy_device, output_dir=folder, command=s.command), reporter)
    if accuracy is None:
        raise PomtError("pomt demo runs in one process: start it without torchrun")
    reporter.finished(accuracy)

    reporter.step("R from the two profiles", [
        "compute-r", "--latency", str(latency.profile), "--accuracy", str(accuracy.profile),
        "--output-dir", str(folder)])
    chosen = compute_r(ComputeRSettings(latency=latency.profile, accuracy=accuracy.profile, output_dir=folder,
                                        command=s.command), reporter)
    reporter.finished(chosen)

    reporter.step("the best candidates measured again beside the unpruned model", [
        "refine", str(chosen.report), "--candidates", str(REFINE_CANDIDATES), "--budget", f"{s.budget_s:g}",
        "--rounds", str(ROUNDS), *common])
    refined = refine(RefineSettings(report=chosen.report, candidates=REFINE_CANDIDATES, budget_s=s.budget_s,
                                    rounds=ROUNDS, device=device, torch_device=s.torch_device,
                                    lock_clocks=s.lock_clocks, command=s.command), reporter)
    reporter.finished(refined)

    # ToMe and Top-K remove about as many tokens over all blocks as POMT does at once; where POMT
    # removes none at any batch size, they have nothing to match and are left out.
    report: Report = refined.report
    most = max(c.R for c in report.choices)
    per_block = math.ceil(most / digits.ARCHITECTURE["depth"])
    own_r = {m: per_block for m in method_names()
             if most and get_method(m).bench_r is not None and get_method(m).reduces}
    methods = [] if own_r else [m for m in method_names() if get_method(m).bench_r is None or not get_method(m).reduces]
    reporter.step("the chosen (layer, R) against the baseline, ToMe and Top-K" if own_r else
                  "the unpruned model alone: R = 0 at every batch size, so ToMe and Top-K are left out", [
        "bench", "--model", digits.NAME, "--data", "digits", "--r-from", str(chosen.report),
        *[arg for m in methods for arg in ("--method", m)],
        *[arg for m in own_r for arg in (f"--{m}-r", str(per_block))], "--budget", f"{2 * s.budget_s:g}",
        "--rounds", str(ROUNDS), "--output-dir", str(folder), *common])
    benched = bench(BenchSettings(
        model=digits.NAME, data="digits", r_from=chosen.report, methods=methods, method_r=own_r,
        budget_s=2 * s.budget_s, rounds=ROUNDS, device=device, torch_device=s.torch_device,
        lock_clocks=s.lock_clocks, output_dir=folder, command=s.command), reporter)
    reporter.finished(benched)

    files = {"latency": latency.profile, "latency_plot": latency.plot, "accuracy": accuracy.profile,
             "accuracy_plot": accuracy.plot, "report": chosen.report, "report_plot": chosen.plot,
             "bench": benched.parquet}
    page = summary_page(files, folder, device, time.perf_counter() - began, None if own_r else LEFT_OUT)
    summary = write_summary(summary_path, page)
    return DemoResult(latency=latency, accuracy=accuracy, chosen=chosen, refined=refined, benched=benched,
                      summary=summary,
                      elapsed_s=time.perf_counter() - began)
