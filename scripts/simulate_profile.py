"""Which steps would a profile with other settings list? Whole profiles simulated from a GPU's recordings.

    python scripts/simulate_profile.py REPORT.json PROFILE_A.parquet PROFILE_B.parquet
        [--run bs64_float32_eager] [--draws 10] [--seed 0] [--setting NAME=BUDGET,PASSES,WARMUP ...]

The device is modelled on what ``scripts/gpu_report.py`` recorded on it:

- the true curve L(n) is the mean of two full profiles of one batch size (PROFILE_A and
  PROFILE_B, measured one after the other), and the true steps are the steps that
  :func:`pomt_cli.measure.steps.find_steps` lists in both (up to 20);
- each visit of a point runs at its own level ``L(n) * exp(sigma z)``: ``sigma`` is the
  spread of the log medians of the visits that the report's engine section recorded at
  the recorded n nearest to n (host-bound points drift from visit to visit, points bound
  by the GPU do not), ``z`` a standard normal draw;
- each call takes the visit's level times a residual drawn from that recorded n's calls
  (each call over its own visit's median), so the calls' spread and tail are the device's.

Each draw runs a whole profile through pomt's own :func:`pomt_cli.measure.grid.run_grid`
and :func:`pomt_cli.measure.timing.measure` (on the CPU, with a fake clock that each call
advances by its time; a warm-up call costs one call) with the settings of the pipeline
(budget / passes per visit, one warm-up call on later visits, re-measuring rounds), then
lists its steps twice: with the visits' medians and without them (as for a profile
written before they were recorded: only points that reached the precision place a
step). Per setting the table gives the simulated seconds of measuring (host work and
loading not included), the median per-point agreement of consecutive profiles, the
steps listed, how many of them are true steps, and how many are false.

This is a model, not a measurement: the drift between visits is drawn independently per
visit, while a real machine's drift is correlated in time.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from rich.console import Console
from rich.table import Table

from pomt_cli.measure.grid import run_grid
from pomt_cli.measure.steps import find_steps, step_pairs
from pomt_cli.measure.timing import Measurement, measure
from pomt_cli.script_args import OneLineParser, number

#: The most steps taken from each full profile to find the true ones.
TRUTH_TOP = 20


@dataclass(frozen=True)
class Setting:
    """Timing options of ``pomt profile`` (the others at their defaults)."""

    name: str
    budget_s: float
    passes: int
    warmup: int
    rel_precision: float = 0.01
    min_samples: int = 10
    remeasure_rounds: int = 2


DEFAULT_SETTINGS = (
    Setting("default", 1.0, 2, 3),
    Setting("0.1s 1 pass", 0.1, 1, 1),
    Setting("0.1s 2 pass", 0.1, 2, 1),
    Setting("0.2s 2 pass", 0.2, 2, 1),
)


@dataclass(frozen=True)
class DeviceModel:
    """A curve and, per recorded n, the calls' residuals and the drift between visits."""

    batch_size: int
    levels: dict[int, float]
    residuals: dict[int, np.ndarray]
    drift: dict[int, float]

    def nearest(self, n: int) -> int:
        return min(self.residuals, key=lambda r: (abs(r - n), r))


def device_model(report: dict, run_name: str, profile_a: pl.DataFrame, profile_b: pl.DataFrame) -> DeviceModel:
    """The model of one engine run of a gpu_report.py report and two full profiles of its batch size.

    Raises:
        ValueError: no engine run of that name, or profiles without its batch size.
    """
    engine = report.get("engine", {})
    runs = {r["name"]: r for r in engine.get("results", engine).get("runs", [])}
    if run_name not in runs:
        raise ValueError(f"no engine run named {run_name} (the report has: {', '.join(runs) or 'none'})")
    run = runs[run_name]
    batch_size = int(run["batch_size"])
    curves = []
    for frame in (profile_a, profile_b):
        part = frame.filter((pl.col("batch_size") == batch_size) & pl.col("latency_ms").is_not_null())
        if part.is_empty():
            raise ValueError(f"a profile has no point at batch size {batch_size}")
        curves.append(dict(zip(part["tokens"].to_list(), part["latency_ms"].to_list())))
    levels = {n: (curves[0][n] + curves[1][n]) / 2 for n in curves[0] if n in curves[1]}
    residuals: dict[int, list[float]] = {}
    logs: dict[int, list[float]] = {}
    for v in run["visits"]:
        samples = np.asarray(v.get("samples_ms") or [], dtype=float)
        if v["status"] == "oom" or samples.size == 0:
            continue
        median = float(np.median(samples))
        residuals.setdefault(v["n"], []).extend(samples / median)
        logs.setdefault(v["n"], []).append(float(np.log(median)))
    drift = {n: float(np.std(m, ddof=1)) if len(m) > 1 else 0.0 for n, m in logs.items()}
    return DeviceModel(batch_size, levels, {n: np.asarray(r) for n, r in residuals.items()}, drift)


def true_steps(profile_a: pl.DataFrame, profile_b: pl.DataFrame, batch_size: int) -> set[tuple[int, int]]:
    """The (from, to) steps that both full profiles list at ``batch_size``."""
    found = []
    for frame in (profile_a, profile_b):
        steps = find_steps(frame.filter(pl.col("batch_size") == batch_size), top=TRUTH_TOP)
        found.append(step_pairs(steps))
    return found[0] & found[1]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulated_profile(model: DeviceModel, setting: Setting, rng: np.random.Generator,
                      seed: int = 0) -> tuple[pl.DataFrame, float]:
    """One profile of the model's curve with ``setting``: the frame and the seconds it measured."""
    spent = [0.0]

    def measure_point(batch_size: int, n: int, prior: list[float]) -> Measurement:
        near = model.nearest(n)
        level = model.levels[n] * float(np.exp(model.drift[near] * rng.standard_normal()))
        residuals = model.residuals[near]
        clock = _Clock()

        def call() -> None:
            clock.now += level * float(residuals[rng.integers(residuals.size)]) * 1e-3

        m = measure(call, device="cpu", clock=clock, rel_precision=setting.rel_precision,
                    budget_s=setting.budget_s / setting.passes,
                    min_samples=-(-setting.min_samples // setting.passes),
                    warmup=setting.warmup if not prior else min(1, setting.warmup), prior_ms=prior)
        spent[0] += clock.now
        return m

    points = [(model.batch_size, n) for n in sorted(model.levels, reverse=True)]
    frame = run_grid(points, measure_point, seed=seed, passes=setting.passes, spike_tol=2 * setting.rel_precision,
                     remeasure_rounds=setting.remeasure_rounds, point_budget_s=setting.budget_s)
    return frame, spent[0]


@dataclass(frozen=True)
class Outcome:
    """Means over the draws of one setting: seconds, per rule (new, old) the steps listed and
    the true ones among them, and the median per-point agreement of consecutive draws
    (median over n of |L1 - L2| / L2, as gpu_report.py's profile section; None for one draw)."""

    seconds: float
    listed: tuple[float, float]
    true: tuple[float, float]
    agreement: float | None


def simulate(model: DeviceModel, truth: set[tuple[int, int]], setting: Setting, draws: int,
             seed: int = 0, top: int = TRUTH_TOP,
             done: Callable[[], None] | None = None) -> Outcome:
    """``draws`` simulated profiles of ``setting``, their steps judged against ``truth``."""
    rng = np.random.default_rng(seed)
    seconds, listed, true, agreement = [], [[], []], [[], []], []
    last = None
    for draw in range(draws):
        frame, spent = simulated_profile(model, setting, rng, seed=seed + draw)
        seconds.append(spent)
        if last is not None:
            both = frame.join(last, on=["batch_size", "tokens"], suffix="_last")
            agreement.append(float(((both["latency_ms"] - both["latency_ms_last"]).abs()
                                    / both["latency_ms_last"]).median()))
        last = frame
        for i, judged in enumerate((frame, frame.drop("visit_low_ms", "visit_high_ms"))):
            steps = find_steps(judged, top=top)
            pairs = step_pairs(steps)
            listed[i].append(len(pairs))
            true[i].append(len(pairs & truth))
        if done is not None:
            done()
    return Outcome(float(np.mean(seconds)), (float(np.mean(listed[0])), float(np.mean(listed[1]))),
                   (float(np.mean(true[0])), float(np.mean(true[1]))),
                   float(np.median(agreement)) if agreement else None)


def _setting(text: str) -> Setting:
    name, _, values = text.partition("=")
    budget, passes, warmup = values.split(",")
    if not math.isfinite(float(budget)):
        raise ValueError(f"BUDGET {budget} of --setting {text} is not a finite number of seconds")
    return Setting(name, float(budget), int(passes), int(warmup))


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a gpu_report.py report.json with an engine section")
    parser.add_argument("profile_a", type=Path, help="a full profile of the engine run's batch size")
    parser.add_argument("profile_b", type=Path, help="a second full profile, measured after the first")
    parser.add_argument("--run", default="bs64_float32_eager", help="the engine run that models the device")
    parser.add_argument("--draws", type=int, default=10, help="simulated profiles per setting")
    parser.add_argument("--seed", type=number(int, minimum=0), default=0)
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=BUDGET,PASSES,WARMUP",
                        help="a setting to simulate (default: the profile's defaults and two short budgets)")
    args = parser.parse_args(argv)
    try:
        settings = [_setting(s) for s in args.setting] or list(DEFAULT_SETTINGS)
        if args.draws < 1 or any(s.budget_s <= 0 or s.passes < 1 or s.warmup < 0 for s in settings):
            raise ValueError("need --draws >= 1 and settings with BUDGET > 0, PASSES >= 1, WARMUP >= 0")
    except ValueError as exc:
        print(f"error: {exc}; e.g. --setting fast=0.1,1,1", file=sys.stderr)
        return 2
    try:
        report = json.loads(args.report.read_text())
        a, b = pl.read_parquet(args.profile_a), pl.read_parquet(args.profile_b)
        model = device_model(report, args.run, a, b)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pl.exceptions.PolarsError) as exc:
        print(f"error: cannot model the device from these files ({exc}); pass a gpu_report.py report.json "
              "and two pomt profiles of its engine run's batch size", file=sys.stderr)
        return 2
    truth = true_steps(a, b, model.batch_size)
    console = Console(width=80, highlight=False)
    title = (f"{args.run}: {len(truth)} true steps (in both full profiles);\n"
             f"means of {args.draws} simulated profiles per setting")
    table = Table(title=title, title_justify="left")
    for name in ("setting", "seconds", "agree", "steps", "true", "false", "before", "false"):
        table.add_column(name, justify="left" if name == "setting" else "right")
    for s in settings:
        o = simulate(model, truth, s, args.draws, seed=args.seed)
        agree = "-" if o.agreement is None else f"{100 * o.agreement:.2f}%"
        table.add_row(s.name, f"{o.seconds:.1f}", agree, f"{o.listed[0]:.2f}", f"{o.true[0]:.2f}",
                      f"{o.listed[0] - o.true[0]:.2f}", f"{o.listed[1]:.2f}", f"{o.listed[1] - o.true[1]:.2f}")
    console.print(table)
    for line in ("seconds: measuring per profile (host work and loading not simulated)",
                 "agree: median over n of |L1 - L2| / L2 between consecutive profiles",
                 "steps, true, false: steps listed, and those in both full profiles or not",
                 "before: the same rule without the visits' medians (as for files from",
                 "before 2026-11-28: a point at status budget places no step)"):
        console.print(line, markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
