"""``pomt refine``: compute-r's best candidates measured again beside the unpruned model, and R chosen again.

The library (torch, timm) is imported when the command runs, not when ``--help`` is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.table import Table

from pomt_cli.cli.options import LockClocksOption, SeedOption, preset_path, presets_text, seconds, user_path
from pomt_cli.console import plain_console, print_path
from pomt_cli.defaults import REFINE_CANDIDATES, ROUND_BUDGET_S, ROUNDS
from pomt_cli.errors import PomtError

if TYPE_CHECKING:
    from pomt_cli.formats.report import Choice
    from pomt_cli.pipelines import RefineResult

out = plain_console()


def register(app: typer.Typer) -> None:
    app.command("refine", short_help="Time the best candidates side by side; choose R again.")(refine)


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def settings_table(result: RefineResult, batch_size: int) -> Table:
    """The settings measured at one batch size: profile ratio, refined ratio and interval, the choice."""
    table = Table(title=f"Batch {batch_size}, side by side; ratio: ms over the unpruned ms",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("layer", "R", "ms", "profile", "refined", "interval", "chosen"):
        table.add_column(name, justify="left" if name == "chosen" else "right", no_wrap=True)
    for row in result.rechoices[batch_size].table.iter_rows(named=True):
        pruned = row["R"] > 0
        interval = (f"{row['ratio_low']:.3f}-{row['ratio_high']:.3f}"
                    if pruned and row["ratio_low"] is not None and row["ratio_high"] is not None else "")
        table.add_row(str(row["layer"]) if pruned else "-", str(row["R"]), f"{row['ms']:.3f}",
                      _ratio(row["profile_ratio"]), _ratio(row["ratio"]), interval, "<-" if row["chosen"] else "")
    return table


def choice_line(choice: Choice, before: Choice | None) -> str:
    """``batch 32: R = 28 at layer 0, 14.2% less (...); compute-r chose R = 32 at layer 1: changed``."""
    if choice.R == 0:
        what = ("pruning does not pay here: no candidate measured faster than the unpruned model beyond its "
                "interval" if not choice.pays else "the unpruned model scores best")
    else:
        what = f"{100 * (1 - choice.latency_ratio):.1f}% less than the unpruned model measured side by side"
        if choice.latency_ratio_low is not None and choice.latency_ratio_high is not None:
            what += (f" ({100 * (1 - choice.latency_ratio_high):.1f}% to "
                     f"{100 * (1 - choice.latency_ratio_low):.1f}%)")
    line = f"batch {choice.batch_size}: {choice.setting_text}, {what}"
    if before is None:
        return line
    return f"{line}; compute-r chose {before.setting_text}: " + ("unchanged" if choice.same_setting(before)
                                                                   else "changed")


def render(result: RefineResult) -> None:
    """A table per batch size, the final choices against compute-r's, then the report."""
    for choice in result.report.choices:
        out.print(settings_table(result, choice.batch_size))
    before = {c.batch_size: c for c in result.before}
    for choice in result.report.choices:
        out.print(choice_line(choice, before.get(choice.batch_size)))
    print_path(out, "report:", result.path)
    if result.plot is not None:
        print_path(out, "plot:  ", result.plot)


def _check_rewritable(report: Path) -> None:
    """Refuse a folder given as the report, or a report whose folder refine cannot rewrite it in.

    Raises:
        PomtError: ``report`` is a folder, or its folder is not writable.
    """
    if report.is_dir():
        found = sorted(report.glob("compute_r_*.json"))
        hint = f", e.g. {found[0]}" if found else ""
        raise PomtError(f"report {report} is a folder: give the .json file written by pomt compute-r{hint}")
    folder = report.parent
    if report.is_file() and not os.access(folder, os.W_OK | os.X_OK):
        raise PomtError(f"cannot rewrite report {report}: its folder {folder} is not writable: copy the report to "
                        "a writable folder and refine the copy")


def refine(
    ctx: typer.Context,
    report: Annotated[Path, typer.Argument(
        callback=user_path, metavar="REPORT", help="The compute-r report (.json); rewritten in place.")],
    candidates: Annotated[int, typer.Option(
        "--candidates", min=1, help="Pruned candidates per batch size, the best by the report's criterion.")
    ] = REFINE_CANDIDATES,
    budget: Annotated[float, typer.Option(
        "--budget", min=0.001, callback=seconds, help="Seconds of timing per setting and round at most.")
    ] = ROUND_BUDGET_S,
    rounds: Annotated[int, typer.Option(
        "--rounds", min=1, help="Interleaved rounds; samples are pooled over them, and the rounds give each "
        "ratio's interval its drift.")] = ROUNDS,
    device: Annotated[str | None, typer.Option(
        "--device", callback=preset_path, help=f"Device preset ({presets_text()}) or a preset .toml file (default: the latency "
        "profile's).")] = None,
    torch_device: Annotated[str | None, typer.Option(
        "--torch-device", help="Torch device (cpu, cuda, cuda:1, mps; default: the latency profile's).")] = None,
    lock_clocks: LockClocksOption = True,
    threads: Annotated[int | None, typer.Option(
        "--threads", min=1, help="CPU threads for torch (default: the latency profile's).")] = None,
    seed: SeedOption = 0,
) -> None:
    """Measure compute-r's best candidates and the unpruned model side by side on the device, choose R again.

    The model, dtype, batch sizes, runtime and device are the latency profile's; the
    report (and its plot) is rewritten with the refined choice, which bench --r-from
    then predicts from.
    """
    from pomt_cli.cli.progress import RichReporter
    from pomt_cli.pipelines import RefineSettings
    from pomt_cli.pipelines import refine as run_refine

    _check_rewritable(report)
    settings = RefineSettings(report=report, candidates=candidates, budget_s=budget, rounds=rounds, device=device,
                              torch_device=torch_device, lock_clocks=lock_clocks, threads=threads, seed=seed,
                              command=ctx.obj)
    with RichReporter() as reporter:
        result = run_refine(settings, reporter)
    render(result)
