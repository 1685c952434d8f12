"""The CLI's progress bars: what a user sees on a terminal 80 columns wide."""

from __future__ import annotations

import io

from rich.console import Console

from pomt_cli.accuracy.evaluate import EvalProgress
from pomt_cli.bench import BenchProgress
from pomt_cli.cli import progress as progress_module
from pomt_cli.cli.progress import RichReporter
from pomt_cli.measure.grid import GridProgress


def rendered(reporter: RichReporter, width: int) -> list[str]:
    """The progress bars' lines as a terminal ``width`` columns wide shows them."""
    bars = reporter._progress
    console = Console(width=width, file=io.StringIO(), color_system=None, record=True)
    console.print(bars.make_tasks_table(bars.tasks))
    return [line.rstrip() for line in console.export_text().splitlines()]


def test_bars_counts_and_times_fit_80_columns_and_a_long_description_is_cut(monkeypatch):
    monkeypatch.setattr(progress_module, "err", Console(file=io.StringIO(), width=80))
    reporter = RichReporter()
    reporter.grid(GridProgress("remeasure", 32, 123, 120, 392, layer=3))
    reporter.evaluating(EvalProgress(done=5, total=20, images=64, running=[(197, 79.14), (17, 12.3)]))
    reporter.timing(BenchProgress(done=3, total=12, batch_size=64, method="pomt r=56 @3 (capped from block 11)",
                                  round=1))
    for width in (80, 120):
        lines = rendered(reporter, width)
        assert len(lines) == 3 and all(len(line) <= width for line in lines)
        for line, count in zip(lines, ("120/392", "5/20", "3/12")):
            assert count in line and " left " in line and "\u2501" in line  # the bar, the count, the time left
    lines = rendered(reporter, 80)
    assert lines[0].startswith("re-measuring layer 3, batch 32, n=123")
    assert lines[1].startswith("evaluating: n=197 79.1%, n=17 12.3%")
    assert lines[2].startswith("timing batch 64, pomt r=56 @3 (capped") and "\u2026" in lines[2]
    assert "round 2" in rendered(reporter, 120)[2]
    reporter.close()


def test_an_error_after_bars_leaves_nothing_in_a_file_so_that_its_line_is_the_only_one(monkeypatch):
    # Standard error redirected to a file: the error line (printed after the reporter) must be the
    # only line there, with no empty line from the bars before it.
    stream = io.StringIO()
    monkeypatch.setattr(progress_module, "err", Console(file=stream, width=80))
    try:
        with RichReporter() as reporter:
            reporter.grid(GridProgress("measure", 1, 65, 3, 16))
            raise RuntimeError("restoring the clocks failed")
    except RuntimeError:
        pass
    assert stream.getvalue() == ""
    # Without an error the bars' last state stays in the file, on its own line.
    with RichReporter() as reporter:
        reporter.grid(GridProgress("measure", 1, 65, 3, 16))
    assert stream.getvalue().startswith("measuring batch 1, n=65") and stream.getvalue().endswith("\n")
