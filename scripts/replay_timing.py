"""Replay recorded samples through pomt's own stopping rule: what other settings would cost.

    python scripts/replay_timing.py REPORT.json [--run NAME] [--rel-precision 0.01] [--budget 1.0]
        [--min-samples 10] [--warmup 3] [--passes 2]

REPORT.json is a report of ``scripts/gpu_report.py`` whose engine section recorded every
visit of a 25-point grid: each visit's samples in order, its warm-up calls and the
seconds it spent. Each point's recorded samples, all its visits in order, form one
stream. The replay visits each point ``passes`` times as the grid does (budget / passes
and ceil(min_samples / passes) per visit, ``warmup`` untimed calls on the first visit
and one on later ones, the earlier visits' samples as the prior) and calls
:func:`pomt_cli.measure.timing.measure` itself on the CPU with a fake clock: a timed call
returns the stream's next sample and advances the clock by it; a warm-up call advances
it by the recorded warm-up cost (the visit's untimed seconds over its warm-up calls). So
the rule is the real one. A point whose stream runs out before the rule stops is
reported as ``short``, its seconds then a lower bound.

Per point: how the replay ended, its timed and warm-up calls, its seconds, the median it
stopped at and the median of all the recorded samples (the error is the difference). The
total for a full profile (n = 2 to the largest recorded n) interpolates the seconds per
point linearly in n between the recorded points (the value at n = 5 for n < 5). Not
replayed: the grid's re-measuring visits (they depend on the whole grid's neighbours),
the first measurement per batch size and loading the model; the recorded run's own
figures for these are printed under the table.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pomt_cli.measure.timing import Measurement, measure
from pomt_cli.script_args import OneLineParser


#: The most timed calls ``measure`` makes at one point.
MAX_SAMPLES: int = inspect.signature(measure).parameters["max_samples"].default


class Exhausted(Exception):
    """The recording has no sample left for a timed call."""


@dataclass(frozen=True)
class Recording:
    """One grid point's recorded visits: all samples in order, warm-up seconds per call per visit."""

    tokens: int
    samples_ms: tuple[float, ...]
    warmup_s: tuple[float, ...]


@dataclass(frozen=True)
class Settings:
    rel_precision: float = 0.01
    budget_s: float = 1.0
    min_samples: int = 10
    warmup: int = 3
    passes: int = 2


@dataclass(frozen=True)
class Replayed:
    """What the rule did with one point: ``ok``, ``budget`` or ``short`` (the recording ran out)."""

    tokens: int
    status: str
    timed: int
    warmup: int
    seconds: float
    median_ms: float
    all_median_ms: float

    @property
    def error(self) -> float:
        return self.median_ms / self.all_median_ms - 1


def recordings(run: dict) -> list[Recording]:
    """Per point of an engine run, in descending n: its samples and warm-up costs, visit by visit."""
    samples: dict[int, list[float]] = {}
    warm: dict[int, list[float]] = {}
    for v in run["visits"]:
        if v["status"] == "oom" or not v["samples_ms"]:
            continue
        samples.setdefault(v["n"], []).extend(v["samples_ms"])
        untimed_s = max(0.0, v["measure_s"] - sum(v["samples_ms"]) / 1e3)
        # At least a microsecond, so that the fake clock always moves.
        warm.setdefault(v["n"], []).append(max(1e-6, untimed_s / max(1, v["warmup_calls"])))
    return [Recording(n, tuple(samples[n]), tuple(warm[n])) for n in sorted(samples, reverse=True)]


class Replay:
    """A fake clock and the workload that advances it: ``warm`` warm-up calls, then the stream."""

    def __init__(self, stream: Iterator[float], warm: int, warm_cost_s: float) -> None:
        self.now = 0.0
        self.stream = stream
        self.warm = warm
        self.warm_cost_s = warm_cost_s
        self.warmed = 0
        self.taken: list[float] = []

    def clock(self) -> float:
        return self.now

    def call(self) -> None:
        if self.warmed < self.warm:
            self.warmed += 1
            self.now += self.warm_cost_s
            return
        sample = next(self.stream, None)
        if sample is None:
            raise Exhausted
        self.taken.append(sample)
        self.now += sample / 1e3


def visit(stream: Iterator[float], warm_cost_s: float, prior: tuple[float, ...],
          **kwargs) -> tuple[Measurement | None, Replay]:
    """One visit through ``measure``; the Measurement is None when the stream ran out."""
    # The warm-up phase depends only on the clock: a run on warm-up costs alone finds how
    # many warm-up calls measure makes, so the replay can hand it samples after them.
    dry = Replay(iter(()), sys.maxsize, warm_cost_s)
    warm = measure(dry.call, device="cpu", clock=dry.clock, prior_ms=prior, **kwargs).warmup_calls
    replay = Replay(stream, warm, warm_cost_s)
    try:
        return measure(replay.call, device="cpu", clock=replay.clock, prior_ms=prior, **kwargs), replay
    except Exhausted:
        return None, replay


def replay_point(rec: Recording, s: Settings) -> Replayed:
    """The point visited ``passes`` times as the grid visits it, its samples pooled."""
    stream = iter(rec.samples_ms)
    taken: list[float] = []
    seconds, warm_calls, status = 0.0, 0, "budget"
    pooled: Measurement | None = None
    for k in range(s.passes):
        m, replay = visit(stream, rec.warmup_s[min(k, len(rec.warmup_s) - 1)], tuple(taken),
                          rel_precision=s.rel_precision, budget_s=s.budget_s / s.passes,
                          min_samples=-(-s.min_samples // s.passes),
                          warmup=s.warmup if k == 0 else min(1, s.warmup))
        taken += replay.taken
        seconds += replay.now
        warm_calls += replay.warmed
        if m is None:
            status = "short"
            break
        pooled = m if pooled is None else Measurement.pool([pooled, m])
        status = pooled.status
    median = float(np.median(taken)) if taken else math.nan
    return Replayed(rec.tokens, status, len(taken), warm_calls, seconds, median,
                    float(np.median(rec.samples_ms)))


def full_profile_s(points: list[Replayed]) -> float:
    """Seconds of a full profile (n = 2 .. the largest n), interpolated linearly in n."""
    ns = np.array([p.tokens for p in points][::-1], dtype=float)
    secs = np.array([p.seconds for p in points][::-1])
    return float(np.interp(np.arange(2, ns.max() + 1), ns, secs).sum())


def table(run: dict, points: list[Replayed], s: Settings) -> Table:
    title = (f"{run['name']}: --rel-precision {s.rel_precision:g} --budget {s.budget_s:g}\n"
             f"--min-samples {s.min_samples} --warmup {s.warmup} --passes {s.passes}")
    t = Table(title=title, title_justify="left")
    for name in ("n", "end", "timed", "warm", "seconds", "median ms", "all ms", "error"):
        t.add_column(name, justify="left" if name == "end" else "right")
    for p in points:
        t.add_row(str(p.tokens), p.status, str(p.timed), str(p.warmup), f"{p.seconds:.3f}",
                  f"{p.median_ms:.4f}", f"{p.all_median_ms:.4f}", f"{100 * p.error:+.2f}%")
    return t


def summary(run: dict, points: list[Replayed]) -> list[str]:
    worst = max(points, key=lambda p: abs(p.error))
    over = sum(abs(p.error) > 0.01 for p in points)
    short = [p.tokens for p in points if p.status == "short"]
    again = [v for v in run["visits"] if v["phase"] == "remeasure" and v.get("samples_ms")]
    lines = [
        f"{len(points)} points: {sum(p.seconds for p in points):.2f} s; a full profile "
        f"(n = 2..{points[0].tokens}): {full_profile_s(points):.1f} s predicted",
        f"error against all recorded samples: largest {100 * worst.error:+.2f}% (n = {worst.tokens}), "
        f"{over} points beyond 1%",
        f"not replayed, as recorded: {len(again)} re-measuring visits "
        f"{sum(v['wall_s'] for v in again):.2f} s; outside visits {run['summary']['outside_visits_s']:.2f} s "
        f"of {run['wall_s']:.2f} s",
    ]
    if short:
        lines.append(f"recording ran out (seconds a lower bound) at n = {', '.join(map(str, short))}")
    return lines


def engine_runs(path: Path) -> list[dict]:
    report = json.loads(path.read_text())
    engine = report.get("engine", report)
    return engine.get("results", engine)["runs"]


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a gpu_report.py report.json with an engine section")
    parser.add_argument("--run", help="the engine run to replay (default: every run)")
    parser.add_argument("--rel-precision", type=float, default=Settings.rel_precision)
    parser.add_argument("--budget", type=float, default=Settings.budget_s, help="seconds per point")
    parser.add_argument("--min-samples", type=int, default=Settings.min_samples)
    parser.add_argument("--warmup", type=int, default=Settings.warmup)
    parser.add_argument("--passes", type=int, default=Settings.passes)
    args = parser.parse_args(argv)
    s = Settings(args.rel_precision, args.budget, args.min_samples, args.warmup, args.passes)
    console = Console(width=80, highlight=False)
    if not (0 < s.rel_precision < 1 and 0 < s.budget_s < math.inf and 1 <= s.min_samples <= MAX_SAMPLES
            and s.warmup >= 0 and s.passes >= 1):
        print(f"error: need 0 < --rel-precision < 1, a finite --budget > 0, 1 <= --min-samples <= {MAX_SAMPLES}, "
              "--warmup >= 0 and --passes >= 1", file=sys.stderr)
        return 2
    try:
        runs = [(r, recordings(r)) for r in engine_runs(args.report) if args.run in (None, r["name"])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        print(f"error: {args.report} is no gpu_report.py report with an engine section ({exc}); "
              "pass the report.json of a run with the engine section", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no engine run named {args.run} in {args.report}; leave --run out to replay every run",
              file=sys.stderr)
        return 2
    for run, recorded in runs:
        points = [replay_point(rec, s) for rec in recorded]
        console.print(table(run, points, s))
        for line in summary(run, points):
            console.print(line, markup=False)
        console.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
