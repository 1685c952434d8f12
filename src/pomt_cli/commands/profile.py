"""``pomt profile``: a device's latency against kept tokens, its largest steps and a plot."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import polars as pl
import torch
import typer
from pomt_cli.console import plain_console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from pomt_cli.devices.clocks import locked_clocks
from pomt_cli.devices.presets import default_preset_name, load_preset
from pomt_cli.devices.torch_device import device_name, resolve_torch_device
from pomt_cli.formats.latency import ClockState
from pomt_cli.errors import PomtError
from pomt_cli.formats.latency import LatencyMeta, WORKLOADS, resume_rows
from pomt_cli.measure.grid import GridProgress, LatencySettings
from pomt_cli.measure.steps import MAX_STEP_WIDTH, find_curve_steps
from pomt_cli.measure.workload import profile_latency
from pomt_cli.models import DEFAULT_MODEL, MODEL_HELP, create_model, model_line, vit_geometry
from pomt_cli.options import SEED_MAX, check_layers, parse_dtype, parse_int_list, token_grid
from pomt_cli.formats.outputs import OutputSet, output_stem, write_error
from pomt_cli.plots import plot_latency
from pomt_cli.formats.common import write_profile

#: Seconds between two checkpoints of an unfinished profile.
CHECKPOINT_EVERY_S = 1.0

out = plain_console()
err = plain_console(stderr=True, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("profile")(profile)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise PomtError(message)


def steps_tables(steps: pl.DataFrame, batch_sizes: list[int], grid: list[int],
                 layers: list[int] | None = None) -> list[Table | str]:
    """One rich table of steps per curve: batch size, and POMT's layer when ``layers`` (or a line saying there is none)."""
    rendered: list[Table | str] = []
    stride = min((a - b for a, b in zip(grid, grid[1:])), default=1)
    for layer, b in itertools.product(layers or [None], batch_sizes):
        part = steps.filter(pl.col("batch_size") == b)
        if layer is not None and "layer" in part.columns:
            part = part.filter(pl.col("layer") == layer)
        where = f"batch {b}" if layer is None else f"POMT at layer {layer}, batch {b}"
        if part.is_empty():
            hint = (f" (the grid's stride is {stride}; steps are looked for between points at most "
                    f"{MAX_STEP_WIDTH} tokens apart: a finer --tokens grid can show them)" if stride > MAX_STEP_WIDTH else "")
            rendered.append(f"{where}: no step stands out from the curve's trend{hint}")
            continue
        table = Table(title=f"Largest latency steps, {where}", title_justify="left")
        # At 80 columns the words of the step wrap; the numbers never do.
        table.add_column("step")
        table.add_column("latency (ms)", justify="right", no_wrap=True)
        table.add_column("change", justify="right", no_wrap=True)
        table.add_column("beyond trend", justify="right", no_wrap=True)
        for row in part.iter_rows(named=True):
            table.add_row(
                f"from {row['from_tokens']} to {row['to_tokens']} tokens",
                f"{row['from_ms']:.3f} \u2192 {row['to_ms']:.3f}",
                f"\u2212{row['drop_pct']:.1f}% latency",
                f"{row['excess_pct']:.1f} pts",
            )
        rendered.append(table)
    return rendered


def workload_slug(layers: list[int] | None) -> tuple[str, ...]:
    """The workload's part of a file name: none for the proxy, ``pomt-layers1-3`` for POMT."""
    return () if layers is None else ("pomt-layers" + "-".join(map(str, layers)),)


def workload_line(layers: list[int] | None, num_tokens: int) -> str:
    """What the curve measured, in one line."""
    if layers is None:
        return ("workload: the all-blocks proxy (every block at n tokens), the paper's; a POMT model prunes in one "
                "block and pays for scoring, so its real saving is smaller: --method pomt --layer L measures it")
    return (f"workload: the POMT-patched model, R = {num_tokens} - n pruned in block "
            f"{', '.join(map(str, layers))} (one curve per layer)")


def _summary(frame: pl.DataFrame) -> str:
    counts = dict(frame.group_by("status").len().iter_rows())
    return (
        f"{frame.height} points: {counts.get('ok', 0)} within the precision, {counts.get('budget', 0)} stopped "
        f"by the time budget, {counts.get('oom', 0)} out of memory"
    )


def _clock_line(state: ClockState) -> str:
    return {
        "locked": "clocks: locked for the measurement, restored after",
        "already_locked": f"clocks: {state.detail}",
        "unlocked": "clocks: not locked (--no-lock-clocks); recorded in the profile",
        "unavailable": f"clocks: not locked: {state.detail}",
    }[state.mode]


def profile(
    model: str = typer.Option(DEFAULT_MODEL, "--model", show_default=False, help=MODEL_HELP),
    device: str | None = typer.Option(
        None, "--device",
        help="Device preset (orin, tx2, xavier, nvidia, a100, h100, cpu) or a preset .toml file "
        "(default: nvidia with CUDA, else cpu).",
    ),
    batch_size: str = typer.Option("1", "--batch-size", help="Batch sizes, comma-separated: 1,4,16,64."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
    tokens: str | None = typer.Option(
        None, "--tokens", help="Grid START:STOP:STRIDE of kept tokens n, both ends inclusive (default: every n from N down to p + 1)."
    ),
    torch_device: str | None = typer.Option(
        None, "--torch-device", help="Override the preset's torch device (cpu, cuda, cuda:1, mps)."
    ),
    pretrained: bool = typer.Option(False, "--pretrained", help="Load timm's pretrained weights (latency does not need them)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Load weights from a .safetensors/.pth file."),
    img_size: int | None = typer.Option(
        None, "--img-size", help="Input size in pixels, a multiple of the patch size (default: the model's; "
        "e.g. 224 for DINOv2, whose timm default is 518)."
    ),
    cuda_graphs: bool = typer.Option(
        False, "--cuda-graphs", help="Capture the forward pass in a CUDA graph and time replays (no launch overhead)."
    ),
    rel_precision: float = typer.Option(
        0.01, "--rel-precision", help="Stop a point once the 95% CI of its median is within this fraction."
    ),
    budget: float = typer.Option(1.0, "--budget", help="Seconds per grid point at most (warm-up included)."),
    min_samples: int = typer.Option(10, "--min-samples", help="Timed calls per point at least."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed calls per point first."),
    passes: int = typer.Option(
        2, "--passes", help="Sweeps over the grid in fresh shuffled orders; each point's samples are pooled."
    ),
    remeasure: int = typer.Option(2, "--remeasure", help="Rounds of re-measuring points that disagree with both neighbours."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Seeds the visiting order, the inputs and the kept tokens."),
    method: str = typer.Option(
        "proxy", "--method",
        help="Workload: proxy (the paper's: every block at n tokens) or pomt (the real POMT-patched model, "
        "R = N - n pruned in block --layer: what would be deployed).",
    ),
    layer: str | None = typer.Option(
        None, "--layer",
        help="With --method pomt: POMT's pruning blocks, comma-separated (default 3); one curve each, "
        "each costing about one proxy profile.",
    ),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice)."),
    lock_clocks: bool = typer.Option(
        True, "--lock-clocks/--no-lock-clocks", help="Lock the device's clocks while measuring (restored after)."
    ),
    output_dir: Path = typer.Option(Path("runs"), "--output-dir", help="Folder for the profile and its plot."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue this interrupted profile; finished points are kept."),
    top_steps: int = typer.Option(8, "--top-steps", help="Steps listed per batch size."),
) -> dict[str, Path]:
    """Measure latency against kept tokens n: the device's latency-workload curve, its largest steps and a plot."""
    out.print(model_line(model))
    preset = load_preset(device or default_preset_name())
    tdev = resolve_torch_device(torch_device or preset.torch_device)
    dtype_name, _ = parse_dtype(dtype)
    batch_sizes = parse_int_list(batch_size, "--batch-size")
    _check(not cuda_graphs or tdev.type == "cuda",
           f"--cuda-graphs needs a CUDA device, but the torch device is {tdev}: leave it out or use --torch-device cuda")
    _check(0 < rel_precision < 1, f"--rel-precision {rel_precision} must lie between 0 and 1, e.g. 0.01 for 1%")
    _check(budget > 0, f"--budget {budget} must be positive (seconds per grid point)")
    _check(min_samples >= 1 and warmup >= 0 and remeasure >= 0 and passes >= 1,
           "--min-samples and --passes must be at least 1, --warmup and --remeasure at least 0")
    _check(threads is None or threads >= 1, f"--threads {threads} must be at least 1")
    _check(top_steps >= 1, f"--top-steps {top_steps} must be at least 1")
    _check(method in WORKLOADS, f"unknown --method {method!r}: use proxy (every block at n) or pomt (the pruned model)")
    _check(layer is None or method == "pomt",
           f"--layer applies to --method pomt only; the {method} workload has no layer: leave out --layer "
           "or add --method pomt")
    layers = (parse_int_list(layer, "--layer", minimum=-(2**31)) if layer is not None else [3]) if method == "pomt" else None
    if threads is not None:
        torch.set_num_threads(threads)
    net = create_model(model, pretrained=pretrained, checkpoint=checkpoint, img_size=img_size)
    g = vit_geometry(net)
    if layers is not None:
        check_layers(layers, g.num_blocks, model)
    grid = token_grid(tokens, g.num_tokens, g.num_prefix)
    settings = LatencySettings(
        batch_sizes=batch_sizes, grid=grid, dtype=dtype_name, cuda_graphs=cuda_graphs, rel_precision=rel_precision,
        budget_s=budget, min_samples=min_samples, warmup=warmup, seed=seed, remeasure_rounds=remeasure,
        passes=passes, workload=method, layers=layers,
    )
    meta = LatencyMeta(
        model=model, num_tokens=g.num_tokens, num_prefix=g.num_prefix, num_blocks=g.num_blocks,
        embed_dim=g.embed_dim, dtype=dtype_name, grid=grid, batch_sizes=batch_sizes,
        img_size=list(g.input_size[1:]), img_size_option=img_size,
        timing_mode=settings.timing_mode, device_preset=preset.name, device_display_name=preset.display_name,
        device_name=device_name(tdev), torch_device=str(tdev),
        clocks=ClockState(preset=preset.name, mode="unlocked", detail="not started"),
        clocks_locked=lock_clocks, pretrained=pretrained, checkpoint=str(checkpoint) if checkpoint else None,
        rel_precision=rel_precision, budget_s=budget, min_samples=min_samples, warmup=warmup, seed=seed,
        remeasure_rounds=remeasure, passes=passes, workload=method, layers=layers,
    )
    previous = None
    previous_meta = None
    if resume is not None:
        previous, previous_meta = resume_rows(resume, meta)
    stem = output_stem("latency", model, device=preset.name, batch_size=batch_sizes, dtype=dtype_name, img_size=img_size,
                       extra=(*workload_slug(layers), *(("cudagraphs",) if cuda_graphs else ())))
    # The set claims the names for the whole run: the checkpoints of an unfinished profile
    # go to its parquet, which --resume reads; the final profile and plot land together.
    with OutputSet(output_dir, stem, ("parquet", "png")) as files:
        parquet, png = files.path("parquet"), files.path("png")
        if previous_meta is not None and previous_meta.complete:
            frame, meta = previous, previous_meta
            err.print(f"{resume} is complete: nothing to measure")
        else:
            frame, meta = _measure(net, settings, tdev, preset, lock_clocks, meta, previous, previous_meta, parquet)
        steps = find_curve_steps(frame, top=top_steps)
        title = (f"{model}, {meta.device_display_name} ({meta.device_name[:40]}), {dtype_name}, "
                 f"{'CUDA graphs' if cuda_graphs else 'eager'}, "
                 + ("every block at n (proxy)" if layers is None else "POMT-patched model"))
        files.write("parquet", lambda tmp: write_profile(tmp, frame, meta))
        files.write("png", lambda tmp: plot_latency(frame, tmp, title=title, steps=steps))
        files.commit()
    out.print(_clock_line(meta.clocks))
    out.print(_summary(frame) + f"; {meta.elapsed_s:.1f} s measuring")
    budget_points = frame.filter(pl.col("status") == "budget").height
    if budget_points:
        out.print(f"{budget_points} point(s) did not reach \u00b1{rel_precision:.1%} within {budget:g} s: "
                  "raise --budget or --rel-precision for them")
    out.print(workload_line(layers, g.num_tokens))
    for item in steps_tables(steps, batch_sizes, grid, layers):
        out.print(item)
    out.print(f"profile: {parquet}")
    out.print(f"plot:    {png}")
    return {"profile": parquet, "plot": png}


def _measure(net, settings: LatencySettings, tdev: torch.device, preset, lock_clocks: bool, meta: LatencyMeta,
             previous: pl.DataFrame | None, previous_meta: LatencyMeta | None,
             parquet: Path) -> tuple[pl.DataFrame, LatencyMeta]:
    """Run the grid with clocks locked, a progress bar and checkpoints; the frame and final metadata."""
    began = time.perf_counter()
    earlier_s = previous_meta.elapsed_s if previous_meta else 0.0
    resumed = previous.height if previous is not None else 0
    state: dict = {"meta": meta, "frame": None, "written_at": 0.0, "written": True}

    def partial_meta() -> LatencyMeta:
        return state["meta"].model_copy(update={"complete": False, "elapsed_s": earlier_s + time.perf_counter() - began})

    def checkpoint(frame: pl.DataFrame, force: bool = False) -> None:
        state["frame"], state["written"] = frame, False
        if force or time.perf_counter() - state["written_at"] >= CHECKPOINT_EVERY_S:
            try:
                write_profile(parquet, frame, partial_meta())
            except (OSError, pl.exceptions.PolarsError) as exc:
                raise write_error(parquet, exc) from None
            state["written_at"], state["written"] = time.perf_counter(), True

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("points"),
        TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=err,
    )
    try:
        with locked_clocks(preset, torch_device=tdev, enabled=lock_clocks) as clocks:
            state["meta"] = meta.model_copy(update={"clocks": clocks, "clocks_locked": clocks.locked,
                                                    "resumed_rows": resumed})
            with progress:
                task = progress.add_task("starting", total=None)

                def on_progress(event: GridProgress) -> None:
                    verb = "measuring" if event.phase == "measure" else "re-measuring"
                    if event.frame is None:
                        where = "" if event.layer is None else f"layer {event.layer}, "
                        progress.update(task, total=event.total, completed=event.done,
                                        description=f"{verb} {where}batch {event.batch_size}, n={event.tokens}")
                    else:
                        progress.update(task, total=event.total, completed=event.done)
                        checkpoint(event.frame)

                frame = profile_latency(net, settings, device=tdev, previous=previous, progress=on_progress)
    except BaseException:
        if state["frame"] is not None and not state["written"]:
            checkpoint(state["frame"], force=True)
        if state["frame"] is not None:
            err.print(f"interrupted: {state['frame'].height} points saved in {parquet}; "
                      f"continue with --resume {parquet}")
        raise
    final = state["meta"].model_copy(update={"complete": True, "elapsed_s": earlier_s + time.perf_counter() - began})
    return frame, final
