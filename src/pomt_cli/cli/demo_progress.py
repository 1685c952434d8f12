"""What ``pomt demo`` shows while it runs: each step's rule and command line, its progress bars, then its results.

Imported by the demo command when it runs: it subclasses the pipelines' ``Reporter``, whose
module imports the library.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.rule import Rule

from pomt_cli.cli import bench, compute_r, estimate_accuracy, profile, refine
from pomt_cli.cli.progress import RichReporter, err
from pomt_cli.console import plain_console
from pomt_cli.pipelines import AccuracyResult, BenchResult, ComputeRResult, ProfileResult, RefineResult

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
