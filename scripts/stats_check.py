"""Do pomt's statistics hold what they claim? Simulations with no timing at all.

Feeds synthetic samples and synthetic curves into pomt's own functions and prints the
figures of docs/PERFORMANCE.md ("The statistics, checked by simulation"):

1. coverage of the 95% interval of the median (``median_ci_ranks``) per distribution and n;
2. the stopping rule of ``measure`` (a fake clock): how often the median it returns lies
   within ``--rel-precision`` of the true one, and how often its interval covers it;
3. ``find_steps`` on linear curves: curves with a false step, and the power to find a
   real 5%, 10%, 20% step at the right n;
4. the "faster" and "slower" claims of compute-r, refine and bench between two settings
   that are in truth equal;
5. the interval of a ratio timed in interleaved rounds when the device drifts between
   rounds: the range over the pooled intervals against ``paired_ratio``'s.

    PYTHONPATH=src python scripts/stats_check.py [--scale 1.0] [--seed 0]   # 98 s on 1 core

``tests/test_statistics.py`` runs the same functions with fewer draws.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from statistics import NormalDist

import numpy as np
import polars as pl
from rich.console import Console
from rich.table import Table

from pomt_cli.bench import slower_than_none
from pomt_cli.measure.steps import find_steps
from pomt_cli.measure.ratio import paired_ratio
from pomt_cli.measure.timing import Measurement, measure, median_ci_ranks
from pomt_cli.script_args import OneLineParser, number
from pomt_cli.selection import latency_ratio, paying_points

Sampler = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]
_Z = NormalDist()


def _normal(rng: np.random.Generator, size: tuple[int, ...]) -> np.ndarray:
    return 1.0 + 0.05 * rng.standard_normal(size)


def _lognormal(rng: np.random.Generator, size: tuple[int, ...]) -> np.ndarray:
    return np.exp(0.5 * rng.standard_normal(size))


def _outliers(rng: np.random.Generator, size: tuple[int, ...]) -> np.ndarray:
    return np.where(rng.random(size) < 0.05, 3.0, 1.0) * (1.0 + 0.02 * rng.standard_normal(size))


def _bimodal(rng: np.random.Generator, size: tuple[int, ...]) -> np.ndarray:
    return np.where(rng.random(size) < 0.4, 1.3, 1.0) * (1.0 + 0.01 * rng.standard_normal(size))


#: name: (sampler of latencies in ms, true median). The medians are exact: a mixture's
#: upper component lies wholly above its median, so only the lower one counts.
DISTRIBUTIONS: dict[str, tuple[Sampler, float]] = {
    "normal (sd 5%)": (_normal, 1.0),
    "lognormal (sigma 0.5)": (_lognormal, 1.0),
    "5% outliers 3x slower": (_outliers, 1.0 + 0.02 * _Z.inv_cdf(0.5 / 0.95)),
    "bimodal (40% 1.3x)": (_bimodal, 1.0 + 0.01 * _Z.inv_cdf(0.5 / 0.6)),
}


def median_coverage(sampler: Sampler, true_median: float, n: int, draws: int, rng: np.random.Generator) -> float | None:
    """How often the interval of ``median_ci_ranks(n)`` covers the true median (None: no interval at n)."""
    ranks = median_ci_ranks(n)
    if ranks is None:
        return None
    ordered = np.sort(sampler(rng, (draws, n)), axis=1)
    return float(np.mean((ordered[:, ranks[0]] <= true_median) & (true_median <= ordered[:, ranks[1]])))


class _Clock:
    """A clock that moves only when the fake workload says it took time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def stopped(sampler: Sampler, rng: np.random.Generator, rel_precision: float = 0.01, scale: float = 0.03,
            min_samples: int = 10) -> Measurement:
    """One ``measure`` of a fake call whose times are ``1 + scale * (sampler - its median)`` ms.

    The budget is never the limit (10 000 samples fit), so the run ends by the precision rule.
    """
    values = iter(sampler(rng, (10_100,)))
    clock = _Clock()

    def call() -> None:
        clock.now += next(values) * 1e-3

    return measure(call, device="cpu", clock=clock, rel_precision=rel_precision, min_samples=min_samples,
                   warmup=0, budget_s=1e6)


def noisy(rng: np.random.Generator, size: tuple[int, ...], kind: str, scale: float) -> np.ndarray:
    """Latencies around 1 ms with relative spread ``scale``, of one of the distributions' shapes."""
    sampler, median = DISTRIBUTIONS[kind]
    spread = {"normal (sd 5%)": 0.05, "lognormal (sigma 0.5)": 0.5, "5% outliers 3x slower": 0.02,
              "bimodal (40% 1.3x)": 0.01}[kind]
    return 1.0 + (sampler(rng, size) - median) * (scale / spread)


def stopping_rule(kind: str, draws: int, rng: np.random.Generator, scale: float = 0.03) -> dict[str, float]:
    """``measure``'s precision rule on ``draws`` runs of one noise shape (true median 1 ms).

    Returns:
        ``ok`` (share that stopped by precision), ``precise`` (of those, the median within
        1% of the true one), ``covered`` (of those, the interval covering it) and ``samples``
        (the median number of samples taken).
    """
    runs = [stopped(lambda r, s: noisy(r, s, kind, scale), rng) for _ in range(draws)]
    ok = [m for m in runs if m.status == "ok"]
    return {"ok": len(ok) / draws,
            "precise": float(np.mean([abs(m.median_ms - 1.0) <= 0.01 * m.median_ms for m in ok])),
            "covered": float(np.mean([m.ci_low_ms <= 1.0 <= m.ci_high_ms for m in ok])),
            "samples": float(np.median([m.samples for m in ok]))}


def linear_curve(rng: np.random.Generator, point_sd: float, step: float = 0.0, at: int = 100,
                 tokens: np.ndarray | None = None, samples: int = 40, sample_sd: float = 0.03) -> pl.DataFrame:
    """A profile-like frame of L(n) = 5 + 0.25 n ms (deit_small on a CPU), with noise and an optional step.

    Each point is ``samples`` lognormal calls (``sample_sd``) around its level, which is off
    by a relative ``point_sd`` (the machine's drift between visits, which its interval does
    not see); the level drops by ``step`` (relative) from n = ``at`` to ``at - 1``.
    """
    n = np.arange(197, 1, -1) if tokens is None else tokens
    level = (5.0 + 0.25 * n) * np.where(n < at, 1.0 - step, 1.0) * (1.0 + point_sd * rng.standard_normal(n.size))
    ordered = np.sort(level[:, None] * np.exp(sample_sd * rng.standard_normal((n.size, samples))), axis=1)
    lo, hi = median_ci_ranks(samples)
    return pl.DataFrame({"batch_size": 1, "tokens": n, "latency_ms": np.median(ordered, axis=1),
                         "ci_low_ms": ordered[:, lo], "ci_high_ms": ordered[:, hi]})


def step_rates(point_sd: float, draws: int, rng: np.random.Generator,
               steps: tuple[float, ...] = (0.05, 0.10, 0.20)) -> dict[str, float]:
    """``false``: share of step-free curves with a step found; ``power@s``: share with the real step found at its n."""
    out = {"false": float(np.mean([find_steps(linear_curve(rng, point_sd)).height > 0 for _ in range(draws)]))}
    for s in steps:
        found = [find_steps(linear_curve(rng, point_sd, step=s)) for _ in range(draws)]
        out[f"power@{s:.0%}"] = float(np.mean(
            [f.filter((pl.col("from_tokens") == 100) & (pl.col("to_tokens") == 99)).height > 0 for f in found]))
    return out


def _measurement(values: np.ndarray) -> Measurement:
    return Measurement("ok", "eager", tuple(values), 0.01)


def _point(m: Measurement, tokens: int) -> dict:
    return {"tokens": tokens, "latency_ms": m.median_ms, "ci_low_ms": m.ci_low_ms, "ci_high_ms": m.ci_high_ms}


def false_claims(draws: int, rng: np.random.Generator, samples: int | None = 20, kind: str = "normal (sd 5%)",
                 curve_points: int = 10) -> dict[str, float]:
    """How often pomt claims a difference between settings that are in truth equal.

    Each setting is ``samples`` calls (or, with ``samples`` None, one ``measure`` run to 1%)
    of the same noise. ``compute-r``: a pruned point pays against the unpruned one
    (:func:`paying_points`); ``compute-r, flat curve``: any of ``curve_points`` equal pruned
    points pays; ``refine``: a candidate's ratio interval lies below 1; ``bench``: the pruned
    setting measured slower than ``none`` beyond both intervals.
    """
    def one() -> Measurement:
        if samples is None:
            return stopped(lambda r, s: noisy(r, s, kind, 0.03), rng)
        return _measurement(noisy(rng, (samples,), kind, 0.03))

    single = curve = refine = slower = 0
    for _ in range(draws):
        reference, other = one(), one()
        rows = [_point(reference, 197), _point(other, 196)] + [_point(one(), 195 - i) for i in range(curve_points - 1)]
        frame = pl.DataFrame(rows, schema={"tokens": pl.Int64, "latency_ms": pl.Float64, "ci_low_ms": pl.Float64,
                                           "ci_high_ms": pl.Float64})
        single += paying_points(frame.head(2)).height > 1
        curve += paying_points(frame).height > 1
        refine += (latency_ratio(_point(other, 196), _point(reference, 197)).high or 2.0) < 1.0
        slower += bool(slower_than_none(other, reference))
    return {"compute-r": single / draws, "compute-r, flat curve": curve / draws, "refine": refine / draws,
            "bench slower": slower / draws}


def ratio_coverage(draws: int, rng: np.random.Generator, rounds: int, drift: float, samples: int = 20,
                   ratio: float = 0.8) -> dict[str, float]:
    """How often a ratio's interval covers the true ratio when the device drifts between rounds.

    Two settings (the second ``ratio`` times the first) are timed in ``rounds`` interleaved
    rounds of ``samples`` calls each, with 3% normal noise per call; in every round each
    setting's level moves by a log-normal factor of spread ``drift`` (its own moment of
    the round). ``pooled``: the ratio's range over the two pooled intervals of the median
    (what refine and bench used before); ``paired``: :func:`paired_ratio`, which adds the
    Student t interval from the rounds.
    """
    covered = {"pooled": 0, "paired": 0}
    widths = {"pooled": [], "paired": []}
    for _ in range(draws):
        parts: dict[str, list[Measurement]] = {"a": [], "b": []}
        for _ in range(rounds):
            for name, level in (("a", ratio), ("b", 1.0)):
                moved = level * float(np.exp(drift * rng.standard_normal()))
                parts[name].append(_measurement(moved * (1 + 0.03 * rng.standard_normal(samples))))
        a, b = Measurement.pool(parts["a"]), Measurement.pool(parts["b"])
        pooled = latency_ratio(_point(a, 0), _point(b, 1))
        paired = paired_ratio(a, b)
        for name, (low, high) in (("pooled", (pooled.low, pooled.high)), ("paired", (paired.low, paired.high))):
            covered[name] += low is not None and low <= ratio <= high
            widths[name].append((high - low) / ratio if low is not None else float("nan"))
    return {"pooled covers": covered["pooled"] / draws, "paired covers": covered["paired"] / draws,
            "pooled width": float(np.nanmedian(widths["pooled"])), "paired width": float(np.nanmedian(widths["paired"]))}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=number(float, above=0), default=1.0,
                        help="multiply every number of draws (default 1)")
    parser.add_argument("--seed", type=number(int, minimum=0), default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    draws = lambda k: max(10, int(k * args.scale))  # noqa: E731
    console = Console(width=80)
    began = time.perf_counter()

    sizes = (5, 6, 10, 20, 50, 200)
    table = Table(title="1. Coverage of the 95% interval of the median", title_justify="left")
    table.add_column("distribution")
    for n in sizes:
        table.add_column(f"n={n}", justify="right")
    for name, (sampler, median) in DISTRIBUTIONS.items():
        cells = [median_coverage(sampler, median, n, draws(20_000), rng) for n in sizes]
        table.add_row(name, *("none" if c is None else f"{c:.3f}" for c in cells))
    console.print(table)

    table = Table(title="2. Stopping rule, 1% precision, spread 3%", title_justify="left")
    for col in ("noise", "stopped ok", "within 1%", "CI covers", "samples"):
        table.add_column(col, justify="left" if col == "noise" else "right")
    for name in DISTRIBUTIONS:
        r = stopping_rule(name, draws(2000), rng)
        table.add_row(name, f"{r['ok']:.3f}", f"{r['precise']:.3f}", f"{r['covered']:.3f}", f"{r['samples']:.0f}")
    console.print(table)

    table = Table(title="3. find_steps on L(n) = 5 + 0.25 n, 196 points", title_justify="left")
    for col in ("point noise", "false step", "5% found", "10% found", "20% found"):
        table.add_column(col, justify="right")
    for sd in (0.0, 0.005, 0.01, 0.02):
        r = step_rates(sd, draws(400), rng)
        table.add_row(f"{sd:.1%}", *(f"{v:.3f}" for v in r.values()))
    console.print(table)

    table = Table(title="4. Claims between equal settings (95% intervals)", title_justify="left")
    for col in ("each setting", "compute-r", "10-pt curve", "refine", "bench slower"):
        table.add_column(col, justify="right")
    for label, samples, kind, k in (("20 calls", 20, "normal (sd 5%)", 2000),
                                    ("20 calls, outliers", 20, "5% outliers 3x slower", 2000),
                                    ("measure to 1%", None, "normal (sd 5%)", 300)):
        r = false_claims(draws(k), rng, samples=samples, kind=kind)
        table.add_row(label, *(f"{v:.3f}" for v in r.values()))
    console.print(table)
    table = Table(title="5. A ratio timed in rounds, with drift between rounds (95%)", title_justify="left")
    for col in ("rounds", "drift", "pooled covers", "paired covers", "pooled width", "paired width"):
        table.add_column(col, justify="right")
    for rounds in (3, 6):
        for drift in (0.0, 0.02, 0.05):
            r = ratio_coverage(draws(1000), rng, rounds, drift)
            table.add_row(str(rounds), f"{drift:.0%}", *(f"{v:.3f}" for v in r.values()))
    console.print(table)
    console.print(f"seed {args.seed}, scale {args.scale:g}: {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
