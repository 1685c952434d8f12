"""``pomt estimate-accuracy``: accuracy against kept tokens on labelled images, alone or under torchrun."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from pomt_cli.console import plain_console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich import box
from rich.table import Table

from pomt_cli.accuracy.distributed import processes
from pomt_cli.accuracy.evaluate import AccuracyRun, EstimateConfig, EvalProgress, describe, run_estimate, write_accuracy
from pomt_cli.formats.accuracy import estimators, takes_layer
from pomt_cli.errors import PomtError
from pomt_cli.models import DEFAULT_MODEL, MODEL_HELP, model_line
from pomt_cli.options import SEED_MAX, parse_int_list
from pomt_cli.formats.outputs import check_output_dir

out = plain_console()
err = plain_console(stderr=True, soft_wrap=True)

#: Rows of the summary table (evenly spaced grid points, the ends included).
TABLE_ROWS = 12


def register(app: typer.Typer) -> None:
    app.command("estimate-accuracy")(estimate_accuracy)


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
                  caption="change: top-1 against the largest n, in points; tokens per block: entering each block "
                          "(197\u00d74: 197 in four blocks)", caption_justify="left")
    for i, name in enumerate(headers):
        if name == "tokens per block":
            table.add_column(name, justify="left", overflow="fold", min_width=7)
        else:
            table.add_column(name, justify="right", no_wrap=True,
                             width=max([len(c[i]) for c in cells] + [len(name)]))
    for row in cells:
        table.add_row(*row)
    return table


def _running(event: EvalProgress) -> str:
    first, last = event.running[0], event.running[-1]
    text = f"n={first[0]}: {first[1]:.1f}%"
    return text if len(event.running) == 1 else f"{text}, n={last[0]}: {last[1]:.1f}%"


def estimate_accuracy(
    model: str = typer.Option(DEFAULT_MODEL, "--model", show_default=False, help=MODEL_HELP),
    data: str = typer.Option(
        ..., "--data", help="An image folder (one subfolder per class, e.g. ImageNet val), or 'digits' (bundled)."
    ),
    pretrained: bool = typer.Option(False, "--pretrained", help="timm's pretrained weights (local cache or the hub)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Weights from a .safetensors or .pth file."),
    allow_random_weights: bool = typer.Option(
        False, "--allow-random-weights", help="Evaluate random weights anyway (the accuracy means nothing)."
    ),
    img_size: int | None = typer.Option(
        None, "--img-size", help="Input size in pixels, a multiple of the patch size (default: the model's)."
    ),
    limit: int | None = typer.Option(None, "--limit", help="A deterministic class-balanced subset of this many images."),
    tokens: str | None = typer.Option(
        None, "--tokens", help="Grid START:STOP:STRIDE of kept tokens n, inclusive (default: every n the estimator reaches)."
    ),
    estimator: str = typer.Option(
        "random", "--estimator", help="random (the paper's estimate), or the real method: " + ", ".join(estimators()[1:]) + "."
    ),
    layer: str | None = typer.Option(
        None, "--layer", help="POMT's pruning blocks, comma-separated (for --estimator pomt; default 3): one curve each."
    ),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Seeds the random tokens (the same per image and n in every run)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
    torch_device: str = typer.Option(
        "auto", "--torch-device", help="auto (CUDA when available), cpu, cuda, mps; under torchrun each rank its GPU."
    ),
    workers: int | None = typer.Option(None, "--workers", help="Image decoding threads (default: cores, at most 8)."),
    output_dir: Path = typer.Option(Path("runs"), "--output-dir", help="Folder for the accuracy profile and its plot."),
) -> dict[str, Path]:
    """Estimate accuracy against kept tokens n on labelled images; the file that compute-r joins with a latency profile."""
    if os.environ.get("RANK", "0") == "0":  # under torchrun the first process speaks for all
        out.print(model_line(model))
    if estimator not in estimators():
        raise PomtError(f"unknown --estimator {estimator!r}: use one of {', '.join(estimators())}")
    if batch_size < 1:
        raise PomtError(f"--batch-size {batch_size} must be at least 1")
    if layer is not None and not takes_layer(estimator):
        raise PomtError(f"--layer applies to --estimator pomt only; the {estimator} estimator has no layer: "
                        "leave out --layer or add --estimator pomt")
    layers = parse_int_list(layer, "--layer", minimum=-(2**31)) if layer is not None else [3]
    if workers is not None and workers < 1:
        raise PomtError(f"--workers {workers} must be at least 1")
    check_output_dir(output_dir)
    config = EstimateConfig(
        model=model, data=data, pretrained=pretrained, checkpoint=checkpoint, allow_random_weights=allow_random_weights,
        img_size=img_size, limit=limit, tokens=tokens, estimator=estimator, layer=layers[0], layers=layers, seed=seed, batch_size=batch_size, dtype=dtype,
        workers=workers,
    )
    with processes(torch_device) as procs:
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[running]}"),
            console=err, disable=not procs.is_main,
        )
        decode = progress.add_task("decoding images", total=None, running="")
        evaluate = progress.add_task("evaluating", total=None, running="", visible=False)

        def on_decode(done: int, total: int) -> None:
            # The bar starts with the first image, after the options, data and weights were checked.
            if not progress.live.is_started:
                progress.start()
            progress.update(decode, completed=done, total=total)

        def on_progress(event: EvalProgress) -> None:
            progress.update(evaluate, completed=event.done, total=event.total, visible=True,
                            running=f"top-1 so far {_running(event)}")

        try:
            run = run_estimate(config, procs, on_decode=on_decode, on_progress=on_progress)
        finally:
            if progress.live.is_started:
                progress.stop()
        if not procs.is_main:
            return {}
        parquet, png = write_accuracy(run, output_dir)
    meta = run.meta
    workers_note = f" in {procs.world_size} processes" if procs.world_size > 1 else ""
    out.print(f"{meta.num_images} images of {meta.num_classes} classes, {len(meta.grid)} grid points{workers_note}: "
              f"decoded in {run.decode_s:.1f} s, evaluated in {run.evaluate_s:.1f} s "
              f"({run.local_images * len(meta.grid) / max(run.evaluate_s, 1e-9):.0f} image passes/s per process)")
    if meta.skipped:
        shown = "; ".join(f"{s.image} ({s.reason})" for s in meta.skipped[:3])
        more = f" and {len(meta.skipped) - 3} more" if len(meta.skipped) > 3 else ""
        out.print(f"skipped {len(meta.skipped)} unreadable image(s): {shown}{more} (all listed in the profile)")
    out.print(summary_table(run))
    out.print(f"accuracy profile: {parquet}")
    out.print(f"plot:             {png}")
    return {"profile": parquet, "plot": png}
