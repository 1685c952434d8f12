"""``pomt compute-r``: R, the tokens to prune, from a latency profile and an accuracy profile.

The library (torch, polars) is imported when the command runs, not when ``--help`` is read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from pomt_cli.cli.options import output_path, parse_int_list, user_path
from pomt_cli.console import plain_console, print_path
from pomt_cli.defaults import DEFAULT_ALPHA
from pomt_cli.errors import PomtError

if TYPE_CHECKING:
    import polars as pl

    from pomt_cli.formats.report import Choice, Report
    from pomt_cli.pipelines import ComputeRResult
    from pomt_cli.selection import SelectionSettings

out = plain_console()

_CRITERION_TITLES = {
    "utility": "largest utility",
    "latency_budget": "most accurate within the latency budget",
    "max_accuracy_drop": "fastest within the accuracy drop",
}


def register(app: typer.Typer) -> None:
    app.command("compute-r", short_help="Choose R from a latency and an accuracy profile.")(compute_r)


def selection_settings(
    alpha: float | None = None,
    latency_budget_ms: float | None = None,
    max_accuracy_drop: float | None = None,
) -> SelectionSettings:
    """The criterion of the options ``--alpha``, ``--latency-budget`` and ``--max-accuracy-drop`` (one at most).

    Raises:
        PomtError: several criteria, alpha outside [0, 1], an accuracy drop outside
            [0, 100], or a latency budget that is not a positive finite number.
    """
    from pomt_cli.selection import SelectionSettings

    given = [name for name, value in (("--alpha", alpha), ("--latency-budget", latency_budget_ms),
                                      ("--max-accuracy-drop", max_accuracy_drop)) if value is not None]
    if len(given) > 1:
        raise PomtError(f"{' and '.join(given)} are different ways to choose n: give only one of them")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise PomtError(f"--alpha {alpha} must lie between 0 and 1 (1 weighs only latency, 0 only accuracy)")
    if latency_budget_ms is not None:
        if latency_budget_ms > 0 and not math.isfinite(latency_budget_ms):
            raise PomtError(f"--latency-budget {latency_budget_ms} is not a finite number: give milliseconds, e.g. 20")
        if not latency_budget_ms > 0:
            raise PomtError(f"--latency-budget {latency_budget_ms} must be a positive number of milliseconds")
        return SelectionSettings(criterion="latency_budget", latency_budget_ms=latency_budget_ms)
    if max_accuracy_drop is not None:
        if not max_accuracy_drop >= 0:
            raise PomtError(f"--max-accuracy-drop {max_accuracy_drop} must be at least 0 (percentage points "
                            "of top-1 accuracy; 0 allows no loss)")
        if max_accuracy_drop > 100:
            raise PomtError(f"--max-accuracy-drop {max_accuracy_drop} is more than the 100 points top-1 accuracy "
                            "spans: give at most 100")
        return SelectionSettings(criterion="max_accuracy_drop", max_accuracy_drop=max_accuracy_drop)
    return SelectionSettings(alpha=DEFAULT_ALPHA if alpha is None else alpha)


def r_line(choice: Choice, num_tokens: int, criterion: str = "utility") -> str:
    """``R = 56 at layer 3 (n* = 141 of 197 tokens kept) at batch 4: predicted ...``."""
    line = f"{choice.setting_text} (n* = {choice.tokens} of {num_tokens} tokens kept) at batch {choice.batch_size}"
    if choice.pays and choice.R == 0:
        # Pruned points pay, yet the criterion prefers the unpruned model: there is no saving to predict.
        return (f"{line}: no pruning: the unpruned model ({choice.latency_ms:.3f} ms) scores best "
                f"({_CRITERION_TITLES[criterion]})")
    return f"{line}: {prediction_text(choice)}"


def _percent_change(ratio: float) -> str:
    """``0.8`` -> ``20.0% less than``; ``1.074`` -> ``7.4% more than``."""
    if ratio > 1:
        return f"{100 * (ratio - 1):.1f}% more than"
    return f"{100 * (1 - ratio):.1f}% less than"


def prediction_text(choice: Choice) -> str:
    """The predicted latency and saving of a choice, and which workload predicts them."""
    if not choice.pays:
        against = "the unpruned model" if choice.R == 0 else f"n = {choice.reference_tokens}"
        return (f"pruning does not pay here: no pruned point is faster than {against} "
                f"({choice.latency_ms:.3f} ms predicted) beyond both intervals")
    if choice.latency_ratio is not None and choice.unpruned_ms is not None:
        # The saving bench checks: against the unpruned point of the chosen curve. A choice that
        # pays against the median of every layer's unpruned point may be slower than its own.
        slower = choice.latency_ratio > 1
        text = (f"predicted {choice.latency_ms:.3f} ms, {_percent_change(choice.latency_ratio)} the "
                f"unpruned model ({choice.unpruned_ms:.3f} ms)")
        if choice.latency_ratio_low is not None and choice.latency_ratio_high is not None:
            ends = (choice.latency_ratio_low - 1, choice.latency_ratio_high - 1) if slower else (
                1 - choice.latency_ratio_high, 1 - choice.latency_ratio_low)
            text += f" (interval {100 * ends[0]:.1f}% to {100 * ends[1]:.1f}%)"
    else:
        against = "the unpruned model" if choice.reference_tokens == choice.R + choice.tokens else (
            f"n = {choice.reference_tokens}")
        text = (f"predicted {choice.latency_ms:.3f} ms, {_percent_change(1 - choice.latency_saved_pct / 100)} "
                f"{against}" + (f" ({choice.reference_ms:.3f} ms)" if choice.reference_ms is not None else ""))
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
    if layered and choice is not None and choice.reference_ms is not None:
        # Two unpruned latencies are in play: the median of the layers' n = N points (this
        # column) and the chosen layer's own (the R line's saving, the ratio bench checks).
        caption = (f"{saved_header}: against {choice.reference_ms:.3f} ms, the median of every layer's "
                   f"n = {choice.reference_tokens} point")
        if choice.pays and choice.unpruned_ms is not None and choice.unpruned_ms != choice.reference_ms:
            caption += f"; the R line above: against layer {choice.layer}'s own, {choice.unpruned_ms:.3f} ms"
        table.caption, table.caption_justify = caption, "left"
    for row in candidates.iter_rows(named=True):
        table.add_row(
            # R = 0 is the unpruned model, whatever the layer: its latency is the median above.
            *(("-" if row["R"] == 0 else str(row["layer"]),) if layered else ()),
            str(row["tokens"]), str(row["R"]), f"{row['latency_ms']:.3f}", f"{row['latency_saved_pct']:.1f}%",
            f"{row['accuracy']:.2f}", f"{row['accuracy_lost']:.2f}", f"{row['utility']:.4f}",
        )
    return table


def render(result: ComputeRResult) -> None:
    """R per batch size, the notes, the best candidates, then the files."""
    report = result.selection.report
    for choice in report.choices:
        out.print(r_line(choice, report.num_tokens, report.criterion))
    for note in report.notes:
        if ": pruning does not pay here: " not in note:  # the R line says it
            out.print(f"note: {note}")
    for choice in report.choices:
        out.print(candidates_table(result.selection.candidates[choice.batch_size], report, choice.batch_size))
    if report.workload == "pomt":
        out.print(f"measure the choices again side by side on the device: pomt refine {result.report}")
    print_path(out, "report:", result.report)
    print_path(out, "plot:  ", result.plot)


def compute_r(
    ctx: typer.Context,
    latency: Annotated[Path | None, typer.Option(
        "--latency", callback=user_path, help="Latency profile (.parquet from pomt profile; default: the newest in --output-dir "
        "that matches the accuracy profile).")] = None,
    accuracy: Annotated[Path | None, typer.Option(
        "--accuracy", callback=user_path, help="pomt estimate-accuracy's profile (.parquet; default: the newest in "
        "--output-dir that matches the latency profile).")] = None,
    alpha: Annotated[float | None, typer.Option(
        "--alpha", help=f"Utility weight of latency in [0, 1] (default {DEFAULT_ALPHA:g}); n* maximises the "
        "utility.")] = None,
    latency_budget: Annotated[float | None, typer.Option(
        "--latency-budget", metavar="MS", help="Instead: the most accurate n whose latency is at most MS.")] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(
        "--max-accuracy-drop", metavar="PCT",
        help="Instead: the fastest n that loses at most PCT points of top-1 accuracy against the largest n.")] = None,
    batch_size: Annotated[str | None, typer.Option(
        "--batch-size", help="Only these batch sizes of the latency profile, comma-separated (default: all).")] = None,
    output_dir: Annotated[Path, typer.Option(
        "--output-dir", callback=output_path, help="Folder for the report and its plot, and where profiles not given are found.")
    ] = Path("runs"),
) -> None:
    """Choose R, the tokens to prune: where the latency saved pays for the accuracy lost."""
    # The options' text first: a refusal then comes before torch is imported.
    batch_sizes = parse_int_list(batch_size, "--batch-size") if batch_size is not None else None
    from pomt_cli.cli.progress import RichReporter
    from pomt_cli.pipelines import ComputeRSettings
    from pomt_cli.pipelines import compute_r as run_compute_r

    settings = ComputeRSettings(
        latency=latency, accuracy=accuracy, selection=selection_settings(alpha, latency_budget, max_accuracy_drop),
        batch_sizes=batch_sizes,
        output_dir=output_dir, command=ctx.obj,
    )
    with RichReporter(notes_to_stdout=True) as reporter:
        result = run_compute_r(settings, reporter)
    render(result)
