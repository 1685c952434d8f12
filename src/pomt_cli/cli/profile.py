"""``pomt profile``: a device's latency against kept tokens, its largest steps and a plot.

The library (torch, polars) is imported when the command runs, not when ``--help`` is read.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from pomt_cli.cli.options import (
    BatchSizesOption,
    CheckpointOption,
    CompileBackendOption,
    CudaGraphsOption,
    DeviceOption,
    DtypeOption,
    ImgSizeOption,
    LockClocksOption,
    ModelOption,
    OrtProvidersOption,
    OutputDirOption,
    ProfileBudgetOption,
    RelPrecisionOption,
    RuntimeOption,
    SeedOption,
    ThreadsOption,
    TokensOption,
    user_path,
    TorchDeviceOption,
    Workload,
    given,
    parse_int_list,
    parse_providers,
    parse_layers,
)
from pomt_cli.console import plain_console, print_path
from pomt_cli.defaults import BUDGET_S, DEFAULT_MODEL, MAX_SAMPLES, QUICK_BUDGET_S, QUICK_PASSES, QUICK_WARMUP
from pomt_cli.names import Runtime
from pomt_cli.options import Dtype

if TYPE_CHECKING:
    import polars as pl

    from pomt_cli.formats.latency import ClockState
    from pomt_cli.pipelines import ProfileResult

out = plain_console()


def register(app: typer.Typer) -> None:
    app.command("profile", short_help="Latency against kept tokens: the curve and its steps.")(profile)


def steps_tables(steps: pl.DataFrame, batch_sizes: list[int], grid: list[int],
                 layers: list[int] | None = None,
                 unlisted: dict[tuple[int | None, int], int] | None = None) -> list[Table | str]:
    """One rich table of steps per curve: batch size, and POMT's layer when ``layers`` (or a line saying there is none).

    ``unlisted`` counts, per (layer, batch size), the steps beyond those in ``steps``; a
    line under the table says how many, so that a cut list is not taken for the whole.
    """
    import polars as pl

    from pomt_cli.measure.steps import MAX_STEP_WIDTH

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
        more = (unlisted or {}).get((layer, b), 0)
        if more:
            rendered.append(f"{where}: {more} more step(s) stand out, smaller than these; "
                            f"--top-steps {part.height + more} lists them all")
    return rendered


def workload_line(layers: list[int] | None, num_tokens: int) -> str:
    """What the curve measured, in one line."""
    if layers is None:
        return ("workload: the all-blocks proxy (every block at n tokens), the paper's; a POMT model prunes in one "
                "block and pays for scoring, so its real saving is smaller: --method pomt --layer L measures it")
    return (f"workload: the POMT-patched model, R = {num_tokens} - n pruned in block{'s' if len(layers) > 1 else ''} "
            f"{', '.join(map(str, layers))} (one curve per layer)")


def _summary(frame: pl.DataFrame) -> str:
    counts = dict(frame.group_by("status").len().iter_rows())
    return (
        f"{frame.height} points: {counts.get('ok', 0)} within the precision, {counts.get('budget', 0)} stopped "
        f"by the time budget, {counts.get('oom', 0)} out of memory"
    )


def _ranges(values: list[int], most: int = 6) -> str:
    """Sorted integers as runs, e.g. ``2-40, 42-46, 59`` (at most ``most`` runs, then how many more)."""
    runs: list[list[int]] = []
    for v in sorted(set(values)):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    shown = [f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:most]]
    return ", ".join(shown) + (f" and {len(runs) - most} more" if len(runs) > most else "")


def budget_note(frame: pl.DataFrame, rel_precision: float, budget_s: float) -> str | None:
    """Which points place no step because they stopped on their time budget short of the precision, by
    batch size (and POMT's layer, when the profile has layers); None if none did.

    A point that stopped on its budget places no step unless its visits' medians agree
    (:func:`pomt_cli.measure.steps.find_steps`); profiles written before the visits' medians
    were recorded lack them, and then every such point places none. On a GPU they are
    typically where eager timing is bound by the host and drifts with unlocked clocks.
    """
    from pomt_cli.measure.steps import VISITS_AGREE, visits_agree

    recorded = "visit_low_ms" in frame.columns and "visit_high_ms" in frame.columns
    short = frame.filter((frame["status"] == "budget") & ~visits_agree(frame))
    if short.is_empty():
        return None
    if "layer" in short.columns and short["layer"].is_not_null().any():  # one curve per (layer, batch size)
        where = "; ".join(f"layer {layer}, batch {b}: n = {_ranges(part['tokens'].to_list())}"
                          for (layer, b), part in short.sort("layer", "batch_size").group_by(
                              ["layer", "batch_size"], maintain_order=True))
    else:
        where = "; ".join(f"batch {b}: n = {_ranges(part['tokens'].to_list())}"
                          for (b,), part in short.sort("batch_size").group_by(["batch_size"], maintain_order=True))
    agree = f" and their visits did not agree within {VISITS_AGREE:.0%}" if recorded else ""
    return (f"{short.height} point(s) did not reach \u00b1{rel_precision:.1%} within {budget_s:g} s{agree} "
            f"({where}); they place no step: raise --budget or --rel-precision, or lock the clocks")


def _clock_line(state: ClockState) -> str:
    return {
        "locked": "clocks: locked for the measurement, restored after",
        "already_locked": f"clocks: {state.detail}",
        "unlocked": "clocks: not locked (--no-lock-clocks); recorded in the profile",
        "unavailable": f"clocks: not locked: {state.detail}",
    }[state.mode]


def render(result: ProfileResult) -> None:
    """The clocks, the points' summary, the workload and the largest steps, then the files."""
    meta, frame = result.meta, result.frame
    out.print(_clock_line(meta.clocks))
    if meta.runtime != "eager":
        info = meta.runtime_info or {}
        detail = (f"torch.compile, backend {info.get('compile_backend')}" if meta.runtime == "compile" else
                  f"ONNX Runtime {info.get('onnxruntime_version')}, {', '.join(info.get('providers') or [])}")
        out.print(f"runtime: {meta.runtime} ({detail})")
    out.print(_summary(frame) + f"; {meta.elapsed_s:.1f} s measuring")
    note = budget_note(frame, meta.rel_precision, meta.budget_s)
    if note:
        out.print(note)
    layers = meta.layers if meta.workload == "pomt" else None
    out.print(workload_line(layers, meta.num_tokens))
    for item in steps_tables(result.steps, meta.batch_sizes, meta.grid, layers, result.unlisted):
        out.print(item)
    print_path(out, "profile:", result.profile)
    print_path(out, "plot:   ", result.plot)


def profile(
    ctx: typer.Context,
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = None,
    batch_size: BatchSizesOption = "1",
    dtype: DtypeOption = Dtype.float32,
    tokens: TokensOption = None,
    torch_device: TorchDeviceOption = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Load timm's pretrained weights (latency does "
                                             "not need them).")] = False,
    checkpoint: CheckpointOption = None,
    img_size: ImgSizeOption = None,
    cuda_graphs: CudaGraphsOption = False,
    runtime: RuntimeOption = Runtime.eager,
    ort_providers: OrtProvidersOption = None,
    compile_backend: CompileBackendOption = "inductor",
    rel_precision: RelPrecisionOption = 0.01,
    budget: ProfileBudgetOption = BUDGET_S,
    min_samples: Annotated[int, typer.Option(
        "--min-samples", min=1, max=MAX_SAMPLES, help="Timed calls per point at least.")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed calls per point first.")] = 3,
    passes: Annotated[int, typer.Option(
        "--passes", min=1, help="Sweeps over the grid in fresh shuffled orders; each point's samples are pooled.")] = 2,
    remeasure: Annotated[int, typer.Option(
        "--remeasure", min=0, help="Rounds of re-measuring points that disagree with both neighbours.")] = 2,
    seed: SeedOption = 0,
    method: Annotated[Workload, typer.Option(
        "--method", help="Workload: proxy (the paper's: every block at n tokens) or pomt (the real POMT-patched "
        "model, R = N - n pruned in block --layer: what would be deployed).")] = Workload.proxy,
    layer: Annotated[str | None, typer.Option(
        "--layer", help="With --method pomt: POMT's pruning blocks, comma-separated (default 3); one curve each, "
        "each costing about one proxy profile.")] = None,
    threads: ThreadsOption = None,
    lock_clocks: LockClocksOption = True,
    output_dir: OutputDirOption = Path("runs"),
    resume: Annotated[Path | None, typer.Option(
        "--resume", callback=user_path, help="Continue this interrupted profile; finished points are kept.")] = None,
    top_steps: Annotated[int, typer.Option("--top-steps", min=1, help="Steps listed per batch size.")] = 8,
    quick: Annotated[bool, typer.Option(
        "--quick", help=f"A first look: --budget {QUICK_BUDGET_S:g} --warmup {QUICK_WARMUP} --passes {QUICK_PASSES} "
        "(each, when given, wins). On an H200 a quarter of the default time; it finds the largest steps, fewer of "
        "the small ones.")] = False,
) -> None:
    """Measure latency against kept tokens n: the device's latency-workload curve, its largest steps and a plot."""
    if quick:
        budget = budget if given(ctx, "budget", budget) is not None else QUICK_BUDGET_S
        warmup = warmup if given(ctx, "warmup", warmup) is not None else QUICK_WARMUP
        passes = passes if given(ctx, "passes", passes) is not None else QUICK_PASSES
    # The options' text first: a refusal then comes before torch is imported.
    batch_sizes, layers, providers = parse_int_list(batch_size, "--batch-size"), parse_layers(layer), parse_providers(
        ort_providers)
    from pomt_cli.cli.progress import RichReporter
    from pomt_cli.models import model_line
    from pomt_cli.pipelines import ProfileSettings
    from pomt_cli.pipelines import profile as run_profile

    out.print(model_line(model))
    settings = ProfileSettings(
        model=model, device=device, torch_device=torch_device, batch_sizes=batch_sizes,
        dtype=dtype, tokens=tokens, pretrained=pretrained, checkpoint=checkpoint, img_size=img_size,
        cuda_graphs=cuda_graphs, runtime=runtime,
        ort_providers=providers,
        compile_backend=given(ctx, "compile_backend", compile_backend),
        rel_precision=rel_precision, budget_s=budget, min_samples=min_samples,
        warmup=warmup, passes=passes, remeasure=remeasure, seed=seed, workload=method.value,
        layers=layers, threads=threads, lock_clocks=lock_clocks, output_dir=output_dir,
        resume=resume, top_steps=top_steps, command=ctx.obj,
    )
    with RichReporter(command=ctx.obj) as reporter:
        result = run_profile(settings, reporter)
    render(result)
