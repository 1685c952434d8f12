"""``pomt demo``: the whole pipeline on the bundled digits model and data, into one folder with a summary page."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.rule import Rule

from pomt_cli.cli import bench, compute_r, estimate_accuracy, profile, refine
from pomt_cli.cli.options import DeviceOption, TorchDeviceOption, output_path, seconds
from pomt_cli.cli.progress import RichReporter, err
from pomt_cli.console import plain_console, print_path
from pomt_cli.pipelines import (
    DEMO_BUDGET_S,
    AccuracyResult,
    BenchResult,
    ComputeRResult,
    DemoSettings,
    ProfileResult,
    RefineResult,
)
from pomt_cli.pipelines import demo as run_demo

out = plain_console()

#: How each step's result is shown: as its own command shows it.
_RENDER = {ProfileResult: profile.render, AccuracyResult: estimate_accuracy.render,
           ComputeRResult: compute_r.render, RefineResult: refine.render,
           BenchResult: bench.render}


class DemoReporter(RichReporter):
    """Progress bars as each command draws them, a rule before each step and its results after it."""

    def step(self, title: str, args: Sequence[str]) -> None:
        self.close()
        out.print(Rule(f"pomt {args[0]}: {title}"))
        out.print("$ pomt " + " ".join(args), style="dim")

    def finished(self, result: object) -> None:
        self.close()
        _RENDER[type(result)](result)

    def interrupted(self, saved: int, path: Path) -> None:
        # demo has no --resume: a rerun starts over, the profile step's command resumes alone.
        self.close()
        err.print(f"interrupted: {saved} points saved in {path}; pomt demo starts over when run again (or add "
                  f"--resume {path} to the pomt profile command above to continue that profile alone)")


def register(app: typer.Typer) -> None:
    app.command("demo", short_help="The whole pipeline on the bundled digits model.")(demo)


def demo(
    ctx: typer.Context,
    output_dir: Annotated[Path, typer.Option(
        "--output-dir", callback=output_path, help="Folder for every file and the summary.")] = Path("runs/demo"),
    device: DeviceOption = None,
    torch_device: TorchDeviceOption = None,
    lock_clocks: Annotated[bool, typer.Option(
        "--lock-clocks/--no-lock-clocks", help="Lock the device's clocks while timing (needs root).")] = False,
    budget: Annotated[float, typer.Option(
        "--budget", min=0.001, callback=seconds, help="Seconds of timing per profile point at most (refine: as long "
        "per setting and round; bench: twice as long per method and round; six rounds each).")] = DEMO_BUDGET_S,
) -> None:
    """Run profile, estimate-accuracy, compute-r, refine and bench on the bundled digits model; write a summary."""
    settings = DemoSettings(output_dir=output_dir, device=device, torch_device=torch_device, lock_clocks=lock_clocks,
                            budget_s=budget, command=ctx.obj)
    with DemoReporter() as reporter:
        result = run_demo(settings, reporter)
    out.print(Rule("done"))
    print_path(out, "summary:", result.summary, f" ({result.elapsed_s:.0f} s)")
