"""The ``pomt profile`` pipeline: latency against kept tokens, checkpointed, resumable; the profile and its plot."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch
from pydantic import Field, PositiveInt

from pomt_cli.devices.clocks import ClockRestoreError, locked_clocks
from pomt_cli.devices.presets import DevicePreset
from pomt_cli.devices.torch_device import device_name, set_cpu_threads, short_device_name
from pomt_cli.errors import PomtError
from pomt_cli.formats.common import write_profile
from pomt_cli.formats.latency import ClockState, LatencyMeta, Workload, resume_rows
from pomt_cli.formats.outputs import OutputSet, layers_part, output_stem, write_error
from pomt_cli.defaults import BUDGET_S
from pomt_cli.measure.grid import GridProgress, LatencySettings
from pomt_cli.measure.steps import cut_steps, find_curve_steps
from pomt_cli.measure.workload import check_workload, profile_latency
from pomt_cli.models import DEFAULT_MODEL, create_model, vit_geometry
from pomt_cli.options import SEED_MAX, Dtype, TokenRange, check_layers, token_grid
from pomt_cli.pipelines.common import (
    DEFAULT_LAYER,
    SILENT,
    Reporter,
    RuntimeSettings,
    preset_and_device,
    raise_unrestored,
    recorded_command,
    unrestored_state,
)
from pomt_cli.plots import plot_latency
from pomt_cli.pruning import pomt

#: Seconds between two checkpoints of an unfinished profile.
CHECKPOINT_EVERY_S = 1.0


class ProfileSettings(RuntimeSettings):
    """The settings of one latency profile (``pomt profile``)."""

    model: str = DEFAULT_MODEL
    device: str | None = Field(None, description="a preset name or .toml file (default: nvidia with CUDA, else cpu)")
    torch_device: str | None = Field(None, description="overrides the preset's torch device")
    batch_sizes: list[PositiveInt] = Field([1], min_length=1)
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
    layers: list[int] | None = Field(None, description="POMT's blocks with workload pomt (default [3]; their range "
                                    "is checked against the model when the profile runs)")
    threads: int | None = Field(None, ge=1)
    lock_clocks: bool = True
    output_dir: Path = Path("runs")
    resume: Path | None = None
    top_steps: int = Field(8, ge=1)


@dataclass(frozen=True)
class ProfileResult:
    """A latency profile, its largest steps and the files written (``profile``: Parquet, ``plot``: PNG).

    ``steps`` holds at most ``top_steps`` steps per curve (layer and batch size), the
    largest first; ``unlisted`` counts, per curve, the steps that stand out beyond those.
    """

    frame: pl.DataFrame
    meta: LatencyMeta
    steps: pl.DataFrame
    profile: Path
    plot: Path
    resumed_complete: bool = False
    unlisted: dict[tuple[int | None, int], int] = field(default_factory=dict)


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


def profile(settings: ProfileSettings, reporter: Reporter = SILENT) -> ProfileResult:
    """Measure latency against kept tokens n, checkpointing as it goes; write the profile and its plot.

    With ``settings.resume`` the finished points of that profile are kept and the rest measured.

    Raises:
        PomtError: bad settings, model or device; a resume file of another run.
    """
    s = settings
    s.check_runtime_options([s.runtime])
    preset, tdev = preset_and_device(s.device, s.torch_device)
    info = s.checked_runtime(tdev, s.dtype.torch, s.cuda_graphs)
    if s.cuda_graphs and tdev.type != "cuda":
        raise PomtError(f"--cuda-graphs needs a CUDA device, but the torch device is {tdev}: "
                        "leave it out or use --torch-device cuda")
    if s.layers is not None and s.workload != "pomt":
        raise PomtError(f"--layer applies to --method pomt only; the {s.workload} workload has no layer: "
                        "leave out --layer or add --method pomt")
    layers = (s.layers or [DEFAULT_LAYER]) if s.workload == "pomt" else None
    if s.threads is not None:
        set_cpu_threads(s.threads)
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
        compile_backend=s.backend,
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
        runtime_info=info, **recorded_command(s.command),
    )
    previous = previous_meta = None
    if s.resume is not None:
        previous, previous_meta = resume_rows(s.resume, meta)
    workload_slug = () if layers is None else (layers_part("pomt", layers),)
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
        steps, unlisted = cut_steps(find_curve_steps(frame, top=frame.height), s.top_steps)
        title = (f"{s.model}, {meta.device_display_name} ({short_device_name(meta.device_name)}), {dtype}, "
                 f"{'CUDA graphs' if s.cuda_graphs else s.runtime.value}, "
                 + ("every block at n (proxy)" if layers is None else "POMT-patched model"))
        files.write("parquet", lambda tmp: write_profile(tmp, frame, meta))
        files.write("png", lambda tmp: plot_latency(frame, tmp, title=title, steps=steps))
        files.commit()
    raise_unrestored(unrestored, "the profile is complete", parquet)
    return ProfileResult(frame=frame, meta=meta, steps=steps, profile=parquet, plot=png, resumed_complete=complete,
                         unlisted=unlisted)


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
            saved.meta = saved.meta.model_copy(update={"clocks": unrestored_state(saved.meta.clocks)})
    except BaseException:
        saved.flush()
        if saved.frame is not None:
            reporter.interrupted(saved.frame.height, parquet)
        raise
    received = pomt.received_path(tdev, Dtype(settings.dtype).torch) if settings.workload == "pomt" else None
    return frame, saved.meta.model_copy(update={"complete": True, "elapsed_s": saved.elapsed_s(),
                                                "pomt_received": received}), unrestored
