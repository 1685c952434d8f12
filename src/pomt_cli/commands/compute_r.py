"""``pomt compute-r``: R, the tokens to prune, from a latency profile and an accuracy profile."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import typer
from pomt_cli.console import plain_console
from rich.table import Table

from pomt_cli.options import parse_int_list
from pomt_cli.formats.outputs import check_output_dir, output_stem, write_set
from pomt_cli.plots import plot_selection
from pomt_cli.formats.lookup import find_profile_pair
from pomt_cli.formats.report import Choice, Report, write_report
from pomt_cli.selection import SelectionSettings, compute_r as select_r

out = plain_console()

_CRITERION_TITLES = {
    "utility": "largest utility",
    "latency_budget": "most accurate within the latency budget",
    "max_accuracy_drop": "fastest within the accuracy drop",
}


def register(app: typer.Typer) -> None:
    app.command("compute-r")(compute_r)


def r_line(choice: Choice, num_tokens: int) -> str:
    """``R = 56 at layer 3 (n* = 141 of 197 tokens kept) at batch 4: predicted ...``."""
    where = "" if choice.layer is None else f" at layer {choice.layer}"
    line = f"R = {choice.R}{where} (n* = {choice.tokens} of {num_tokens} tokens kept) at batch {choice.batch_size}"
    return f"{line}: {prediction_text(choice)}"


def prediction_text(choice: Choice) -> str:
    """The predicted latency and saving of a choice, and which workload predicts them."""
    if not choice.pays:
        return (f"pruning does not pay here: no pruned point is faster than the unpruned model "
                f"({choice.latency_ms:.3f} ms predicted)")
    against = "the unpruned model" if choice.reference_tokens == choice.R + choice.tokens else (
        f"n = {choice.reference_tokens}")
    text = (f"predicted {choice.latency_ms:.3f} ms, {choice.latency_saved_pct:.1f}% less than {against}"
            + (f" ({choice.reference_ms:.3f} ms)" if choice.reference_ms is not None else ""))
    if choice.workload == "pomt":
        return f"{text}, measured on the real pruned model"
    return f"{text}, by the all-blocks proxy: the real saving will be smaller"


def candidates_table(candidates: pl.DataFrame, report: Report, batch_size: int) -> Table:
    """The best points of one batch size by the report's criterion, best first."""
    workload = ("the real pruned model" if report.workload == "pomt"
                else "the all-blocks proxy: the real saving will be smaller")
    table = Table(title=f"Best candidates at batch {batch_size} ({_CRITERION_TITLES[report.criterion]}); "
                        f"latency predicted by {workload}", title_justify="left")
    choice = report.choice_for(batch_size)
    unpruned = choice is None or choice.reference_tokens == report.num_tokens
    saved_header = "saved vs unpruned" if unpruned else f"saved vs n = {choice.reference_tokens}"
    layered = "layer" in candidates.columns and candidates["layer"].is_not_null().any()
    for name in (*(("layer",) if layered else ()), "n", "R", "predicted latency (ms)", saved_header,
                 "accuracy (%)", "accuracy lost (pts)", f"utility (\u03b1={report.alpha:g})"):
        table.add_column(name, justify="right")
    for row in candidates.iter_rows(named=True):
        table.add_row(
            *((str(row["layer"]),) if layered else ()),
            str(row["tokens"]), str(row["R"]), f"{row['latency_ms']:.3f}", f"{row['latency_saved_pct']:.1f}%",
            f"{row['accuracy']:.2f}", f"{row['accuracy_lost']:.2f}", f"{row['utility']:.4f}",
        )
    return table


def compute_r(
    latency: Path | None = typer.Option(
        None, "--latency", help="Latency profile (.parquet from pomt profile; default: the newest in --output-dir "
        "that matches the accuracy profile)."
    ),
    accuracy: Path | None = typer.Option(
        None, "--accuracy", help="Accuracy profile (.parquet from pomt estimate-accuracy; default: the newest in "
        "--output-dir that matches the latency profile)."
    ),
    alpha: float | None = typer.Option(
        None, "--alpha", help="Utility weight of latency in [0, 1] (default 0.5); n* maximises the utility."
    ),
    latency_budget: float | None = typer.Option(
        None, "--latency-budget", metavar="MS", help="Instead: the most accurate n whose latency is at most MS."
    ),
    max_accuracy_drop: float | None = typer.Option(
        None, "--max-accuracy-drop", metavar="PCT",
        help="Instead: the fastest n that loses at most PCT points of top-1 accuracy against the largest n.",
    ),
    batch_size: str | None = typer.Option(
        None, "--batch-size", help="Only these batch sizes of the latency profile, comma-separated (default: all)."
    ),
    output_dir: Path = typer.Option(
        Path("runs"), "--output-dir", help="Folder for the report and its plot, and where profiles not given are found."
    ),
) -> dict[str, Path]:
    """Choose R, the tokens to prune: where the latency saved pays for the accuracy lost."""
    settings = SelectionSettings.from_options(alpha, latency_budget, max_accuracy_drop)
    batch_sizes = parse_int_list(batch_size, "--batch-size") if batch_size is not None else None
    check_output_dir(output_dir)
    if latency is None or accuracy is None:
        found_latency, found_accuracy = find_profile_pair(output_dir, latency, accuracy)
        for label, given, path in (("latency", latency, found_latency), ("accuracy", accuracy, found_accuracy)):
            if given is None:
                out.print(f"{label} profile: {path} (the newest in {output_dir} that matches)", soft_wrap=True)
        latency, accuracy = found_latency, found_accuracy
    selection = select_r(latency, accuracy, settings, batch_sizes)
    report = selection.report
    stem = output_stem("compute_r", report.model, device=report.latency.device_preset,
                       batch_size=[c.batch_size for c in report.choices], dtype=report.latency.dtype)
    device = report.latency.device_display_name or report.latency.device_preset or "unknown device"
    title = (f"{report.model}, latency on {device} ({report.latency.dtype}), "
             f"accuracy estimator: {report.accuracy.estimator or '?'}")
    paths = write_set(output_dir, stem, {
        "json": lambda tmp: write_report(report, tmp),
        "png": lambda tmp: plot_selection(selection.curves, report, tmp, title=title),
    })
    json_path, png_path = paths["json"], paths["png"]

    for choice in report.choices:
        out.print(r_line(choice, report.num_tokens))
    for note in report.notes:
        out.print(f"note: {note}")
    for choice in report.choices:
        out.print(candidates_table(selection.candidates[choice.batch_size], report, choice.batch_size))
    out.print(f"report: {json_path}")
    out.print(f"plot:   {png_path}")
    return {"report": json_path, "plot": png_path}
