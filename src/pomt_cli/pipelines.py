"""The pipelines: profile, estimate_accuracy, compute_r, refine, bench and demo; typed settings in, typed results out.

Each pipeline is the one place that sequences the layers below it (models, measurement,
accuracy, selection, file formats) for one command. It takes a pydantic settings object,
returns a result that names every file it wrote, reports progress through a
:class:`Reporter` and never prints. Bad settings raise :class:`~pomt_cli.errors.PomtError`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field

from pomt_cli import digits
from pomt_cli.accuracy.evaluate import AccuracyRun, EstimateConfig, EvalProgress, run_estimate, write_accuracy
from pomt_cli.accuracy.distributed import processes
from pomt_cli.bench import (
    BASELINE,
    BenchPlan,
    BenchProgress,
    BenchTiming,
    Prediction,
    accuracy_of_methods,
    fit_settings,
    reference_runtime,
    runtimes_frame,
    time_methods,
    time_runtimes,
)
from pomt_cli.formats.bench import BenchMeta, MethodSetting, write_bench
from pomt_cli.accuracy.data import ClassOrder, load_labelled
from pomt_cli.formats.latency import ClockState
from pomt_cli.devices.presets import DevicePreset, default_preset_name, load_preset
from pomt_cli.devices.torch_device import device_name, resolve_torch_device, short_device_name
from pomt_cli.devices.clocks import ClockRestoreError, locked_clocks
from pomt_cli.errors import PomtError
from pomt_cli.measure.grid import GridProgress, LatencySettings
from pomt_cli.measure.runtimes import Runtime, RuntimeOptions, check_runtime, runtime_info
from pomt_cli.formats.latency import LatencyMeta, Workload, resume_rows
from pomt_cli.measure.steps import find_curve_steps
from pomt_cli.measure.workload import check_workload, profile_latency
from pomt_cli.models import DEFAULT_MODEL, create_model, state_dict_sha256, vit_geometry, weights_source
from pomt_cli.options import DTYPES, SEED_MAX, Dtype, TokenRange, check_layers, token_grid
from pomt_cli.formats.outputs import OutputSet, atomic_write_text, check_output_dir, output_stem, write_error
from pomt_cli.plots import plot_latency, plot_selection
from pomt_cli.formats.lookup import find_profile_pair
from pomt_cli.formats.common import write_profile
from pomt_cli.pruning import method_names, pomt
from pomt_cli.pruning.geometry import TokenGeometry
from pomt_cli.pruning.registry import get as get_method
from pomt_cli.report import SUMMARY_TITLE, summary_page
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
from pomt_cli.formats.latency import read_latency
from pomt_cli.selection import REFINE_CANDIDATES, Rechoice, Selection, SelectionSettings, rechoose, refine_candidates
from pomt_cli.selection import compute_r as select_r

#: Seconds of timing at most, the same default in profile (per grid point) and bench (per method and round).
BUDGET_S = 1.0
#: POMT's pruning block when neither the settings nor a report give one.
DEFAULT_LAYER = 3
#: Seconds between two checkpoints of an unfinished profile.
CHECKPOINT_EVERY_S = 1.0


class Reporter:
    """What a pipeline tells its caller while it runs; every method does nothing here.

    The CLI subclasses it to draw progress bars and print lines; a library caller passes
    nothing (silence) or its own subclass.
    """

    def note(self, text: str) -> None:
        """A line worth showing: which file was found, that nothing was left to measure."""

    def grid(self, event: GridProgress) -> None:
        """A profile's point started (``event.frame`` None) or finished."""

    def interrupted(self, saved: int, path: Path) -> None:
        """A profile stopped early; ``saved`` points are kept in ``path`` for ``--resume``."""

    def decoding(self, done: int, total: int) -> None:
        """Images decoded so far by this process."""

    def evaluating(self, event: EvalProgress) -> None:
        """Accuracy grid points evaluated so far."""

    def timing(self, event: BenchProgress) -> None:
        """One bench method timed in one round."""

    def scoring(self, done: int, total: int) -> None:
        """Bench settings whose accuracy was evaluated so far."""

    def step(self, title: str, args: Sequence[str]) -> None:
        """The demo starts a step: what it does, and the ``pomt`` command line it equals."""

    def finished(self, result: object) -> None:
        """The demo finished a step with this result."""


_SILENT = Reporter()


class _Settings(BaseModel):
    model_config = ConfigDict(protected_namespaces=(), frozen=True)

    command: str | None = Field(None, description="the command line recorded in the files (default: this process's)")


def _command(command: str | None) -> dict:
    return {} if command is None else {"command": command}


def _preset_and_device(device: str | None, torch_device: str | None) -> tuple[DevicePreset, torch.device]:
    preset = load_preset(device or default_preset_name())
    return preset, resolve_torch_device(torch_device or preset.torch_device)


class _RuntimeSettings(_Settings):
    """What runs the timed forward passes (``--runtime``, ``--ort-providers``, ``--compile-backend``)."""

    runtime: Runtime = Runtime.eager
    ort_providers: list[str] | None = Field(None, description="ONNX Runtime's providers (None: those available)")
    compile_backend: str = Field("inductor", description="torch.compile's backend")

    def runtime_options(self, cuda_graphs: bool) -> RuntimeOptions:
        providers = None if self.ort_providers is None else tuple(self.ort_providers)
        return RuntimeOptions(providers=providers, compile_backend=self.compile_backend, cuda_graphs=cuda_graphs)

    def checked_runtime(self, device: torch.device, dtype: torch.dtype, cuda_graphs: bool,
                        runtime: Runtime | None = None) -> dict:
        """The record of ``runtime`` (default: ``self.runtime``) for the metadata, once it is checked to run
        here as asked.

        Raises:
            PomtError: CUDA graphs with compile or onnxruntime, a missing extra, a
                provider not available here, a dtype the runtime cannot take.
        """
        runtime = self.runtime if runtime is None else Runtime(runtime)
        options = self.runtime_options(cuda_graphs)
        check_runtime(runtime, device=device, dtype=dtype, options=options)
        return runtime_info(runtime, options, device=device)

    def runtime_slug(self, runtimes: Sequence[Runtime] | None = None) -> tuple[str, ...]:
        """The runtimes' part of a file name (default: ``self.runtime``), in the order given.

        One runtime: its name, none for eager (eager's names stay as they were). Several:
        every name, eager's too, so that ``eager,onnxruntime`` and ``onnxruntime`` differ.
        """
        runtimes = [self.runtime] if runtimes is None else [Runtime(r) for r in runtimes]
        if len(runtimes) > 1:
            return tuple(r.value for r in runtimes)
        return tuple(r.value for r in runtimes if r is not Runtime.eager)


class ProfileSettings(_RuntimeSettings):
    """The settings of one latency profile (``pomt profile``)."""

    model: str = DEFAULT_MODEL
    device: str | None = Field(None, description="a preset name or .toml file (default: nvidia with CUDA, else cpu)")
    torch_device: str | None = Field(None, description="overrides the preset's torch device")
    batch_sizes: list[int] = Field([1], min_length=1)
    dtype: Dtype = Dtype.float32
    tokens: TokenRange | None = None
    pretrained: bool = False
    checkpoint: Path | None = None
    img_size: int | None = None
    cuda_graphs: bool = False
    rel_precision: float = Field(0.01, gt=0, lt=1)
    budget_s: float = Field(BUDGET_S, gt=0, description="seconds per grid point")
    min_samples: int = Field(10, ge=1)
    warmup: int = Field(3, ge=0)
    passes: int = Field(2, ge=1)
    remeasure: int = Field(2, ge=0)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    workload: Workload = "proxy"
    layers: list[int] | None = Field(None, description="POMT's blocks with workload pomt (default [3])")
    threads: int | None = Field(None, ge=1)
    lock_clocks: bool = True
    output_dir: Path = Path("runs")
    resume: Path | None = None
    top_steps: int = Field(8, ge=1)


@dataclass(frozen=True)
class ProfileResult:
    """A latency profile, its largest steps and the files written (``profile``: Parquet, ``plot``: PNG)."""

    frame: pl.DataFrame
    meta: LatencyMeta
    steps: pl.DataFrame
    profile: Path
    plot: Path
    resumed_complete: bool = False


class _Checkpoints:
    """Writes an unfinished profile to its Parquet file at most every :data:`CHECKPOINT_EVERY_S`."""

    def __init__(self, path: Path, meta: LatencyMeta, earlier_s: float) -> None:
        self.path, self.meta, self.earlier_s = path, meta, earlier_s
        self.began = time.perf_counter()
        self.frame: pl.DataFrame | None = None
        self.written_at = 0.0
        self.written = True

    def elapsed_s(self) -> float:
        return self.earlier_s + time.perf_counter() - self.began

    def update(self, frame: pl.DataFrame, force: bool = False) -> None:
        self.frame, self.written = frame, False
        if force or time.perf_counter() - self.written_at >= CHECKPOINT_EVERY_S:
            partial = self.meta.model_copy(update={"complete": False, "elapsed_s": self.elapsed_s()})
            try:
                write_profile(self.path, frame, partial)
            except (OSError, pl.exceptions.PolarsError) as exc:
                raise write_error(self.path, exc) from None
            self.written_at, self.written = time.perf_counter(), True

    def flush(self) -> None:
        """Write the points not yet written (after an interruption)."""
        if self.frame is not None and not self.written:
            self.update(self.frame, force=True)


def profile(settings: ProfileSettings, reporter: Reporter = _SILENT) -> ProfileResult:
    """Measure latency against kept tokens n, checkpointing as it goes; write the profile and its plot.

    With ``settings.resume`` the finished points of that profile are kept and the rest measured.

    Raises:
        PomtError: bad settings, model or device; a resume file of another run.
    """
    s = settings
    preset, tdev = _preset_and_device(s.device, s.torch_device)
    info = s.checked_runtime(tdev, s.dtype.torch, s.cuda_graphs)
    if s.cuda_graphs and tdev.type != "cuda":
        raise PomtError(f"--cuda-graphs needs a CUDA device, but the torch device is {tdev}: "
                        "leave it out or use --torch-device cuda")
    if s.layers is not None and s.workload != "pomt":
        raise PomtError(f"--layer applies to --method pomt only; the {s.workload} workload has no layer: "
                        "leave out --layer or add --method pomt")
    layers = (s.layers or [DEFAULT_LAYER]) if s.workload == "pomt" else None
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    net = create_model(s.model, pretrained=s.pretrained, checkpoint=s.checkpoint, img_size=s.img_size)
    g = vit_geometry(net)
    if layers is not None:
        check_layers(layers, g.num_blocks, s.model)
    grid = token_grid(s.tokens, g.num_tokens, g.num_prefix)
    dtype = s.dtype.value
    latency = LatencySettings(
        batch_sizes=s.batch_sizes, grid=grid, dtype=dtype, cuda_graphs=s.cuda_graphs, rel_precision=s.rel_precision,
        budget_s=s.budget_s, min_samples=s.min_samples, warmup=s.warmup, seed=s.seed, remeasure_rounds=s.remeasure,
        passes=s.passes, workload=s.workload, layers=layers, runtime=s.runtime, ort_providers=s.ort_providers,
        compile_backend=s.compile_backend,
    )
    meta = LatencyMeta(
        model=s.model, num_tokens=g.num_tokens, num_prefix=g.num_prefix, num_blocks=g.num_blocks,
        embed_dim=g.embed_dim, dtype=dtype, grid=grid, batch_sizes=s.batch_sizes,
        img_size=list(g.input_size[1:]), img_size_option=s.img_size,
        timing_mode=latency.timing_mode, device_preset=preset.name, device_display_name=preset.display_name,
        device_name=device_name(tdev), torch_device=str(tdev),
        clocks=ClockState(preset=preset.name, mode="unlocked", detail="not started"),
        clocks_locked=s.lock_clocks, pretrained=s.pretrained, checkpoint=str(s.checkpoint) if s.checkpoint else None,
        rel_precision=s.rel_precision, budget_s=s.budget_s, min_samples=s.min_samples, warmup=s.warmup, seed=s.seed,
        remeasure_rounds=s.remeasure, passes=s.passes, workload=s.workload, layers=layers, runtime=s.runtime.value,
        runtime_info=info, **_command(s.command),
    )
    previous = previous_meta = None
    if s.resume is not None:
        previous, previous_meta = resume_rows(s.resume, meta)
    workload_slug = () if layers is None else ("pomt-layers" + "-".join(map(str, layers)),)
    stem = output_stem("latency", s.model, device=preset.name, batch_size=s.batch_sizes, dtype=dtype,
                       img_size=s.img_size,
                       extra=(*workload_slug, *s.runtime_slug(), *(("cudagraphs",) if s.cuda_graphs else ())))
    complete = previous_meta is not None and previous_meta.complete
    if not complete:
        check_workload(net, latency, device=tdev)  # a graph that does not compile or export: before any file
    # The set claims the names for the whole run: the checkpoints of an unfinished profile
    # go to its parquet, which --resume reads; the final profile and plot land together.
    with OutputSet(s.output_dir, stem, ("parquet", "png")) as files:
        parquet, png = files.path("parquet"), files.path("png")
        if complete:
            frame, meta, unrestored = previous, previous_meta, None
            reporter.note(f"{s.resume} is complete: nothing to measure")
        else:
            frame, meta, unrestored = _measure(net, latency, tdev, preset, s.lock_clocks, meta, previous,
                                               previous_meta, parquet, reporter)
        steps = find_curve_steps(frame, top=s.top_steps)
        title = (f"{s.model}, {meta.device_display_name} ({short_device_name(meta.device_name)}), {dtype}, "
                 f"{'CUDA graphs' if s.cuda_graphs else s.runtime.value}, "
                 + ("every block at n (proxy)" if layers is None else "POMT-patched model"))
        files.write("parquet", lambda tmp: write_profile(tmp, frame, meta))
        files.write("png", lambda tmp: plot_latency(frame, tmp, title=title, steps=steps))
        files.commit()
    _raise_unrestored(unrestored, "the profile is complete", parquet)
    return ProfileResult(frame=frame, meta=meta, steps=steps, profile=parquet, plot=png, resumed_complete=complete)


def _unrestored_state(clocks: ClockState) -> ClockState:
    return clocks.model_copy(update={"detail": "locked for the measurement; restoring them after failed"})


def _raise_unrestored(error: ClockRestoreError | None, what: str, path: Path) -> None:
    """Raise a clock restore that failed after the measurement, once its files are written."""
    if error is not None:
        raise ClockRestoreError(f"{error} ({what}: {path})") from None


def _measure(net: torch.nn.Module, settings: LatencySettings, tdev: torch.device, preset: DevicePreset,
             lock_clocks: bool, meta: LatencyMeta, previous: pl.DataFrame | None, previous_meta: LatencyMeta | None,
             parquet: Path, reporter: Reporter) -> tuple[pl.DataFrame, LatencyMeta, ClockRestoreError | None]:
    """Run the grid with clocks locked and checkpoints; the frame, the final metadata and a failed restore."""
    saved = _Checkpoints(parquet, meta, previous_meta.elapsed_s if previous_meta else 0.0)
    resumed = previous.height if previous is not None else 0

    def on_progress(event: GridProgress) -> None:
        reporter.grid(event)
        if event.frame is not None:
            saved.update(event.frame)

    unrestored = None
    try:
        try:
            with locked_clocks(preset, torch_device=tdev, enabled=lock_clocks) as clocks:
                saved.meta = meta.model_copy(update={"clocks": clocks, "clocks_locked": clocks.locked,
                                                     "resumed_rows": resumed})
                frame = profile_latency(net, settings, device=tdev, previous=previous, progress=on_progress)
        except ClockRestoreError as exc:  # every point was measured: the profile is written, then this raised
            unrestored = exc
            saved.meta = saved.meta.model_copy(update={"clocks": _unrestored_state(saved.meta.clocks)})
    except BaseException:
        saved.flush()
        if saved.frame is not None:
            reporter.interrupted(saved.frame.height, parquet)
        raise
    received = pomt.received_path(tdev, DTYPES[settings.dtype]) if settings.workload == "pomt" else None
    return frame, saved.meta.model_copy(update={"complete": True, "elapsed_s": saved.elapsed_s(),
                                                "pomt_received": received}), unrestored


class AccuracySettings(_Settings):
    """The settings of one accuracy profile (``pomt estimate-accuracy``): the estimate and where it runs."""

    estimate: EstimateConfig
    torch_device: str = Field("auto", description="auto, cpu, cuda, mps; under torchrun each rank its GPU")
    output_dir: Path = Path("runs")


@dataclass(frozen=True)
class AccuracyResult:
    """An accuracy profile and the files written (``profile``: Parquet, ``plot``: PNG)."""

    run: AccuracyRun
    world_size: int
    profile: Path
    plot: Path


def estimate_accuracy(settings: AccuracySettings, reporter: Reporter = _SILENT) -> AccuracyResult | None:
    """Estimate accuracy against kept tokens on labelled images, alone or under torchrun.

    Returns None in every process of a torchrun group but the first, which writes the files.

    Raises:
        PomtError: bad settings, data or weights.
    """
    check_output_dir(settings.output_dir)
    config = settings.estimate
    if settings.command is not None and config.command is None:
        config = config.model_copy(update={"command": settings.command})
    with processes(settings.torch_device) as procs:
        heard = reporter if procs.is_main else _SILENT
        run = run_estimate(config, procs, on_decode=heard.decoding, on_progress=heard.evaluating)
        if not procs.is_main:
            return None
        parquet, png = write_accuracy(run, settings.output_dir)
        return AccuracyResult(run=run, world_size=procs.world_size, profile=parquet, plot=png)


class ComputeRSettings(_Settings):
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


def compute_r(settings: ComputeRSettings, reporter: Reporter = _SILENT) -> ComputeRResult:
    """Choose R from a latency and an accuracy profile; write the report and its plot.

    A profile not given is the newest in ``settings.output_dir`` that matches the other
    (the reporter is told which).

    Raises:
        PomtError: missing, corrupt or mismatched profiles; an infeasible criterion.
    """
    s = settings
    check_output_dir(s.output_dir)
    latency, accuracy = s.latency, s.accuracy
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
    # A profile at another input size, of another runtime than eager or of CUDA graph replays
    # gets its own report, as the profile its own file.
    source = report.latency
    stem = output_stem("compute_r", report.model, device=source.device_preset,
                       batch_size=[c.batch_size for c in report.choices], dtype=source.dtype,
                       img_size=source.img_size_option,
                       extra=(*(() if report.runtime == Runtime.eager.value else (report.runtime,)),
                              *(("cudagraphs",) if source.timing_mode == "cuda_graphs" else ())))
    with OutputSet(s.output_dir, stem, ("json", "png")) as files:
        files.write("json", lambda tmp: write_report(report, tmp))
        files.write("png", lambda tmp: plot_selection(selection.curves, report, tmp, title=_plot_title(report)))
        paths = files.commit()
    return ComputeRResult(selection=selection, latency=Path(latency), accuracy=Path(accuracy),
                          report=paths["json"], plot=paths["png"])


def _plot_title(report: Report) -> str:
    device = report.latency.device_display_name or report.latency.device_preset or "unknown device"
    return (f"{report.model}, latency on {device} ({report.latency.dtype}), "
            f"accuracy estimator: {report.accuracy.estimator or '?'}")


class RefineSettings(_Settings):
    """The settings of ``pomt refine``: the report, and how long to measure each setting."""

    report: Path
    candidates: int = Field(REFINE_CANDIDATES, ge=1, description="pruned candidates per batch size")
    budget_s: float = Field(BUDGET_S, gt=0, description="seconds per setting and round")
    rounds: int = Field(3, ge=1)
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


def refine(settings: RefineSettings, reporter: Reporter = _SILENT) -> RefineResult:
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
    preset, tdev = _preset_and_device(s.device or meta.device_preset, s.torch_device or meta.torch_device)
    info = meta.runtime_info or {}
    runtime = _RuntimeSettings(runtime=Runtime(meta.runtime), ort_providers=info.get("providers"),
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

    torch.set_num_threads(s.threads or meta.num_threads)
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
        for setting in planned[b]:
            m, _ = timed[(b, setting.label)]
            if m.median_ms is None:
                raise PomtError(f"{setting.label} at batch {b} did not run ({m.error or m.status}): "
                                "refine needs every setting measured; free the device and try again")
            pruned = setting.method != BASELINE
            rows.append({"layer": setting.layer if pruned else None, "tokens": meta.num_tokens - (setting.r if pruned
                                                                                                  else 0),
                         "R": setting.r if pruned else 0, "ms": m.median_ms, "ci_low_ms": m.ci_low_ms,
                         "ci_high_ms": m.ci_high_ms, "samples": m.samples})
        measured = pl.DataFrame(rows, schema={"layer": pl.Int64, "tokens": pl.Int64, "R": pl.Int64, "ms": pl.Float64,
                                              "ci_low_ms": pl.Float64, "ci_high_ms": pl.Float64,
                                              "samples": pl.Int64})
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
        before=before, **_command(s.command))
    refined = report.model_copy(update={
        "format_version": REPORT_FORMAT_VERSION, "choices": choices, "R": first.R, "tokens": first.tokens,
        "batch_size": first.batch_size, "layer": first.layer, "notes": notes, "refine": record})
    plot = path.with_suffix(".png") if path.suffix == ".json" else None
    if plot is not None and plot.is_file():
        with OutputSet(path.parent, path.stem, ("json", "png")) as files:
            files.write("json", lambda tmp: write_report(refined, tmp))
            files.write("png", lambda tmp: plot_selection(selection.curves, refined, tmp, title=_plot_title(refined)))
            files.commit()
    else:
        plot = None
        try:
            write_report(refined, path)
        except OSError as exc:
            raise write_error(path, exc) from None
    _raise_unrestored(unrestored, "the refined report is written", path)
    return RefineResult(report=refined, before=before, rechoices=rechoices, path=path, plot=plot)


class BenchSettings(_RuntimeSettings):
    """The settings of ``pomt bench``: the methods, their settings, the timing and the data.

    ``runtimes`` times several runtimes side by side in the same rounds; when empty,
    ``runtime`` alone runs.
    """

    runtimes: list[Runtime] = Field(default_factory=list, description="runtimes side by side (empty: runtime)")

    model: str = DEFAULT_MODEL
    methods: list[str] = Field(default_factory=list, description="default: every method, POMT when r is given")
    r: int | None = Field(None, description="POMT's R for every batch size")
    r_from: Path | None = Field(None, description="a compute-r report giving R (and the layer) per batch size")
    layer: int | None = None
    method_r: dict[str, int] = Field(default_factory=dict, description="r of methods that take one of their own")
    batch_sizes: list[int] | None = Field(None, min_length=1)
    device: str | None = None
    torch_device: str | None = None
    dtype: Dtype = Dtype.float32
    pretrained: bool = False
    checkpoint: Path | None = None
    allow_random_weights: bool = False
    img_size: int | None = None
    data: str | None = None
    limit: int | None = None
    class_order: ClassOrder | None = None
    eval_batch_size: int = Field(64, ge=1)
    cuda_graphs: bool = False
    rel_precision: float = Field(0.01, gt=0, lt=1)
    budget_s: float = Field(BUDGET_S, gt=0, description="seconds per method and round")
    rounds: int = Field(3, ge=1)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    threads: int | None = Field(None, ge=1)
    lock_clocks: bool = True
    output_dir: Path = Path("runs")

    def benched_runtimes(self) -> list[Runtime]:
        """The runtimes timed, in the order given.

        Raises:
            PomtError: a runtime named twice.
        """
        runtimes = list(self.runtimes) or [self.runtime]
        twice = next((r for i, r in enumerate(runtimes) if r in runtimes[:i]), None)
        if twice is not None:
            raise PomtError(f"--runtime names {twice.value} twice: give each runtime once")
        return runtimes


@dataclass(frozen=True)
class BenchResult:
    """A bench report and the files written (``csv`` and ``parquet``)."""

    frame: pl.DataFrame
    meta: BenchMeta
    plan: BenchPlan
    choices: dict[int, Choice]
    skipped: list[tuple[str, str]]
    r_from: Path | None
    csv: Path
    parquet: Path
    report_runtime: str | None = None
    #: The device the report's latency profile was measured on (its ``device_name``), where
    #: it is not this bench's: the predictions are that device's.
    report_device: str | None = None


def _from_report() -> list[str]:
    """The methods whose r comes from -r or --r-from (POMT's), with the layer from --layer or the report."""
    return [m for m in method_names() if get_method(m).bench_r is None]


def _r_per_batch(r: int | None, r_from: Path | None, report: Report | None, batch_sizes: list[int] | None,
                 runtimes: Sequence[Runtime] = (Runtime.eager,), compile_backend: str = "inductor"
                 ) -> tuple[dict[int, int] | None, list[int] | None, str | None]:
    """POMT's r for each batch size (from r or ``report``, read from ``r_from``), and the batch sizes to run.

    Raises:
        PomtError: a report whose latency was measured on none of ``runtimes`` (its steps
            belong to that runtime's kernels), or compiled by another backend than
            ``compile_backend``; a report that lacks a batch size asked for.
    """
    if report is None:
        return (None if r is None else {b: r for b in batch_sizes or [1]}), batch_sizes, None
    names = [Runtime(runtime).value for runtime in runtimes]
    if report.runtime not in names:
        given = ",".join(names)
        add = f"bench with --runtime {report.runtime}" if len(names) == 1 else f"add {report.runtime} to --runtime"
        raise PomtError(
            f"--r-from {r_from} chose R from a latency profile measured on {report.runtime}, but this bench runs "
            f"--runtime {given}: {add}, or profile with --runtime {names[0]} and run compute-r again")
    profiled = (report.latency.runtime_info or {}).get("compile_backend")
    if report.runtime == Runtime.compile.value and profiled and profiled != compile_backend:
        raise PomtError(
            f"--r-from {r_from} chose R from a latency profile compiled with backend {profiled}, but this bench "
            f"compiles with {compile_backend}: add --compile-backend {profiled}, or profile with --compile-backend "
            f"{compile_backend} and run compute-r again")
    chosen = {c.batch_size: c.R for c in report.choices}
    if batch_sizes is None:
        batch_sizes = sorted(chosen)
    missing = [b for b in batch_sizes if b not in chosen]
    if missing:
        raise PomtError(
            f"--r-from {r_from} gives R for batch size(s) {', '.join(map(str, sorted(chosen)))}, not for "
            f"{', '.join(map(str, missing))}: profile those batch sizes and run compute-r again, or give -r"
        )
    return chosen, batch_sizes, str(Path(r_from).resolve())


def _check_report_fits(r_from: Path, report: Report, geometry: TokenGeometry, dtype: str) -> None:
    """Refuse a report whose R cannot mean the same here: another token geometry or dtype.

    R counts tokens of the profiled model (N = ``report.num_tokens``): on a model built for
    another input size it keeps another n. The predicted ratio belongs to the latency
    profile's dtype, whose kernels differ from another dtype's.

    Raises:
        PomtError: the report's N or p differs from the model's, or its latency dtype from ``dtype``.
    """
    if (report.num_tokens, report.num_prefix) != (geometry.num_tokens, geometry.num_prefix):
        raise PomtError(
            f"--r-from {r_from} chose R for {report.model} with {report.num_tokens} tokens ({report.num_prefix} "
            f"prefix), but the model benched here has {geometry.num_tokens} ({geometry.num_prefix} prefix): give "
            "the --img-size its profiles were measured at, or profile this size and run compute-r again")
    if report.latency.dtype != dtype:
        raise PomtError(
            f"--r-from {r_from} chose R from a latency profile in {report.latency.dtype}, but this bench runs "
            f"--dtype {dtype}: bench with --dtype {report.latency.dtype}, or profile in {dtype} and run compute-r "
            "again (-r R --layer L benches a setting without predictions)")


def _layers_and_choices(r_from: Path | None, report: Report | None, layer: int | None, sizes: list[int],
                        num_blocks: int, model: str) -> tuple[dict[int, int], dict[int, Choice]]:
    """POMT's layer per batch size (the report's choice, else ``layer``, else 3), and the report's choices.

    Raises:
        PomtError: ``layer`` contradicts the layers a report chose, or a layer the model lacks.
    """
    choices = {}
    if report is not None:
        choices = {b: c for b in sizes if (c := report.choice_for(b)) is not None}
    layers = {}
    for b in sizes:
        chosen = choices[b].layer if b in choices else None
        if chosen is not None and layer is not None and layer != chosen:
            raise PomtError(f"--layer {layer} contradicts --r-from {r_from}, which chose layer {chosen} at batch {b}: "
                            "leave out --layer to bench the report's choice")
        layers[b] = chosen if chosen is not None else (layer if layer is not None else DEFAULT_LAYER)
        if not 0 <= layers[b] < num_blocks:
            source = f"--r-from {r_from} chose layer {chosen} at batch {b}" if chosen is not None else (
                f"--layer {layers[b]} is out of range")
            raise PomtError(f"{source}, but {model} has {num_blocks} blocks (layer 0..{num_blocks - 1}): "
                            + ("run compute-r with profiles of this model" if chosen is not None else
                               "give a layer in that range"))
    return layers, choices


def _predictions(settings: dict[int, list[MethodSetting]], choices: dict[int, Choice],
                 num_tokens: int) -> dict[tuple[int, str], Prediction]:
    """What the report predicts: the chosen POMT setting's ratio to the unpruned model (and the
    profile's ms), and the unpruned model's profile ms where it was measured (no ratio: the reference)."""
    predicted = {}
    for b, choice in choices.items():
        for s in settings[b]:
            if s.method in _from_report() and choice.ratio is not None:
                predicted[(b, s.label)] = Prediction(
                    profile_ms=choice.latency_ms, ratio=choice.ratio, low=choice.latency_ratio_low,
                    high=choice.latency_ratio_high, workload=choice.workload)
            elif s.method == BASELINE and choice.reference_ms is not None and choice.reference_tokens == num_tokens:
                predicted[(b, s.label)] = Prediction(profile_ms=choice.reference_ms, workload=choice.workload)
    return predicted


def bench(settings: BenchSettings, reporter: Reporter = _SILENT) -> BenchResult:
    """Time (and evaluate) the model unpruned and with each method, in interleaved rounds; write the report.

    Raises:
        PomtError: bad settings, a report of another model, a setting the model cannot take.
    """
    s = settings
    names, from_report = method_names(), _from_report()
    given_r = s.r is not None or s.r_from is not None
    defaults = [m for m in names if m not in from_report or given_r]
    methods = list(dict.fromkeys([BASELINE, *(s.methods or defaults)]))
    unknown = [m for m in methods if m not in names]
    if unknown:
        raise PomtError(f"unknown --method {unknown[0]!r}: use one of {', '.join(names)}")
    runtimes = s.benched_runtimes()
    if s.r is not None and s.r_from is not None:
        raise PomtError("give either -r or --r-from, not both")
    report = read_report(s.r_from, model=s.model) if s.r_from is not None else None
    r_by_batch, sizes, report_path = _r_per_batch(s.r, s.r_from, report, s.batch_sizes, runtimes,
                                                  s.compile_backend)
    sizes = sizes or [1]
    needing = [m for m in methods if m in from_report]
    if needing and r_by_batch is None:
        raise PomtError(f"--method {needing[0]} needs -r R or --r-from REPORT (from `pomt compute-r`)")
    if r_by_batch is not None:
        methods += [m for m in from_report if m not in methods]
    preset, tdev = _preset_and_device(s.device, s.torch_device)
    infos = {r.value: s.checked_runtime(tdev, s.dtype.torch, s.cuda_graphs, r) for r in runtimes}
    reference = reference_runtime(runtimes)
    if s.cuda_graphs and tdev.type != "cuda":
        raise PomtError(f"--cuda-graphs needs a CUDA device, but the torch device is {tdev}: leave it out")
    source = weights_source(s.model, pretrained=s.pretrained, checkpoint=s.checkpoint)
    if s.data is not None and source == "random" and not s.allow_random_weights:
        raise PomtError(f"{s.model} would have random weights, which make accuracy meaningless: give --pretrained or "
                        "--checkpoint PATH, leave out --data, or pass --allow-random-weights")
    check_output_dir(s.output_dir)
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    net = create_model(s.model, pretrained=s.pretrained, checkpoint=s.checkpoint, img_size=s.img_size)
    weights_sha = state_dict_sha256(net)
    g = vit_geometry(net)
    if report is not None:
        _check_report_fits(s.r_from, report, g, s.dtype.value)
    layers, choices = _layers_and_choices(s.r_from, report, s.layer, sizes, g.num_blocks, s.model)
    report_runtime = report.runtime if report is not None else None

    # POMT's r may differ per batch size: one setting per distinct r.
    planned: dict[int, list[MethodSetting]] = {}
    for b in sizes:
        chosen = []
        for m in methods:
            if m in from_report and b in choices and r_by_batch[b] == 0:
                continue  # the report's answer is the unpruned model: the baseline carries its prediction
            elif m in from_report:
                chosen.append(MethodSetting(method=m, r=r_by_batch[b], layer=layers[b]))
            else:
                chosen.append(MethodSetting(method=m, r=s.method_r.get(m, get_method(m).bench_r)))
        planned[b] = fit_settings(net, chosen)  # checked; ToMe's per-block cap shows in the labels
    plan = BenchPlan(settings=planned, predictions=_predictions(planned, choices, g.num_tokens))
    listing = labelled = None
    if s.data is not None:
        listing, labelled = load_labelled(s.data, net, limit=s.limit, class_order=s.class_order)

    net = net.to(device=tdev, dtype=s.dtype.torch)
    timing = BenchTiming(dtype=s.dtype.torch, cuda_graphs=s.cuda_graphs, rel_precision=s.rel_precision,
                         budget_s=s.budget_s, rounds=s.rounds, seed=s.seed, runtime=runtimes[0],
                         runtime_options=s.runtime_options(s.cuda_graphs))
    unrestored = None
    try:
        with locked_clocks(preset, torch_device=tdev, enabled=s.lock_clocks) as clocks:
            timed = time_runtimes(net, plan.settings, timing, runtimes, device=tdev, on_progress=reporter.timing)
    except ClockRestoreError as exc:  # the timing finished: the report is written, then this raised
        unrestored, clocks = exc, _unrestored_state(clocks)
    accuracy = None
    if labelled is not None:
        distinct = plan.distinct()
        reporter.scoring(0, len(distinct))
        done = iter(range(1, len(distinct) + 1))
        accuracy = accuracy_of_methods(net, distinct, labelled, batch_size=s.eval_batch_size, device=tdev,
                                       dtype=s.dtype.torch,
                                       on_done=lambda _: reporter.scoring(next(done), len(distinct)))
    frame = runtimes_frame(plan.settings, timed, runtimes, accuracy, plan.predictions,
                           predicted_runtime=Runtime(report_runtime) if report_runtime else None)
    meta = BenchMeta(
        model=s.model, num_tokens=g.num_tokens, num_prefix=g.num_prefix, img_size=list(g.input_size[1:]),
        img_size_option=s.img_size, num_blocks=g.num_blocks, dtype=s.dtype.value, batch_sizes=sizes, methods=methods,
        settings={str(b): group for b, group in plan.settings.items()}, r_from=report_path, weights=source,
        weights_file=str(Path(s.checkpoint).resolve()) if s.checkpoint else None, weights_sha256=weights_sha,
        data=listing.source if listing else None, num_images=len(labelled) if labelled else None, limit=s.limit,
        skipped_images=len(labelled.skipped) if labelled else None, device_preset=preset.name,
        device_display_name=preset.display_name, device_name=device_name(tdev), torch_device=str(tdev),
        clocks=clocks, timing_mode="cuda_graphs" if s.cuda_graphs else "eager", rel_precision=s.rel_precision,
        budget_s=s.budget_s, rounds=s.rounds, seed=s.seed, num_threads=torch.get_num_threads(),
        runtime=reference.value, runtime_info=infos[reference.value], runtimes=[r.value for r in runtimes],
        runtimes_info=infos, pomt_received=pomt.received_path(tdev, s.dtype.torch) if "pomt" in methods else None,
        **_command(s.command),
    )
    stem = output_stem("bench", s.model, device=preset.name, batch_size=sizes, dtype=s.dtype.value,
                       img_size=s.img_size,
                       extra=(*plan.slugs(), *s.runtime_slug(runtimes), *(["cudagraphs"] if s.cuda_graphs else [])))
    csv, parquet = write_bench(frame, meta, s.output_dir, stem)
    _raise_unrestored(unrestored, "the bench report is written", parquet)
    elsewhere = None
    if report is not None and report.latency.device_name and report.latency.device_name != meta.device_name:
        elsewhere = report.latency.device_name
    return BenchResult(frame=frame, meta=meta, plan=plan, choices=choices,
                       skipped=list(labelled.skipped) if labelled else [], r_from=s.r_from, csv=csv, parquet=parquet,
                       report_runtime=report_runtime, report_device=elsewhere)


#: Batch sizes profiled and benched: one image, and a batch that fills a CPU's cores.
DEMO_BATCH_SIZES = [1, 32]
#: POMT's pruning blocks profiled: every block of digits-vit; compute-r chooses among them.
DEMO_LAYERS = list(range(digits.ARCHITECTURE["depth"]))
#: The kept-token grid of both profiles: N = 65 down to 5 in steps of 4 (16 points per curve).
DEMO_TOKENS = TokenRange(start=65, stop=5, stride=4)
#: Seconds per profile point in the demo (refine: twice as long per setting and round; bench: four times
#: as long per method and round).
DEMO_BUDGET_S = 0.25


class DemoSettings(_Settings):
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


def demo(settings: DemoSettings, reporter: Reporter = _SILENT) -> DemoResult:
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
        "refine", str(chosen.report), "--candidates", str(REFINE_CANDIDATES), "--budget", f"{2 * s.budget_s:g}",
        "--rounds", "3", *common])
    refined = refine(RefineSettings(report=chosen.report, candidates=REFINE_CANDIDATES, budget_s=2 * s.budget_s,
                                    rounds=3, device=device, torch_device=s.torch_device, lock_clocks=s.lock_clocks,
                                    command=s.command), reporter)
    reporter.finished(refined)

    # ToMe and Top-K remove about as many tokens over all blocks as POMT does at once.
    report: Report = refined.report
    per_block = max(1, math.ceil(max(c.R for c in report.choices) / digits.ARCHITECTURE["depth"]))
    own_r = {m: per_block for m in method_names() if get_method(m).bench_r is not None and get_method(m).reduces}
    reporter.step("the chosen (layer, R) against the baseline, ToMe and Top-K", [
        "bench", "--model", digits.NAME, "--data", "digits", "--r-from", str(chosen.report),
        *[arg for m in own_r for arg in (f"--{m}-r", str(per_block))], "--budget", f"{4 * s.budget_s:g}",
        "--rounds", "3", "--output-dir", str(folder), *common])
    benched = bench(BenchSettings(
        model=digits.NAME, data="digits", r_from=chosen.report, method_r=own_r, budget_s=4 * s.budget_s, rounds=3,
        device=device, torch_device=s.torch_device, lock_clocks=s.lock_clocks, output_dir=folder,
        command=s.command), reporter)
    reporter.finished(benched)

    files = {"latency": latency.profile, "latency_plot": latency.plot, "accuracy": accuracy.profile,
             "accuracy_plot": accuracy.plot, "report": chosen.report, "report_plot": chosen.plot,
             "bench": benched.parquet}
    summary = atomic_write_text(summary_path, summary_page(files, folder, device, time.perf_counter() - began))
    return DemoResult(latency=latency, accuracy=accuracy, chosen=chosen, refined=refined, benched=benched,
                      summary=summary,
                      elapsed_s=time.perf_counter() - began)
