"""The ``pomt compute-r`` pipeline: R chosen from a latency and an accuracy profile; the report and its plot."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pomt_cli.errors import PomtError
from pomt_cli.formats.accuracy import RANDOM
from pomt_cli.formats.lookup import find_profile_pair, find_profiles, interrupted_profiles
from pomt_cli.formats.outputs import OutputSet, check_output_dir, layers_part, output_stem
from pomt_cli.formats.report import Report, write_report
from pomt_cli.measure.runtimes import Runtime
from pomt_cli.pipelines.common import SILENT, Reporter, Settings
from pomt_cli.plots import plot_selection
from pomt_cli.selection import Selection, SelectionSettings
from pomt_cli.selection import compute_r as select_r

class ComputeRSettings(Settings):
    """The settings of ``pomt compute-r``: the two profiles (found in ``output_dir`` when None) and the criterion."""

    latency: Path | None = None
    accuracy: Path | None = None
    selection: SelectionSettings = SelectionSettings()
    batch_sizes: list[int] | None = None
    output_dir: Path = Path("runs")


@dataclass(frozen=True)
class ComputeRResult:
    """The choice of R and the files written (``report``: JSON, ``plot``: PNG)."""

    selection: Selection
    latency: Path
    accuracy: Path
    report: Path
    plot: Path


def compute_r(settings: ComputeRSettings, reporter: Reporter = SILENT) -> ComputeRResult:
    """Choose R from a latency and an accuracy profile; write the report and its plot.

    A profile not given is the newest in ``settings.output_dir`` that matches the other
    (the reporter is told which).

    Raises:
        PomtError: missing, corrupt or mismatched profiles; an infeasible criterion.
    """
    s = settings
    check_output_dir(s.output_dir)
    latency, accuracy = s.latency, s.accuracy
    if latency is None and not find_profiles(s.output_dir, "latency"):
        _refuse_interrupted_only(s.output_dir)
    if latency is None or accuracy is None:
        found_latency, found_accuracy = find_profile_pair(s.output_dir, latency, accuracy)
        for label, given, path in (("latency", latency, found_latency), ("accuracy", accuracy, found_accuracy)):
            if given is None:
                reporter.note(f"{label} profile: {path} (the newest in {s.output_dir} that matches)")
        latency, accuracy = found_latency, found_accuracy
    selection = select_r(latency, accuracy, s.selection, s.batch_sizes)
    if s.command is not None:
        selection = replace(selection, report=selection.report.model_copy(update={"command": s.command}))
    report = selection.report
    stem = report_stem(report)
    with OutputSet(s.output_dir, stem, ("json", "png")) as files:
        files.write("json", lambda tmp: write_report(report, tmp))
        files.write("png", lambda tmp: plot_selection(selection.curves, report, tmp, title=plot_title(report)))
        paths = files.commit()
    return ComputeRResult(selection=selection, latency=Path(latency), accuracy=Path(accuracy),
                          report=paths["json"], plot=paths["png"])


def _refuse_interrupted_only(folder: Path) -> None:
    """Refuse a folder whose only latency profiles were interrupted (compute-r looks past them).

    Raises:
        PomtError: ``folder`` holds interrupted latency profiles and no complete one.
    """
    interrupted = interrupted_profiles(folder)
    if interrupted:
        shown = ", ".join(map(str, interrupted[:2])) + (f" and {len(interrupted) - 2} more" if len(interrupted) > 2
                                                        else "")
        raise PomtError(f"the only latency profile(s) in {folder} (--output-dir) were interrupted: {shown}: finish "
                        "one with the pomt profile command it was started with plus --resume FILE, or give "
                        "--latency FILE to choose from its points")


def report_stem(report: Report) -> str:
    """The file stem of a compute-r report: what it was chosen from, so that different inputs never share it.

    The latency profile's device, batch sizes, dtype, input size, runtime and CUDA graphs
    (as its own name has them); the POMT layers the choice was made among
    (``pomt-layer3``, ``pomt-layers3-6``); and, for the proxy workload, an accuracy
    estimator other than the default ``random`` (``acc-topk``).
    """
    source = report.latency
    estimator = report.accuracy.estimator
    return output_stem(
        "compute_r", report.model, device=source.device_preset, batch_size=[c.batch_size for c in report.choices],
        dtype=source.dtype, img_size=source.img_size_option,
        extra=(*((layers_part("pomt", report.layers),) if report.layers else ()),
               *(() if report.runtime == Runtime.eager.value else (report.runtime,)),
               *(("cudagraphs",) if source.timing_mode == "cuda_graphs" else ()),
               *((f"acc-{estimator}",) if report.workload == "proxy" and estimator not in (None, RANDOM) else ())))


def plot_title(report: Report) -> str:
    """The title of a report's figure (compute-r's and refine's)."""
    device = report.latency.device_display_name or report.latency.device_preset or "unknown device"
    return (f"{report.model}, latency on {device} ({report.latency.dtype}), "
            f"accuracy estimator: {report.accuracy.estimator or '?'}")
