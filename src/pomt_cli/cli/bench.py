"""``pomt bench``: the pruned model against the baseline, ToMe and Top-K, side by side.

The library (torch, timm, polars) is imported when the command runs, not when ``--help`` is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.table import Table

from pomt_cli.cli.options import (
    AllowRandomOption,
    BenchBudgetOption,
    CheckpointOption,
    ClassOrderOption,
    CompileBackendOption,
    CudaGraphsOption,
    DeviceOption,
    DtypeOption,
    ImgSizeOption,
    LimitOption,
    LockClocksOption,
    Method,
    ModelOption,
    OrtProvidersOption,
    OutputDirOption,
    RelPrecisionOption,
    RuntimesOption,
    SeedOption,
    ThreadsOption,
    TorchDeviceOption,
    given,
    parse_int_list,
    parse_providers,
    user_path,
)
from pomt_cli.console import plain_console, print_path
from pomt_cli.defaults import DEFAULT_MODEL, ROUND_BUDGET_S, ROUNDS
from pomt_cli.errors import PomtError
from pomt_cli.names import BASELINE, PROVIDER_ALIASES
from pomt_cli.options import Dtype

if TYPE_CHECKING:
    import polars as pl

    from pomt_cli.pipelines import BenchResult

out = plain_console()


def register(app: typer.Typer) -> None:
    app.command("bench", short_help="Time the baseline, POMT, ToMe and Top-K side by side.")(bench)


def _table(title: str, columns: list[str], rows: list[list[str]], compact: bool = False) -> Table:
    """A table whose numbers stay whole at 80 columns: number columns exactly as wide as their
    widest cell or header, only the text columns fold (``compact``: one space between columns)."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  padding=(0, 0) if compact else (0, 1))
    for i, name in enumerate(columns):
        if name in ("method", "predicted by"):
            table.add_column(name, justify="left", overflow="fold")
        elif name == "runtime":
            table.add_column(name, justify="left", width=max(len(r[i]) for r in [columns, *rows]), no_wrap=True)
        else:
            width = max([len(r[i]) for r in rows] + [len(name)])
            table.add_column(name, justify="right", width=width, no_wrap=True)
    for cells in rows:
        table.add_row(*cells)
    return table


def _tilde_if_unproven(row: dict) -> str:
    """``~`` for a change against none whose interval holds 0 (no change shown), else nothing."""
    low, high = row.get("change_low_pct"), row.get("change_high_pct")
    return "~" if row["method"] != BASELINE and low is not None and high is not None and low <= 0 <= high else ""


def _render(frame: pl.DataFrame, title: str, with_accuracy: bool, reference: str | None = None,
            refined: bool = False) -> list[Table]:
    """The report: a table of latency (and accuracy), and one of predictions when the run has them.

    With several runtimes the latency table has a ``runtime`` column and a column against
    ``reference``'s ``none`` at the same batch size (``vs eager``, else ``vs ref``); the
    accuracy, which does not depend on the runtime, is a table of its own.
    """
    import polars as pl

    runtimes = frame["runtime"].drop_nulls().unique(maintain_order=True).to_list()
    several = len(runtimes) > 1
    reference = reference or (runtimes[0] if runtimes else None)
    across = "vs eager" if reference == "eager" else "vs ref"
    columns = ["batch", *(["runtime"] if several else []), "method", "out", "ms", "p10-p90", "vs none",
               *([across] if several else [])]
    accuracy_here = with_accuracy and not several
    if accuracy_here:
        columns += ["top-1", "Δ pts"]
    rows = []
    for row in frame.iter_rows(named=True):
        if row["latency_ms"] is None:
            latency, spread, change, versus = "out of memory", "", "", ""
        else:
            latency, spread = f"{row['latency_ms']:.3f}", f"{row['p10_ms']:.3g}-{row['p90_ms']:.3g}"
            change = "" if row["method"] == BASELINE or row["latency_change_pct"] is None else (
                _tilde_if_unproven(row) + f"{row['latency_change_pct']:+.1f}%")
            own = row["method"] == BASELINE and row["runtime"] == reference
            versus = "" if own or row["runtime_change_pct"] is None else f"{row['runtime_change_pct']:+.1f}%"
        cells = [str(row["batch_size"]), *([row["runtime"]] if several else []), row["setting"],
                 str(row["tokens_out"]), latency, spread, change, *([versus] if several else [])]
        if accuracy_here:
            acc_change = "" if row["method"] == BASELINE or row["accuracy_change"] is None else f"{row['accuracy_change']:+.2f}"
            cells += [f"{row['accuracy']:.2f}", acc_change]
        rows.append(cells)
    legend = "out: tokens leaving the last block; ms: median, p10-p90 its spread" + (
        "; top-1 in %, Δ pts: its change against none" if accuracy_here else "")
    if any(_tilde_if_unproven(row) for row in frame.iter_rows(named=True)):
        legend += "; ~: no change beyond its 95% interval (drift between rounds included)"
    if several:
        legend += (f"; vs none: against none in the same runtime; {across}: against {reference}'s none at the "
                   "same batch size")
        if with_accuracy:
            legend += ("; accuracy: evaluated once per method with eager PyTorch (every runtime runs the same "
                       "weights; exported graphs were checked against PyTorch at export)")
    tables = [_table(title, columns, rows, compact=several)]
    tables[0].caption, tables[0].caption_justify = legend, "left"
    if with_accuracy and several:
        tables.append(_accuracy_table(frame))
    predicted = frame.filter(pl.col("predicted_ms").is_not_null() | pl.col("profile_ms").is_not_null())
    if predicted.height:
        rows = []
        for row in predicted.iter_rows(named=True):
            rows.append([str(row["batch_size"]), row["setting"], _ms(row["profile_ms"]), _ms(row["predicted_ms"]),
                         _ms(row["latency_ms"]),
                         "" if row["prediction_error"] is None else f"{row['prediction_error']:+.1%}"])
        on = f" on {predicted['runtime'][0]}" if several else ""
        table = _table(f"Predicted against measured (ms){on}", ["batch", "method", "profile", "predicted",
                                                                "measured", "error"], rows)
        # After refine, a choice's ms in the report is its refined ratio on the profile's scale.
        profile = ("the report's ms on the latency profile's scale (a refined choice: the ratio refine measured x "
                   "the profile's unpruned ms)" if refined else "the latency profile's own ms")
        table.caption, table.caption_justify = (
            f"predicted: none's measured ms x the report's ratio; profile: {profile}"), "left"
        tables.append(table)
    return tables


def _accuracy_table(frame: pl.DataFrame) -> Table:
    """Each method's accuracy once: it was evaluated with eager PyTorch, whatever the runtime."""
    rows = []
    for row in frame.unique("setting", keep="first", maintain_order=True).iter_rows(named=True):
        change = "" if row["method"] == BASELINE or row["accuracy_change"] is None else f"{row['accuracy_change']:+.2f}"
        rows.append([row["setting"], "" if row["accuracy"] is None else f"{row['accuracy']:.2f}", change])
    table = _table("Accuracy", ["method", "top-1", "Δ pts"], rows)
    table.caption, table.caption_justify = "top-1 in %, Δ pts: its change against none", "left"
    return table


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _runtime_text(info: dict | None) -> str:
    """``eager``, ``compile (inductor)``, ``onnxruntime (CPU)``: what ran the timed calls."""
    if not info or info["runtime"] == "eager":
        return "eager"
    if info["runtime"] == "compile":
        return f"compile ({info['compile_backend']})"
    short = {v: "TensorRT" if k == "tensorrt" else k.upper() for k, v in PROVIDER_ALIASES.items()}
    return f"onnxruntime ({', '.join(short.get(p, p) for p in info['providers'] or [])})"


def render(result: BenchResult) -> None:
    """The tables of latency (and accuracy) and of predictions, the clocks, then the files."""
    from pomt_cli.bench import check_choices, check_text
    from pomt_cli.devices.torch_device import short_device_name

    meta, frame = result.meta, result.frame
    images = meta.num_images
    runtimes = ", ".join(_runtime_text(meta.runtimes_info.get(r)) for r in meta.runtimes)
    title = (f"{meta.model} on {meta.device_display_name} ({short_device_name(meta.device_name)}), {meta.dtype}, "
             f"{'CUDA graphs' if meta.timing_mode == 'cuda_graphs' else runtimes}"
             + (f", {images} images" if images else ""))
    if result.skipped:
        out.print(f"skipped {len(result.skipped)} unreadable image(s), e.g. {result.skipped[0][0]}")
    if result.duplicates:
        from pomt_cli.accuracy.data import describe_duplicates

        out.print(describe_duplicates(result.duplicates))
    refined = any(c.refined for c in result.choices.values())
    for table in _render(frame, title, images is not None, meta.runtime, refined):
        out.print(table)
    if result.choices:
        workload = next(c.workload for c in result.choices.values())
        refined = any(c.refined for c in result.choices.values())
        out.print("predicted: from "
                  + ("the ratios pomt refine measured side by side" if refined else
                     "the real pruned model's latency profile" if workload == "pomt" else
                     "the all-blocks proxy (every block at n; the real saving is smaller)")
                  + "; error = measured / predicted - 1")
        print_path(out, "choices:", result.r_from)
        if result.report_device:
            out.print(f"the report's latency was profiled on {short_device_name(result.report_device)}, not on "
                      f"{short_device_name(meta.device_name)}: its R and predictions are that device's; profile "
                      "here and run compute-r again to choose for this one")
        if workload == "pomt" and not refined:
            out.print("the choices were not refined: measuring them side by side on the device first makes the "
                      "prediction come true more closely:")
            print_path(out, "  pomt refine", result.r_from)
        if len(meta.runtimes) > 1:
            out.print(f"predicted and judged for the rows of {result.report_runtime}, the report's runtime")
        for check in check_choices(frame, result.choices.values(), result.report_runtime):
            out.print(check_text(check))
    if meta.pomt_received is not None:
        out.print(f"POMT's attention received: {meta.pomt_received}")
    clocks = meta.clocks
    out.print(f"clocks: {clocks.mode} ({clocks.detail})" if clocks.detail else f"clocks: {clocks.mode}")
    print_path(out, "report:", result.csv)
    print_path(out, "       ", result.parquet)


def check_options(methods: list[str], r: int | None, r_from: Path | None, layer: int | None, data: str | None,
                  limit: int | None, class_order: object, given_method_r: Sequence[str] = ()) -> None:
    """Refuse options that would be ignored: a method's setting where the method does not run,
    accuracy options without ``--data``.

    Raises:
        PomtError: ``-r``/``--r-from`` with ``--method`` naming only other methods; ``--layer``
            where POMT does not run; ``--tome-r``/``--topk-r`` (those of ``given_method_r``)
            with ``--method`` leaving that method out; ``--limit`` or ``--class-order``
            without ``--data``.
    """
    from pomt_cli.pruning import pomt

    pomt_name = pomt.Pomt.name
    given_r = "-r" if r is not None else "--r-from" if r_from is not None else None
    if methods and pomt_name not in methods and given_r:
        raise PomtError(f"{given_r} sets POMT's R, but --method names only {', '.join(methods)}: add --method "
                        f"{pomt_name}, or leave out {given_r}")
    if layer is not None and (pomt_name not in methods if methods else not given_r):
        raise PomtError("--layer applies to POMT only, which this bench does not run: give -r R (or --r-from "
                        "REPORT) with it, or leave out --layer")
    for name in given_method_r:
        if methods and name not in methods:
            raise PomtError(f"--{name}-r sets {name}'s r, but --method names only {', '.join(methods)}: add "
                            f"--method {name}, or leave out --{name}-r")
    for option, value in (("--limit", limit), ("--class-order", class_order)):
        if value is not None and data is None:
            raise PomtError(f"{option} applies to the accuracy measured on --data, which is not given: add --data "
                            f"FOLDER, or leave out {option}")


def bench(
    ctx: typer.Context,
    model: ModelOption = DEFAULT_MODEL,
    method: Annotated[list[Method], typer.Option(
        "--method", metavar=f"<{'|'.join(m.value for m in Method)}>", help="Repeat for a comparison "
        "(default: all that have a setting: tome and topk, and pomt with -r or --r-from). "
        f"{BASELINE} is always included.")] = [],  # noqa: B006 (typer's way of a repeated option)
    r: Annotated[int | None, typer.Option("-r", "--r", help="POMT: tokens pruned in block --layer.")] = None,
    r_from: Annotated[Path | None, typer.Option(
        "--r-from", callback=user_path, help="POMT's R per batch size from a compute-r report (.json).")] = None,
    layer: Annotated[int | None, typer.Option(
        "--layer", help="POMT's pruning block (default: the report's choice with --r-from, else 3).")] = None,
    tome_r: Annotated[int, typer.Option(
        "--tome-r", help="ToMe: tokens merged in every block, capped per block at half the non-prefix tokens "
        "(as ToMe).")] = 8,
    topk_r: Annotated[int, typer.Option("--topk-r", help="Top-K: tokens pruned in every block.")] = 8,
    batch_size: Annotated[str | None, typer.Option(
        "--batch-size", help="Batch sizes, comma-separated (default: the report's with --r-from, else 1).")] = None,
    device: DeviceOption = None,
    torch_device: TorchDeviceOption = None,
    dtype: DtypeOption = Dtype.float32,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="timm's pretrained weights (needed for "
                                             "accuracy).")] = False,
    checkpoint: CheckpointOption = None,
    allow_random_weights: AllowRandomOption = False,
    img_size: ImgSizeOption = None,
    data: Annotated[str | None, typer.Option(
        "--data", help="Labelled images for accuracy: an image folder or 'digits'.")] = None,
    limit: LimitOption = None,
    class_order: ClassOrderOption = None,
    eval_batch_size: Annotated[int, typer.Option(
        "--eval-batch-size", min=1, help="Images per forward pass for accuracy.")] = 64,
    cuda_graphs: CudaGraphsOption = False,
    runtime: RuntimesOption = [],  # noqa: B006 (typer's way of a repeated option)
    ort_providers: OrtProvidersOption = None,
    compile_backend: CompileBackendOption = "inductor",
    rel_precision: RelPrecisionOption = 0.01,
    budget: BenchBudgetOption = ROUND_BUDGET_S,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Interleaved rounds; samples are pooled over "
                                        "them, and the rounds give each ratio's interval its drift.")] = ROUNDS,
    seed: SeedOption = 0,
    threads: ThreadsOption = None,
    lock_clocks: LockClocksOption = True,
    output_dir: OutputDirOption = Path("runs"),
) -> None:
    """Time (and evaluate) the model with no pruning, POMT, ToMe and Top-K, side by side in one run."""
    # The options' text first: a refusal then comes before torch is imported.
    batch_sizes = parse_int_list(batch_size, "--batch-size") if batch_size else None
    providers = parse_providers(ort_providers)
    from pomt_cli.cli.progress import RichReporter
    from pomt_cli.models import model_line
    from pomt_cli.pipelines import BenchSettings
    from pomt_cli.pipelines import bench as run_bench
    from pomt_cli.pruning import tome, topk

    out.print(model_line(model))
    given_method_r = [name for name, param in ((tome.Tome.name, "tome_r"), (topk.Topk.name, "topk_r"))
                      # By name: Typer may vendor click, with its own ParameterSource.
                      if getattr(ctx.get_parameter_source(param), "name", None) == "COMMANDLINE"]
    check_options([m.value for m in method], r, r_from, layer, data, limit, class_order, given_method_r)
    settings = BenchSettings(
        model=model, methods=[m.value for m in method], r=r, r_from=r_from, layer=layer,
        method_r={tome.Tome.name: tome_r, topk.Topk.name: topk_r},
        batch_sizes=batch_sizes, device=device,
        torch_device=torch_device, dtype=dtype, pretrained=pretrained, checkpoint=checkpoint,
        allow_random_weights=allow_random_weights, img_size=img_size, data=data, limit=limit,
        class_order=class_order and class_order.value,
        eval_batch_size=eval_batch_size, cuda_graphs=cuda_graphs, runtimes=runtime,
        ort_providers=providers,
        compile_backend=given(ctx, "compile_backend", compile_backend),
        rel_precision=rel_precision, budget_s=budget,
        rounds=rounds, seed=seed, threads=threads, lock_clocks=lock_clocks, output_dir=output_dir, command=ctx.obj,
    )
    with RichReporter() as reporter:
        result = run_bench(settings, reporter)
    render(result)
