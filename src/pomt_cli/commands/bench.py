"""``pomt bench``: the pruned model against the baseline, ToMe and Top-K, side by side."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import polars as pl
import torch
import typer
from pomt_cli.console import plain_console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich import box
from rich.table import Table

from pomt_cli import __version__
from pomt_cli.bench import BASELINE, BenchProgress, BenchTiming, MethodSetting, accuracy_of_methods, bench_frame, fit_settings, time_methods
from pomt_cli.accuracy.data import load_labelled
from pomt_cli.devices.clocks import locked_clocks
from pomt_cli.devices.presets import default_preset_name, load_preset
from pomt_cli.devices.torch_device import device_name, resolve_torch_device
from pomt_cli.errors import PomtError
from pomt_cli.models import DEFAULT_MODEL, MODEL_HELP, create_model, model_line, vit_geometry, weights_source
from pomt_cli.options import SEED_MAX, parse_dtype, parse_int_list
from pomt_cli.formats.outputs import check_output_dir, output_stem, write_set
from pomt_cli.formats.common import command_line
from pomt_cli.pruning import method_names, tome, topk
from pomt_cli.pruning.registry import get as get_method
from pomt_cli.formats.report import Choice, read_report

#: POMT's pruning block when neither --layer nor a report's choice gives one.
DEFAULT_LAYER = 3

out = plain_console()
err = plain_console(stderr=True, soft_wrap=True)

METADATA_KEY = "pomt"


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)


def _r_per_batch(r: int | None, r_from: Path | None, model: str, batch_sizes: list[int] | None) -> tuple[dict[int, int] | None, list[int] | None, str | None]:
    """POMT's r for each batch size (from -r or a compute-r report), and the batch sizes to run."""
    if r is not None and r_from is not None:
        raise PomtError("give either -r or --r-from, not both")
    if r_from is None:
        return (None if r is None else {b: r for b in batch_sizes or [1]}), batch_sizes, None
    report = read_report(r_from, model=model)
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


def _layers_and_predictions(
    r_from: Path | None, layer: int | None, sizes: list[int], num_blocks: int, model: str,
) -> tuple[dict[int, int], dict[int, Choice]]:
    """POMT's layer per batch size (the report's choice, else --layer, else 3), and the report's choices.

    Raises:
        PomtError: --layer contradicts the layers a report chose, or a layer the model lacks.
    """
    choices = {}
    if r_from is not None:
        report = read_report(r_from, model=model)
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


def _from_report() -> list[str]:
    """The methods whose r comes from -r or --r-from, with the layer from --layer or the report (POMT)."""
    return [m for m in method_names() if get_method(m).bench_r is None]


def _predictions(plan: dict[int, list[MethodSetting]], choices: dict[int, Choice],
                 num_tokens: int) -> dict[tuple[int, str], tuple[float, str]]:
    """What the report predicts: the chosen POMT setting's latency, and the unpruned model's where it was measured."""
    predicted = {}
    for b, choice in choices.items():
        for s in plan[b]:
            if s.method in _from_report():
                predicted[(b, s.label)] = (choice.latency_ms, choice.workload)
            elif s.method == BASELINE and choice.reference_ms is not None and choice.reference_tokens == num_tokens:
                predicted[(b, s.label)] = (choice.reference_ms, choice.workload)
    return predicted


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("left"), TimeRemainingColumn(), console=err)


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    """A table whose numbers stay whole at 80 columns: number columns exactly as wide as their
    widest cell or header, only the text columns fold."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i, name in enumerate(columns):
        if name in ("method", "predicted by"):
            table.add_column(name, justify="left", overflow="fold")
        else:
            width = max([len(r[i]) for r in rows] + [len(name)])
            table.add_column(name, justify="right", width=width, no_wrap=True)
    for cells in rows:
        table.add_row(*cells)
    return table


def _render(frame: pl.DataFrame, title: str, with_accuracy: bool) -> list[Table]:
    """The report: a table of latency (and accuracy), and one of predictions when the run has them."""
    columns = ["batch", "method", "out", "ms", "p10-p90", "vs none"]
    if with_accuracy:
        columns += ["top-1", "Δ pts"]
    rows = []
    for row in frame.iter_rows(named=True):
        if row["latency_ms"] is None:
            latency, spread, change = "out of memory", "", ""
        else:
            latency, spread = f"{row['latency_ms']:.3f}", f"{row['p10_ms']:.3g}-{row['p90_ms']:.3g}"
            change = "" if row["method"] == BASELINE or row["latency_change_pct"] is None else (
                f"{row['latency_change_pct']:+.1f}%")
        cells = [str(row["batch_size"]), row["setting"], str(row["tokens_out"]), latency, spread, change]
        if with_accuracy:
            acc_change = "" if row["method"] == BASELINE or row["accuracy_change"] is None else f"{row['accuracy_change']:+.2f}"
            cells += [f"{row['accuracy']:.2f}", acc_change]
        rows.append(cells)
    legend = "out: tokens leaving the last block; ms: median, p10-p90 its spread" + (
        "; top-1 in %, Δ pts: its change against none" if with_accuracy else "")
    tables = [_table(title, columns, rows)]
    tables[0].caption, tables[0].caption_justify = legend, "left"
    predicted = frame.filter(pl.col("predicted_ms").is_not_null())
    if predicted.height:
        rows = []
        for row in predicted.iter_rows(named=True):
            by = {"pomt": "real pruned model", "proxy": "all-blocks proxy"}.get(row["predicted_by"] or "", "")
            rows.append([str(row["batch_size"]), row["setting"], f"{row['predicted_ms']:.3f}",
                         "" if row["latency_ms"] is None else f"{row['latency_ms']:.3f}",
                         "" if row["prediction_error"] is None else f"{row['prediction_error']:+.1%}", by])
        tables.append(_table("Predicted against measured (ms)", ["batch", "method", "predicted", "measured",
                                                                  "error", "predicted by"], rows))
    return tables


def bench(
    model: str = typer.Option(DEFAULT_MODEL, "--model", show_default=False, help=MODEL_HELP),
    method: list[str] = typer.Option(
        [], "--method",
        help=f"{', '.join(method_names())}; repeat for a comparison (default: all, pomt when -r or --r-from is "
        f"given). {BASELINE} is always included."
    ),
    r: int | None = typer.Option(None, "-r", "--r", help="POMT: tokens pruned in block --layer."),
    r_from: Path | None = typer.Option(None, "--r-from", help="POMT's R per batch size from a compute-r report (.json)."),
    layer: int | None = typer.Option(
        None, "--layer", help="POMT's pruning block (default: the report's choice with --r-from, else 3)."
    ),
    tome_r: int = typer.Option(
        8, "--tome-r", help="ToMe: tokens merged in every block, capped per block at half the non-prefix tokens (as ToMe)."
    ),
    topk_r: int = typer.Option(8, "--topk-r", help="Top-K: tokens pruned in every block."),
    batch_size: str | None = typer.Option(
        None, "--batch-size", help="Batch sizes, comma-separated (default: the report's with --r-from, else 1)."
    ),
    device: str | None = typer.Option(
        None, "--device",
        help="Device preset (orin, tx2, xavier, nvidia, a100, h100, cpu) or a .toml (default: nvidia with CUDA, else cpu).",
    ),
    torch_device: str | None = typer.Option(None, "--torch-device", help="Override the preset's torch device."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
    pretrained: bool = typer.Option(False, "--pretrained", help="timm's pretrained weights (needed for accuracy)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Weights from a .safetensors or .pth file."),
    allow_random_weights: bool = typer.Option(
        False, "--allow-random-weights", help="Measure accuracy with random weights anyway (it means nothing)."
    ),
    img_size: int | None = typer.Option(
        None, "--img-size", help="Input size in pixels, a multiple of the patch size (default: the model's)."
    ),
    data: str | None = typer.Option(None, "--data", help="Labelled images for accuracy: an image folder or 'digits'."),
    limit: int | None = typer.Option(None, "--limit", help="A deterministic class-balanced subset of this many images."),
    eval_batch_size: int = typer.Option(64, "--eval-batch-size", help="Images per forward pass for accuracy."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="Time CUDA graph replays (no launch overhead)."),
    rel_precision: float = typer.Option(0.01, "--rel-precision", help="Per round: stop once the median's 95% CI is within this fraction."),
    budget: float = typer.Option(2.0, "--budget", help="Seconds per method and round at most."),
    rounds: int = typer.Option(3, "--rounds", help="Interleaved rounds; samples are pooled over them."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Seeds the inputs and the methods' order in each round."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice)."),
    lock_clocks: bool = typer.Option(True, "--lock-clocks/--no-lock-clocks", help="Lock the device's clocks while timing."),
    output_dir: Path = typer.Option(Path("runs"), "--output-dir", help="Folder for the CSV and Parquet reports."),
) -> dict[str, Path]:
    """Time (and evaluate) the model with no pruning, POMT, ToMe and Top-K, side by side in one run."""
    out.print(model_line(model))
    names, from_report = method_names(), _from_report()
    defaults = [m for m in names if m not in from_report or r is not None or r_from is not None]
    methods = list(dict.fromkeys([BASELINE, *(method or defaults)]))
    unknown = [m for m in methods if m not in names]
    if unknown:
        raise PomtError(f"unknown --method {unknown[0]!r}: use one of {', '.join(names)}")
    # The methods' own r options; the others take their method's bench_r.
    r_options = {tome.Tome.name: tome_r, topk.Topk.name: topk_r}
    if not 0 < rel_precision < 1 or budget <= 0 or rounds < 1 or eval_batch_size < 1:
        raise PomtError("--rel-precision must lie in (0, 1); --budget must be positive; --rounds and --eval-batch-size at least 1")
    if threads is not None and threads < 1:
        raise PomtError(f"--threads {threads} must be at least 1")
    dtype_name, torch_dtype = parse_dtype(dtype)
    sizes = parse_int_list(batch_size, "--batch-size") if batch_size else None
    r_by_batch, sizes, report_path = _r_per_batch(r, r_from, model, sizes)
    sizes = sizes or [1]
    needing = [m for m in methods if m in from_report]
    if needing and r_by_batch is None:
        raise PomtError(f"--method {needing[0]} needs -r R or --r-from REPORT (from `pomt compute-r`)")
    if r_by_batch is not None:
        methods += [m for m in from_report if m not in methods]
    preset = load_preset(device or default_preset_name())
    tdev = resolve_torch_device(torch_device or preset.torch_device)
    if cuda_graphs and tdev.type != "cuda":
        raise PomtError(f"--cuda-graphs needs a CUDA device, but the torch device is {tdev}: leave it out")
    source = weights_source(model, pretrained=pretrained, checkpoint=checkpoint)
    if data is not None and source == "random" and not allow_random_weights:
        raise PomtError(f"{model} would have random weights, which make accuracy meaningless: give --pretrained or "
                        "--checkpoint PATH, leave out --data, or pass --allow-random-weights")
    check_output_dir(output_dir)
    if threads is not None:
        torch.set_num_threads(threads)
    net = create_model(model, pretrained=pretrained, checkpoint=checkpoint, img_size=img_size)
    g = vit_geometry(net)
    layers, choices = _layers_and_predictions(r_from, layer, sizes, g.num_blocks, model)

    # POMT's r may differ per batch size: one setting per distinct r.
    plan: dict[int, list[MethodSetting]] = {}
    for b in sizes:
        chosen = []
        for m in methods:
            if m in from_report and b in choices and r_by_batch[b] == 0:
                continue  # the report's answer is the unpruned model: the baseline carries its prediction
            elif m in from_report:
                chosen.append(MethodSetting(method=m, r=r_by_batch[b], layer=layers[b]))
            else:
                chosen.append(MethodSetting(method=m, r=r_options.get(m, get_method(m).bench_r)))
        plan[b] = fit_settings(net, chosen)  # checked; ToMe's per-block cap shows in the labels
    distinct = list({s.label: s for group in plan.values() for s in group}.values())
    listing = labelled = None
    if data is not None:
        listing, labelled = load_labelled(data, net, limit=limit)

    net = net.to(device=tdev, dtype=torch_dtype)
    timing = BenchTiming(dtype=torch_dtype, cuda_graphs=cuda_graphs, rel_precision=rel_precision, budget_s=budget,
                         rounds=rounds, seed=seed)
    with locked_clocks(preset, torch_device=tdev, enabled=lock_clocks) as clocks, _progress() as progress:
        task = progress.add_task("timing", total=None)

        def on_timed(event: BenchProgress) -> None:
            progress.update(task, completed=event.done, total=event.total,
                            description=f"timing batch {event.batch_size}, {event.method}, round {event.round + 1}")

        timed = time_methods(net, plan, timing, device=tdev, on_progress=on_timed)
    accuracy = None
    if labelled is not None:
        with _progress() as progress:
            task = progress.add_task("evaluating accuracy", total=len(distinct))
            accuracy = accuracy_of_methods(net, distinct, labelled, batch_size=eval_batch_size, device=tdev,
                                           dtype=torch_dtype, on_done=lambda _: progress.advance(task))
    frame = bench_frame(plan, timed, accuracy, _predictions(plan, choices, g.num_tokens))

    meta = {
        "kind": "bench", "format_version": 2, "model": model, "num_tokens": g.num_tokens, "num_prefix": g.num_prefix,
        "img_size": list(g.input_size[1:]), "img_size_option": img_size, "num_blocks": g.num_blocks, "dtype": dtype_name,
        "batch_sizes": sizes, "methods": methods,
        "settings": {str(b): [s.model_dump() for s in group] for b, group in plan.items()},
        "r_from": report_path, "weights": source, "data": listing.source if listing else None,
        "num_images": len(labelled) if labelled else None, "limit": limit,
        "skipped_images": len(labelled.skipped) if labelled else None,
        "device_preset": preset.name, "device_display_name": preset.display_name, "device_name": device_name(tdev),
        "torch_device": str(tdev), "clocks": clocks.model_dump(), "timing_mode": "cuda_graphs" if cuda_graphs else "eager",
        "rel_precision": rel_precision, "budget_s": budget, "rounds": rounds, "seed": seed,
        "num_threads": torch.get_num_threads(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": command_line(),
        "pomt_version": __version__, "torch_version": torch.__version__,
    }
    slugs = list(dict.fromkeys(s.slug for group in plan.values() for s in group))
    stem = output_stem("bench", model, device=preset.name, batch_size=sizes, dtype=dtype_name, img_size=img_size,
                       extra=(*slugs, *(["cudagraphs"] if cuda_graphs else [])))
    paths = write_set(output_dir, stem, {
        "csv": lambda tmp: frame.write_csv(tmp),
        "parquet": lambda tmp: frame.write_parquet(tmp, metadata={METADATA_KEY: json.dumps(meta)}),
    })
    csv, parquet = paths["csv"], paths["parquet"]

    title = (f"{model} on {preset.display_name} ({device_name(tdev)[:40]}), {dtype_name}, "
             f"{'CUDA graphs' if cuda_graphs else 'eager'}" + (f", {len(labelled)} images" if labelled else ""))
    if labelled is not None and labelled.skipped:
        out.print(f"skipped {len(labelled.skipped)} unreadable image(s), e.g. {labelled.skipped[0][0]}")
    for table in _render(frame, title, accuracy is not None):
        out.print(table)
    if frame["predicted_ms"].is_not_null().any():
        workload = next(c.workload for c in choices.values())
        out.print(f"predicted: by {r_from} from "
                  + ("the real pruned model's latency profile" if workload == "pomt" else
                     "the all-blocks proxy (every block at n; the real saving is smaller)")
                  + "; error = measured / predicted - 1")
    out.print(f"clocks: {clocks.mode} ({clocks.detail})" if clocks.detail else f"clocks: {clocks.mode}")
    out.print(f"report: {csv}")
    out.print(f"        {parquet}")
    return {"csv": csv, "parquet": parquet}
