"""``pomt estimate-accuracy``: accuracy against kept tokens on labelled images, alone or under torchrun.

The library (torch, timm) is imported when the command runs, not when ``--help`` is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.table import Table

from pomt_cli.cli.options import (
    AllowRandomOption,
    CheckpointOption,
    ClassOrderOption,
    DtypeOption,
    Estimator,
    ImgSizeOption,
    LimitOption,
    ModelOption,
    OutputDirOption,
    TokensOption,
    parse_layers,
    seed_option,
)
from pomt_cli.console import plain_console, print_path
from pomt_cli.defaults import DEFAULT_MODEL
from pomt_cli.errors import PomtError
from pomt_cli.options import Dtype

if TYPE_CHECKING:
    from pomt_cli.accuracy.evaluate import AccuracyRun
    from pomt_cli.pipelines import AccuracyResult

out = plain_console()

#: What --seed seeds in estimate-accuracy: the random estimator's patch order.
OrderSeedOption = seed_option("Seeds the random estimator's patch order.")
#: Rows of the summary table (evenly spaced grid points, the ends included).
TABLE_ROWS = 12


def register(app: typer.Typer) -> None:
    app.command("estimate-accuracy", short_help="Accuracy against kept tokens on labelled images.")(estimate_accuracy)


def block_tokens_text(counts: list[int]) -> str:
    """Tokens entering each block, runs written once: ``[197, 197, 197, 141, 141]`` -> ``197x3 141x2``."""
    runs: list[list[int]] = []
    for n in counts:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return " ".join(f"{n}\u00d7{k}" if k > 1 else str(n) for n, k in runs)


def summary_table(run: AccuracyRun, rows: int = TABLE_ROWS) -> Table:
    """Accuracy at up to ``rows`` grid points per curve (per POMT layer), evenly spaced over the grid.

    It reads whole at 80 columns: the number columns are as wide as their widest cell and
    never wrap; only the tokens per block fold, between numbers.
    """
    from pomt_cli.accuracy.evaluate import describe

    layered = run.frame["layer"].is_not_null().any()
    cells = []
    for _, frame in run.frame.group_by("layer", maintain_order=True):
        count = min(rows, frame.height)
        picks = sorted({round(i * (frame.height - 1) / max(1, count - 1)) for i in range(count)})
        full = frame.row(0, named=True)
        for i in picks:
            row = frame.row(i, named=True)
            cells.append([
                *((str(row["layer"]),) if layered else ()),
                str(row["tokens"]), f"{row['accuracy']:.2f}", f"{row['accuracy'] - full['accuracy']:+.2f}",
                f"{row['top5']:.2f}", block_tokens_text(row["block_tokens"]),
            ])
    headers = [*(("layer",) if layered else ()), "kept n", "top-1 %", "change", "top-5 %", "tokens per block"]
    table = Table(title=describe(run.meta), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="change: top-1 against the largest n, in points; tokens per block: entering each block, "
                          "then leaving the last (197\u00d74: 197 four times)", caption_justify="left")
    for i, name in enumerate(headers):
        if name == "tokens per block":
            table.add_column(name, justify="left", overflow="fold", min_width=7)
        else:
            table.add_column(name, justify="right", no_wrap=True,
                             width=max([len(c[i]) for c in cells] + [len(name)]))
    for row in cells:
        table.add_row(*row)
    return table


def render(result: AccuracyResult) -> None:
    """Images, timings, skipped images and the summary table, then the files."""
    from pomt_cli.formats.accuracy import takes_layer

    run, meta = result.run, result.run.meta
    workers_note = f" in {result.world_size} processes" if result.world_size > 1 else ""
    layers = len(meta.layers or []) if takes_layer(meta.estimator) else 1
    points = f"{len(meta.grid)} grid points" + (f" \u00d7 {layers} layers" if layers > 1 else "")
    passes = run.local_images * len(meta.grid) * layers
    out.print(f"{meta.num_images} images of {meta.num_classes} classes, {points}{workers_note}: "
              f"decoded in {run.decode_s:.1f} s, evaluated in {run.evaluate_s:.1f} s "
              f"({passes / max(run.evaluate_s, 1e-9):.0f} image passes/s per process)")
    if meta.skipped:
        shown = "; ".join(f"{s.image} ({s.reason})" for s in meta.skipped[:3])
        more = f" and {len(meta.skipped) - 3} more" if len(meta.skipped) > 3 else ""
        out.print(f"skipped {len(meta.skipped)} unreadable image(s): {shown}{more} (all listed in the profile)")
    if meta.duplicates:
        from pomt_cli.accuracy.data import describe_duplicates

        line = describe_duplicates([(d.image, d.counted_as) for d in meta.duplicates])
        out.print(f"{line} (all listed in the profile)")
    out.print(summary_table(run))
    print_path(out, "accuracy profile:", result.profile)
    print_path(out, "plot:            ", result.plot)


def estimate_accuracy(
    ctx: typer.Context,
    data: Annotated[str, typer.Option(
        "--data", help="An image folder (one subfolder per class, e.g. ImageNet val), or 'digits' (bundled).")],
    model: ModelOption = DEFAULT_MODEL,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="timm's pretrained weights (local cache or the "
                                             "hub).")] = False,
    checkpoint: CheckpointOption = None,
    allow_random_weights: AllowRandomOption = False,
    img_size: ImgSizeOption = None,
    limit: LimitOption = None,
    class_order: ClassOrderOption = None,
    tokens: TokensOption = None,
    estimator: Annotated[Estimator, typer.Option(
        "--estimator", help="random (the paper's estimate), or the real method.")] = Estimator.random,
    layer: Annotated[str | None, typer.Option(
        "--layer", help="POMT's pruning blocks, comma-separated (for --estimator pomt; default 3): one curve "
        "each.")] = None,
    seed: OrderSeedOption = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 64,
    dtype: DtypeOption = Dtype.float32,
    torch_device: Annotated[str, typer.Option(
        "--torch-device", help="auto (CUDA when available), cpu, cuda, mps; under torchrun each rank its "
        "GPU.")] = "auto",
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, help="Image decoding threads (default: cores, at most 8).")] = None,
    output_dir: OutputDirOption = Path("runs"),
) -> None:
    """Estimate accuracy against kept tokens n on labelled images; the file that compute-r joins with a latency profile."""
    layers = parse_layers(layer)  # the options' text first: a refusal then comes before torch is imported
    from pomt_cli.accuracy.evaluate import EstimateConfig
    from pomt_cli.cli.progress import RichReporter
    from pomt_cli.formats.accuracy import takes_layer
    from pomt_cli.models import model_line
    from pomt_cli.pipelines import AccuracySettings
    from pomt_cli.pipelines import estimate_accuracy as run_estimate_accuracy

    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun the first process speaks for all
    if main_process:
        out.print(model_line(model))
    if layers is not None and not takes_layer(estimator.value):
        raise PomtError(f"--layer applies to --estimator pomt only; the {estimator.value} estimator has no layer: "
                        "leave out --layer or add --estimator pomt")
    layers = layers or [3]
    config = EstimateConfig(
        model=model, data=data, pretrained=pretrained, checkpoint=checkpoint, allow_random_weights=allow_random_weights,
        img_size=img_size, limit=limit, class_order=class_order and class_order.value, tokens=tokens,
        estimator=estimator.value, layer=layers[0], layers=layers,
        seed=seed, batch_size=batch_size, dtype=dtype, workers=workers,
    )
    settings = AccuracySettings(estimate=config, torch_device=torch_device, output_dir=output_dir, command=ctx.obj)
    with RichReporter() as reporter:
        result = run_estimate_accuracy(settings, reporter)
    if result is not None:
        render(result)
