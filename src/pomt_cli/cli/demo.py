"""``pomt demo``: the whole pipeline on the bundled digits model and data, into one folder with a summary page.

The pipelines and the progress of their steps (:mod:`pomt_cli.cli.demo_progress`) are imported
when the command runs, not when ``--help`` is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.rule import Rule

from pomt_cli.cli.options import DeviceOption, TorchDeviceOption, output_path, seconds
from pomt_cli.console import plain_console, print_path
from pomt_cli.defaults import DEMO_BUDGET_S

out = plain_console()


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
    from pomt_cli.cli.demo_progress import DemoReporter
    from pomt_cli.pipelines import DemoSettings
    from pomt_cli.pipelines import demo as run_demo

    settings = DemoSettings(output_dir=output_dir, device=device, torch_device=torch_device, lock_clocks=lock_clocks,
                            budget_s=budget, command=ctx.obj)
    with DemoReporter() as reporter:
        result = run_demo(settings, reporter)
    out.print(Rule("done"))
    print_path(out, "summary:", result.summary, f" ({result.elapsed_s:.0f} s)")
