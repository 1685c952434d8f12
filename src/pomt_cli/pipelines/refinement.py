"""The ``pomt refine`` pipeline: compute-r's best candidates measured beside the unpruned model; R chosen again."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from pydantic import Field

from pomt_cli.bench import BASELINE, BenchTiming, fit_settings, time_methods
from pomt_cli.defaults import ROUND_BUDGET_S, ROUNDS
from pomt_cli.devices.clocks import ClockRestoreError, locked_clocks
from pomt_cli.devices.torch_device import set_cpu_threads
from pomt_cli.errors import PomtError
from pomt_cli.formats.bench import MethodSetting
from pomt_cli.formats.common import GEOMETRY_FIELDS
from pomt_cli.formats.latency import LatencyMeta, read_latency
from pomt_cli.formats.outputs import check_output_dir, write_error, write_set
from pomt_cli.formats.report import (
    REPORT_FORMAT_VERSION,
    Choice,
    RefinedSetting,
    RefineRecord,
    Report,
    read_report,
    sha256_file,
    write_report,
)
from pomt_cli.measure.ratio import paired_ratio
from pomt_cli.measure.runtimes import Runtime
from pomt_cli.models import create_model
from pomt_cli.options import SEED_MAX, Dtype
from pomt_cli.pipelines.choice import plot_title
from pomt_cli.pipelines.common import (
    SILENT,
    Reporter,
    RuntimeSettings,
    Settings,
    preset_and_device,
    raise_unrestored,
    recorded_command,
)
from pomt_cli.plots import plot_selection
from pomt_cli.pruning import pomt
from pomt_cli.selection import REFINE_CANDIDATES, Rechoice, SelectionSettings, rechoose, refine_candidates
from pomt_cli.selection import compute_r as select_r

class RefineSettings(Settings):
    """The settings of ``pomt refine``: the report, and how long to measure each setting."""

    report: Path
    candidates: int = Field(REFINE_CANDIDATES, ge=1, description="pruned candidates per batch size")
    budget_s: float = Field(ROUND_BUDGET_S, gt=0, description="seconds per setting and round")
    rounds: int = Field(ROUNDS, ge=1)
    device: str | None = Field(None, description="a preset name or .toml file (default: the profile's)")
    torch_device: str | None = Field(None, description="default: the profile's torch device")
    lock_clocks: bool = True
    threads: int | None = Field(None, ge=1, description="default: the profile's thread count")
    seed: int = Field(0, ge=0, le=SEED_MAX)


@dataclass(frozen=True)
class RefineResult:
    """The refined report, compute-r's choices before it, each batch size's measurement, the files."""

    report: Report
    before: list[Choice]
    rechoices: dict[int, Rechoice]
    path: Path
    plot: Path | None


def _check_inputs(report: Report, path: Path) -> tuple[Path, Path]:
    """The report's profiles, checked to exist and to be unchanged since compute-r read them.

    Raises:
        PomtError: a proxy report; a profile missing or changed.
    """
    if report.workload != "pomt":
        raise PomtError(
            f"{path} chose R from the all-blocks proxy, but refine measures the POMT-patched model: profile with "
            "--method pomt --layer L, estimate accuracy with --estimator pomt --layer L, and run compute-r again")
    files = []
    for record in (report.latency, report.accuracy):
        profile_path = Path(record.path)
        if not profile_path.is_file():
            raise PomtError(f"the {record.kind} profile {profile_path} that compute-r read is missing: "
                            f"run pomt compute-r again")
        if sha256_file(profile_path) != record.sha256:
            raise PomtError(f"the {record.kind} profile {profile_path} changed since compute-r wrote {path}: "
                            "run pomt compute-r again")
        files.append(profile_path)
    return files[0], files[1]


def _check_geometry(report: Report, path: Path, meta: LatencyMeta, latency_path: Path) -> None:
    """Check that the report describes the model of the latency profile it names.

    Raises:
        PomtError: the model or its token geometry differs (the report was edited).
    """
    for field in GEOMETRY_FIELDS:
        if getattr(report, field) != getattr(meta, field):
            raise PomtError(f"{path} has {field} {getattr(report, field)}, but the latency profile it names "
                            f"({latency_path}) has {getattr(meta, field)}: the report is damaged; run pomt "
                            "compute-r again")


def refine(settings: RefineSettings, reporter: Reporter = SILENT) -> RefineResult:
    """Measure compute-r's best candidates beside the unpruned model on the device; choose again; rewrite the report.

    The model, dtype, batch sizes, runtime and device come from the latency profile that
    the report names. Per batch size the unpruned model and the best pruned candidates are
    timed in interleaved rounds (:func:`pomt_cli.bench.time_methods`); each choice is made
    again with the refined ratios (:func:`pomt_cli.selection.rechoose`) and the report (and
    its plot, when compute-r wrote one beside it) is rewritten as one set.

    Raises:
        PomtError: a missing or wrong report, a proxy report, profiles missing or changed,
            a device or runtime this machine lacks.
    """
    s = settings
    began = time.perf_counter()
    path = Path(s.report)
    report = read_report(path)
    latency_path, accuracy_path = _check_inputs(report, path)
    check_output_dir(path.parent)
    _, meta = read_latency(latency_path)
    _check_geometry(report, path, meta, latency_path)
    preset, tdev = preset_and_device(s.device or meta.device_preset, s.torch_device or meta.torch_device)
    info = meta.runtime_info or {}
    runtime = RuntimeSettings(runtime=Runtime(meta.runtime), ort_providers=info.get("providers"),
                               compile_backend=info.get("compile_backend") or "inductor")
    cuda_graphs = meta.timing_mode == "cuda_graphs"
    dtype = Dtype(meta.dtype)
    runtime.checked_runtime(tdev, dtype.torch, cuda_graphs)
    criterion = SelectionSettings(criterion=report.criterion, alpha=report.alpha,
                                  latency_budget_ms=report.latency_budget_ms,
                                  max_accuracy_drop=report.max_accuracy_drop)
    sizes = [c.batch_size for c in report.choices]
    selection = select_r(latency_path, accuracy_path, criterion, sizes)
    candidates = {b: refine_candidates(selection.curves[b], criterion, b, s.candidates) for b in sizes}

    set_cpu_threads(s.threads or meta.num_threads,
                    source="--threads" if s.threads else f"the thread count of {latency_path}")
    net = create_model(meta.model, pretrained=meta.pretrained, checkpoint=meta.checkpoint,
                       img_size=meta.img_size_option)
    planned = {b: fit_settings(net, [MethodSetting(method=BASELINE),
                                     *(MethodSetting(method=pomt.Pomt.name, r=row["R"], layer=row["layer"])
                                       for row in candidates[b].iter_rows(named=True))]) for b in sizes}
    net = net.to(device=tdev, dtype=dtype.torch)
    timing = BenchTiming(dtype=dtype.torch, cuda_graphs=cuda_graphs, rel_precision=meta.rel_precision or 0.01,
                         budget_s=s.budget_s, min_samples=meta.min_samples or 10, warmup=meta.warmup or 3,
                         rounds=s.rounds, seed=s.seed, runtime=runtime.runtime,
                         runtime_options=runtime.runtime_options(cuda_graphs))
    unrestored = None
    try:
        with locked_clocks(preset, torch_device=tdev, enabled=s.lock_clocks) as clocks:
            timed = time_methods(net, planned, timing, device=tdev, on_progress=reporter.timing)
    except ClockRestoreError as exc:  # the timing finished: the report is rewritten, then this raised
        unrestored = exc

    rechoices: dict[int, Rechoice] = {}
    table: list[RefinedSetting] = []
    notes = [n for n in selection.report.notes if ": pruning does not pay here" not in n]
    for b in sizes:
        rows = []
        unpruned_m, _ = timed[(b, BASELINE)]
        for setting in planned[b]:
            m, _ = timed[(b, setting.label)]
            if m.median_ms is None:
                raise PomtError(f"{setting.label} at batch {b} did not run ({m.error or m.status}): "
                                "refine needs every setting measured; free the device and try again")
            pruned = setting.method != BASELINE
            ratio = paired_ratio(m, unpruned_m) if pruned else None
            rows.append({"layer": setting.layer if pruned else None, "tokens": meta.num_tokens - (setting.r if pruned
                                                                                                  else 0),
                         "R": setting.r if pruned else 0, "ms": m.median_ms, "ci_low_ms": m.ci_low_ms,
                         "ci_high_ms": m.ci_high_ms, "samples": m.samples,
                         "ratio_low": ratio.low if ratio else None, "ratio_high": ratio.high if ratio else None})
        measured = pl.DataFrame(rows, schema={"layer": pl.Int64, "tokens": pl.Int64, "R": pl.Int64, "ms": pl.Float64,
                                              "ci_low_ms": pl.Float64, "ci_high_ms": pl.Float64,
                                              "samples": pl.Int64, "ratio_low": pl.Float64,
                                              "ratio_high": pl.Float64})
        again = rechoose(selection.curves[b], selection.points[b], measured, criterion, b, meta.num_tokens)
        rechoices[b] = again
        if not again.pays:
            notes.append(f"batch {b}: pruning does not pay here: measured side by side, no candidate is faster than "
                         "the unpruned model beyond the interval of its ratio, so R = 0")
        for row in again.table.iter_rows(named=True):
            if row["R"] == 0:
                row.update(layer=None, setting=BASELINE)
            else:
                row["setting"] = MethodSetting(method=pomt.Pomt.name, r=row["R"], layer=row["layer"]).label
            table.append(RefinedSetting(batch_size=b, **row))

    before = report.refine.before if report.refine is not None else report.choices
    choices = [rechoices[b].choice for b in sizes]
    first = choices[0]
    record = RefineRecord(
        candidates=s.candidates, candidates_measured={str(b): candidates[b].height for b in sizes},
        budget_s=s.budget_s, rounds=s.rounds, seed=s.seed, elapsed_s=time.perf_counter() - began,
        torch_device=str(tdev), num_threads=torch.get_num_threads(), clocks=clocks.mode, settings=table,
        before=before, **recorded_command(s.command))
    refined = report.model_copy(update={
        "format_version": REPORT_FORMAT_VERSION, "choices": choices, "R": first.R, "tokens": first.tokens,
        "batch_size": first.batch_size, "layer": first.layer, "notes": notes, "refine": record})
    plot = path.with_suffix(".png") if path.suffix == ".json" else None
    if plot is not None and not plot.is_file():
        plot = None
    if path.suffix:  # as one set, under the names' lock: the next run removes what a kill left
        writers = {path.suffix[1:]: lambda tmp: write_report(refined, tmp)}
        if plot is not None:
            writers["png"] = lambda tmp: plot_selection(selection.curves, refined, tmp, title=plot_title(refined))
        write_set(path.parent, path.stem, writers)
    else:
        try:
            write_report(refined, path)
        except OSError as exc:
            raise write_error(path, exc) from None
    raise_unrestored(unrestored, "the refined report is written", path)
    return RefineResult(report=refined, before=before, rechoices=rechoices, path=path, plot=plot)
