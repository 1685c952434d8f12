"""Progress bars and notes on standard error: the CLI's :class:`~pomt_cli.pipelines.Reporter`."""

from __future__ import annotations

import shlex
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

from pomt_cli.accuracy.evaluate import EvalProgress
from pomt_cli.bench import BenchProgress
from pomt_cli.console import plain_console
from pomt_cli.measure.grid import GridProgress
from pomt_cli.pipelines import Reporter

err = plain_console(stderr=True, soft_wrap=True)

#: Characters of the progress bar itself.
BAR_WIDTH = 10


def resume_command(command: str, path: Path) -> str:
    """``command`` (a ``pomt profile`` line) with ``--resume path`` in place of any ``--resume`` it had.

    ``--resume`` needs the options of the run it continues, so the hint repeats them all.
    """
    args: list[str] = []
    words = iter(shlex.split(command))
    for word in words:
        if word == "--resume":
            next(words, None)
        elif not word.startswith("--resume="):
            args.append(word)
    return shlex.join([*args, "--resume", str(path)])


class RichReporter(Reporter):
    """Draws one progress bar per phase on standard error, started with the phase's first event."""

    def __init__(self, *, notes_to_stdout: bool = False, command: str | None = None) -> None:
        """``command``: the command line being run; an interrupted profile's hint repeats it with ``--resume``."""
        self._command = command
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._notes = plain_console(soft_wrap=True) if notes_to_stdout else err

    def _task(self, name: str, description: str) -> tuple[Progress, TaskID]:
        if self._progress is None:
            # The bar, the counts and the times keep their width; the description takes what is
            # left of the line and is cut with an ellipsis, so that 80 columns show everything.
            self._progress = Progress(
                TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
                BarColumn(bar_width=BAR_WIDTH), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("left"),
                TimeRemainingColumn(), console=err, expand=True,
            )
            self._progress.start()
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(description, total=None)
        return self._progress, self._tasks[name]

    def close(self) -> None:
        """Stop the bars (before the results are printed)."""
        if self._progress is not None:
            if self._progress.live.transient and not self._progress.console.is_interactive:
                # Nothing is left in a file or pipe; Progress.stop would still end it with an empty line.
                self._progress.live.stop()
            else:
                self._progress.stop()
        self._progress, self._tasks = None, {}

    def __enter__(self) -> RichReporter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and self._progress is not None:
            self._progress.live.transient = True  # an error is one line: no bar is left above it
        self.close()

    def note(self, text: str) -> None:
        self.close()
        self._notes.print(text)

    def grid(self, event: GridProgress) -> None:
        progress, task = self._task("grid", "starting")
        if event.frame is None:
            verb = {"measure": "measuring", "remeasure": "re-measuring", "export": "exporting",
                    "compile": "compiling"}[event.phase]
            where = "" if event.layer is None else f"layer {event.layer}, "
            progress.update(task, total=event.total, completed=event.done,
                            description=f"{verb} {where}batch {event.batch_size}, n={event.tokens}")
        else:
            progress.update(task, total=event.total, completed=event.done)

    def interrupted(self, saved: int, path: Path) -> None:
        self.close()
        how = (f"continue with: {resume_command(self._command, path)}" if self._command
               else f"continue with the same options and --resume {path}")
        err.print(f"interrupted: {saved} points saved in {path}; {how}")

    def decoding(self, done: int, total: int) -> None:
        progress, task = self._task("decode", "decoding images")
        progress.update(task, completed=done, total=total)

    def evaluating(self, event: EvalProgress) -> None:
        progress, task = self._task("evaluate", "evaluating")
        first, last = event.running[0], event.running[-1]
        running = f"n={first[0]} {first[1]:.1f}%"
        if len(event.running) > 1:
            running += f", n={last[0]} {last[1]:.1f}%"
        progress.update(task, completed=event.done, total=event.total, description=f"evaluating: {running}")

    def timing(self, event: BenchProgress) -> None:
        if event.preparing:
            verb = "exporting" if event.runtime == "onnxruntime" else "compiling"
            progress, task = self._task("preparing", "making ready")
            progress.update(task, completed=event.done, total=event.total,
                            description=f"{verb} batch {event.batch_size}, {event.method}")
            return
        progress, task = self._task("timing", "timing")
        where = "" if event.runtime == "eager" else f"{event.runtime}, "
        progress.update(task, completed=event.done, total=event.total,
                        description=f"timing batch {event.batch_size}, {where}{event.method}, round {event.round + 1}")

    def scoring(self, done: int, total: int) -> None:
        progress, task = self._task("scoring", "evaluating accuracy")
        progress.update(task, completed=done, total=total)
