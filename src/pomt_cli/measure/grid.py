"""Grid scheduling of a latency profile: shuffled passes, spikes, unsettled points, progress."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import polars as pl
from pydantic import BaseModel, Field, field_validator

from pomt_cli.formats.latency import FILE_SCHEMA, SCHEMA, Workload
from pomt_cli.measure.runtimes import Runtime, RuntimeOptions
from pomt_cli.measure.steps import find_steps
from pomt_cli.measure.timing import Measurement


Point = tuple[int, int]
"""(batch size, kept tokens n)."""


class LatencySettings(BaseModel):
    """What to measure and how precisely."""

    batch_sizes: list[int] = Field(min_length=1)
    grid: list[int] = Field(min_length=1, description="kept-token counts n")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    cuda_graphs: bool = False
    rel_precision: float = Field(0.01, gt=0, lt=1)
    budget_s: float = Field(1.0, gt=0, description="seconds per grid point")
    min_samples: int = Field(10, ge=1)
    warmup: int = Field(3, ge=0)
    seed: int = 0
    remeasure_rounds: int = Field(2, ge=0, description="rounds of re-measuring spikes")
    passes: int = Field(2, ge=1, description="sweeps over the grid; each visit gets budget_s / passes")
    workload: Workload = "proxy"
    layers: list[int] | None = Field(None, description="POMT's pruning blocks (workload pomt), one curve each")
    runtime: Runtime = Runtime.eager
    ort_providers: list[str] | None = Field(None, description="ONNX Runtime's providers (None: the default)")
    compile_backend: str = Field("inductor", description="torch.compile's backend")

    @field_validator("batch_sizes", "grid")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values):
            raise ValueError("batch sizes and token counts must be positive")
        return values

    @property
    def timing_mode(self) -> Literal["eager", "cuda_graphs"]:
        return "cuda_graphs" if self.cuda_graphs else "eager"

    @property
    def spike_tol(self) -> float:
        """How far (relative) a point must lie from a neighbour to disagree with it."""
        return 2 * self.rel_precision

    def runtime_options(self) -> RuntimeOptions:
        """How :func:`pomt_cli.measure.runtimes.prepare` sets the runtime up for this profile."""
        providers = None if self.ort_providers is None else tuple(self.ort_providers)
        return RuntimeOptions(providers=providers, compile_backend=self.compile_backend, cuda_graphs=self.cuda_graphs)

    def points(self) -> list[Point]:
        """Every (batch size, n), batch sizes as given and n in grid order."""
        return [(b, n) for b in self.batch_sizes for n in self.grid]


@dataclass(frozen=True)
class GridProgress:
    """One step of a profile run, for progress bars and checkpoints.

    ``measurement`` is None when a point starts and set when it is done; ``frame`` (the
    profile so far) is set when a point is done. The phases ``export`` and ``compile``
    announce that a point's workload is being made ready for its runtime (untimed).
    """

    phase: Literal["measure", "remeasure", "export", "compile"]
    batch_size: int
    tokens: int
    done: int
    total: int
    measurement: Measurement | None = None
    frame: pl.DataFrame | None = None
    layer: int | None = None


ProgressFn = Callable[[GridProgress], None]


def empty_frame() -> pl.DataFrame:
    return pl.DataFrame(schema=SCHEMA)


def _row(batch_size: int, tokens: int, m: Measurement, attempts: int, visit: int, time_s: float,
         visit_medians: Sequence[float] = ()) -> dict:
    """A profile row of the pooled measurement ``m``; ``visit_medians``: each visit's own median."""
    spread = len(visit_medians) >= 2
    return {
        "batch_size": batch_size,
        "tokens": tokens,
        "latency_ms": m.median_ms,
        "p10_ms": m.p10_ms,
        "p90_ms": m.p90_ms,
        "samples": m.samples,
        "status": m.status,
        "ci_low_ms": m.ci_low_ms,
        "ci_high_ms": m.ci_high_ms,
        "mean_ms": m.mean_ms,
        "std_ms": m.std_ms,
        "min_ms": m.min_ms,
        "max_ms": m.max_ms,
        "attempts": attempts,
        "visit": visit,
        "time_s": time_s,
        "visit_low_ms": min(visit_medians) if spread else None,
        "visit_high_ms": max(visit_medians) if spread else None,
    }


def _frame(rows: dict[Point, dict]) -> pl.DataFrame:
    if not rows:
        return empty_frame()
    frame = pl.DataFrame(list(rows.values()), schema=SCHEMA, orient="row")
    return frame.sort(["batch_size", "tokens"], descending=[False, True])


def _interval(row: dict) -> tuple[float, float]:
    lo, hi = row.get("ci_low_ms"), row.get("ci_high_ms")
    median = row["latency_ms"]
    return (median if lo is None else lo, median if hi is None else hi)


def _disagree(a: dict, b: dict, tol: float) -> int:
    """+1 if ``a`` is clearly slower than ``b``, -1 if clearly faster, else 0.

    Clearly: the medians differ by more than ``tol`` (relative) and the confidence
    intervals do not overlap.
    """
    la, lb = a["latency_ms"], b["latency_ms"]
    (a_lo, a_hi), (b_lo, b_hi) = _interval(a), _interval(b)
    if abs(la - lb) <= tol * min(la, lb):
        return 0
    if a_lo > b_hi:
        return 1
    if a_hi < b_lo:
        return -1
    return 0


def find_spikes(frame: pl.DataFrame, tol: float) -> list[Point]:
    """Points that disagree with both grid neighbours in the same direction: spikes, not steps.

    A step (``L`` jumps between n and n - 1 and stays) leaves each point agreeing with one
    neighbour; a spike (one point above or below both) agrees with neither. End points
    and points without a latency (out of memory) are never spikes; neighbours are the
    nearest measured points.
    """
    spikes: list[Point] = []
    measured = frame.filter(pl.col("latency_ms").is_not_null())
    for (batch_size,), part in measured.group_by(["batch_size"], maintain_order=True):
        rows = part.sort("tokens", descending=True).to_dicts()
        for left, mid, right in zip(rows, rows[1:], rows[2:]):
            a, c = _disagree(mid, left, tol), _disagree(mid, right, tol)
            if a != 0 and a == c:
                spikes.append((int(batch_size), int(mid["tokens"])))
    return spikes


#: Apparent steps per batch size whose ends run_grid measures a second time.
STEP_CHECKS = 8


#: A point whose CI of the median is wider than this many times the spike tolerance is
#: re-measured with the spikes (a burst of interference, the process still warming up).
UNSETTLED_FACTOR = 2.5


def find_unsettled(frame: pl.DataFrame, tol: float) -> list[Point]:
    """Points whose confidence interval of the median is wide: half-width above ``UNSETTLED_FACTOR * tol``.

    Two neighbouring points hit by the same burst of interference agree with each other,
    so they are no spikes; their wide intervals give them away.
    """
    half = (pl.col("ci_high_ms") - pl.col("ci_low_ms")) / 2
    wide = frame.filter(pl.col("latency_ms").is_not_null() & (half > UNSETTLED_FACTOR * tol * pl.col("latency_ms")))
    return [(int(b), int(n)) for b, n in wide.select("batch_size", "tokens").iter_rows()]


def run_grid(
    points: Sequence[Point],
    measure_point: Callable[[int, int, list[float]], Measurement],
    *,
    seed: int = 0,
    passes: int = 1,
    spike_tol: float = 0.02,
    remeasure_rounds: int = 2,
    previous: pl.DataFrame | None = None,
    progress: ProgressFn | None = None,
    point_budget_s: float | None = None,
) -> pl.DataFrame:
    """Measure every point in ``passes`` seeded shuffled sweeps, then re-measure what looks wrong.

    A point's samples from all its visits are pooled, and its statistics are those of the
    pool. A machine whose speed drifts (clock changes, thermal limits, other tenants)
    then shows each point at several moments, so a slow or fast spell spreads over the
    curve as noise instead of shaping it into steps or dips.

    Args:
        points: the (batch size, n) to measure.
        measure_point: times one visit of a point, given the samples of its earlier visits
            (empty on the first); returns the visit's :class:`Measurement`.
        seed: seeds the visiting orders.
        passes: sweeps over the grid, each in a fresh shuffled order.
        spike_tol: see :func:`find_spikes`.
        remeasure_rounds: how often spikes (:func:`find_spikes`), unsettled points
            (:func:`find_unsettled`) and the ends of apparent steps visited only once
            (:func:`find_steps`) are looked for and visited again (in a shuffled order).
        previous: rows already measured (from an interrupted run); they are kept and not
            visited in the sweeps (a re-measuring visit replaces such a row: its samples
            are not in the file).
        progress: called when each visit starts and ends.
        point_budget_s: a point that has already spent this many seconds is not visited
            again for a wide interval (its noise is the device's own, and more visits
            would only spend time); spikes and step ends are still visited again.

    Returns:
        The profile frame (:data:`SCHEMA`), sorted by batch size and descending n.
    """
    rows: dict[Point, dict] = {}
    pooled: dict[Point, Measurement] = {}
    # The median of each visit on its own: visits that disagree show drift that the pooled
    # interval (its samples taken as one stationary set) does not.
    medians: dict[Point, list[float]] = {}
    if previous is not None and previous.height:
        full = previous.with_columns([pl.lit(None, dtype=t).alias(c) for c, t in SCHEMA.items() if c not in previous.columns])
        for row in full.select(list(SCHEMA)).to_dicts():
            point = (int(row["batch_size"]), int(row["tokens"]))
            rows[point] = row
            if row["latency_ms"] is not None:
                # A re-measuring visit replaces the row; the earlier visits' level stays in the comparison.
                medians[point] = [row["latency_ms"]]
    todo = [p for p in points if p not in rows]
    total = len(todo) * passes
    visit = max((r["visit"] or 0 for r in rows.values()), default=-1) + 1
    done = 0

    def run(point: Point, phase: Literal["measure", "remeasure"]) -> None:
        nonlocal visit, done
        b, n = point
        if progress:
            progress(GridProgress(phase, b, n, done, total))
        started = time.perf_counter()
        earlier = pooled.get(point)
        m = measure_point(b, n, list(earlier.raw_ms) if earlier else [])
        spent = time.perf_counter() - started
        old = rows.get(point)
        attempts = 1 if old is None else (old["attempts"] or 1) + 1
        time_s = spent + (0.0 if old is None else old["time_s"] or 0.0)
        if m.status == "oom" and old is not None and old["latency_ms"] is not None:
            rows[point] = {**old, "attempts": attempts, "time_s": time_s}
        else:
            if m.status != "oom":
                medians.setdefault(point, []).append(m.median_ms)
                m = pooled[point] = Measurement.pool([earlier, m] if earlier else [m])
            rows[point] = _row(b, n, m, attempts, visit, time_s, medians.get(point, ()))
        visit += 1
        done += 1
        if progress:
            progress(GridProgress(phase, b, n, done, total, m, _frame(rows)))

    for sweep in range(passes):
        order = list(todo)
        random.Random(seed + 7919 * sweep).shuffle(order)
        for point in order:
            run(point, "measure")
    rng = random.Random(seed + 1)
    for _ in range(remeasure_rounds):
        current = _frame(rows)
        # Both ends of an apparent step are visited again: a spell of drift that hit two
        # neighbours visited close together looks like a step until then.
        unvisited = [
            (int(step["batch_size"]), int(n))
            for step in find_steps(current, top=STEP_CHECKS, excursions=True).iter_rows(named=True)
            for n in (step["from_tokens"], step["to_tokens"])
            if (rows[(int(step["batch_size"]), int(n))]["attempts"] or 1) <= passes
        ]
        unsettled = [p for p in find_unsettled(current, spike_tol)
                     if point_budget_s is None or (rows[p]["time_s"] or 0.0) < point_budget_s]
        flagged = list(dict.fromkeys(find_spikes(current, spike_tol) + unsettled + unvisited))
        if not flagged:
            break
        rng.shuffle(flagged)
        total += len(flagged)
        for point in flagged:
            run(point, "remeasure")
    return _frame(rows)


def with_layer(frame: pl.DataFrame, layer: int | None) -> pl.DataFrame:
    """``frame`` (engine columns) with the ``layer`` column, in :data:`FILE_SCHEMA` order."""
    return frame.with_columns(pl.lit(layer, dtype=pl.Int64).alias("layer")).select(list(FILE_SCHEMA))


def sort_profile(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows by layer (the proxy's null first), batch size, then descending n."""
    return frame.sort(["layer", "batch_size", "tokens"], descending=[False, False, True], nulls_last=False)
