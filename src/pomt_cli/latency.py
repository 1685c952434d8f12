"""The latency profile: L(n), the time of one forward pass against the kept-token count n.

For each batch size B and kept-token count n of the grid, the workload is one forward pass
of the model on random (B, C, H, W) inputs. Two workloads:

- ``proxy`` (the paper's): the p prefix tokens and n - p patch tokens chosen at random
  (once per point, outside the timed region) enter the first block, so that every block
  runs on n tokens (:func:`pomt_cli.pruning.forward_kept`).
- ``pomt``: the real POMT-patched model with R = N - n pruned in block ``layer``, the
  model that would be deployed: blocks 0..layer run on all N tokens, scoring and
  gathering included. One curve per layer, each costing about one proxy profile.

:func:`profile_latency` builds the workload and visits the grid in a shuffled order (so
that drift does not masquerade as a step), timing each point with
:func:`pomt_cli.timing.measure`; afterwards it re-measures points that disagree with both
neighbours. :func:`find_steps` finds the largest drops of the curve.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl
import torch
from pydantic import BaseModel, Field, ValidationError, field_validator
from torch import nn

from pomt_cli.devices import ClockState
from pomt_cli.errors import PomtError
from pomt_cli.models import vit_geometry
from pomt_cli.options import DTYPES, check_layers
from pomt_cli.profiles import ProfileMeta, read_profile
from pomt_cli.pruning import apply, remove
from pomt_cli.pruning.geometry import forward_kept
from pomt_cli.timing import Measurement, Task, is_out_of_memory, measure, release_memory

#: Columns of a latency profile, in file order (the first seven are profiles.LATENCY_COLUMNS).
SCHEMA: dict[str, pl.DataType] = {
    "batch_size": pl.Int64,
    "tokens": pl.Int64,
    "latency_ms": pl.Float64,
    "p10_ms": pl.Float64,
    "p90_ms": pl.Float64,
    "samples": pl.Int64,
    "status": pl.String,
    "ci_low_ms": pl.Float64,
    "ci_high_ms": pl.Float64,
    "mean_ms": pl.Float64,
    "std_ms": pl.Float64,
    "min_ms": pl.Float64,
    "max_ms": pl.Float64,
    "attempts": pl.Int64,
    "visit": pl.Int64,
    "time_s": pl.Float64,
}

Point = tuple[int, int]
"""(batch size, kept tokens n)."""

Workload = Literal["proxy", "pomt"]
WORKLOADS: tuple[str, ...] = ("proxy", "pomt")

#: Columns of a latency profile file: the engine's, then ``layer`` (POMT's block, null for the proxy).
FILE_SCHEMA: dict[str, pl.DataType] = {**SCHEMA, "layer": pl.Int64}


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

    def points(self) -> list[Point]:
        """Every (batch size, n), batch sizes as given and n in grid order."""
        return [(b, n) for b in self.batch_sizes for n in self.grid]


class LatencyMeta(ProfileMeta):
    """Metadata of a latency profile (see docs/FORMATS.md)."""

    kind: Literal["latency"] = "latency"
    batch_sizes: list[int]
    timing_mode: Literal["eager", "cuda_graphs"]
    device_preset: str
    device_display_name: str
    device_name: str
    torch_device: str
    clocks: ClockState
    clocks_locked: bool
    pretrained: bool = False
    checkpoint: str | None = None
    rel_precision: float
    budget_s: float
    min_samples: int
    warmup: int
    seed: int
    remeasure_rounds: int
    passes: int = 1
    num_threads: int = Field(default_factory=torch.get_num_threads)
    float32_matmul_precision: str = Field(default_factory=torch.get_float32_matmul_precision)
    complete: bool = Field(False, description="every point measured and spikes re-measured")
    elapsed_s: float = Field(0.0, description="seconds spent measuring, over all resumed runs")
    resumed_rows: int = Field(0, description="rows taken over from an interrupted run (--resume)")
    workload: Workload = Field("proxy", description="proxy: every block at n; pomt: the POMT-patched model")
    layers: list[int] | None = Field(None, description="POMT's pruning blocks of the pomt workload; None for the proxy")


@dataclass(frozen=True)
class GridProgress:
    """One step of a profile run, for progress bars and checkpoints.

    ``measurement`` is None when a point starts and set when it is done; ``frame`` (the
    profile so far) is set when a point is done.
    """

    phase: Literal["measure", "remeasure"]
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


def _row(batch_size: int, tokens: int, m: Measurement, attempts: int, visit: int, time_s: float) -> dict:
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
    if previous is not None and previous.height:
        full = previous.with_columns([pl.lit(None, dtype=t).alias(c) for c, t in SCHEMA.items() if c not in previous.columns])
        for row in full.select(list(SCHEMA)).to_dicts():
            rows[(int(row["batch_size"]), int(row["tokens"]))] = row
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
                m = pooled[point] = Measurement.pool([earlier, m] if earlier else [m])
            rows[point] = _row(b, n, m, attempts, visit, time_s)
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
            for step in find_steps(current, top=STEP_CHECKS).iter_rows(named=True)
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


def kept_patches(num_patches: int, kept: int, seed: int) -> torch.Tensor:
    """(kept,) sorted random indices into the patch tokens, the same for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_patches, generator=generator)[:kept].sort().values


def with_layer(frame: pl.DataFrame, layer: int | None) -> pl.DataFrame:
    """``frame`` (engine columns) with the ``layer`` column, in :data:`FILE_SCHEMA` order."""
    return frame.with_columns(pl.lit(layer, dtype=pl.Int64).alias("layer")).select(list(FILE_SCHEMA))


def sort_profile(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows by layer (the proxy's null first), batch size, then descending n."""
    return frame.sort(["layer", "batch_size", "tokens"], descending=[False, False, True], nulls_last=False)


def profile_latency(
    model: nn.Module,
    settings: LatencySettings,
    *,
    device: torch.device,
    previous: pl.DataFrame | None = None,
    progress: ProgressFn | None = None,
) -> pl.DataFrame:
    """The latency profile of ``model`` on ``device``: one row per (layer, batch size, n).

    The model is moved to ``device`` and ``settings.dtype``. Points already in
    ``previous`` are not measured again. With the ``pomt`` workload each layer of
    ``settings.layers`` is one curve, measured in turn by the same engine (about one proxy
    profile each); progress events then count over all layers and carry the whole
    profile so far. The model is left unpatched.

    Returns:
        A frame of :data:`FILE_SCHEMA` (``layer`` null for the proxy), sorted by
        :func:`sort_profile`.

    Raises:
        PomtError: the model is not a supported ViT, the grid does not fit it, a layer is
            out of range, the model itself does not fit in the device's memory, or CUDA
            graphs without CUDA.
    """
    layers: list[int | None] = [None]
    if settings.workload == "pomt":
        g = vit_geometry(model)
        if not settings.layers:
            raise PomtError("the pomt workload needs at least one layer: give --layer L[,L...]")
        check_layers(settings.layers, g.num_blocks, g.name)
        layers = list(settings.layers)
    if previous is not None and "layer" not in previous.columns:
        previous = with_layer(previous, None)
    finished: list[pl.DataFrame] = []
    per_layer = len(settings.points()) * settings.passes
    offset = 0
    for i, layer in enumerate(layers):
        earlier = None
        if previous is not None:
            earlier = previous.filter(pl.col("layer").is_null() if layer is None else pl.col("layer") == layer)
        callback = None
        if progress is not None:
            def callback(event: GridProgress, layer=layer, i=i, done_before=list(finished)) -> None:
                frame = None
                if event.frame is not None:
                    frame = sort_profile(pl.concat([*done_before, with_layer(event.frame, layer)]))
                left = per_layer * (len(layers) - i - 1)
                progress(GridProgress(event.phase, event.batch_size, event.tokens, offset + event.done,
                                      offset + event.total + left, event.measurement, frame, layer))
        frame = _profile_curve(model, settings, device=device, previous=earlier, progress=callback, layer=layer)
        finished.append(with_layer(frame, layer))
        offset += per_layer if earlier is None else max(0, per_layer - earlier.height * settings.passes)
    return sort_profile(pl.concat(finished))


def _profile_curve(
    model: nn.Module,
    settings: LatencySettings,
    *,
    device: torch.device,
    previous: pl.DataFrame | None,
    progress: ProgressFn | None,
    layer: int | None,
) -> pl.DataFrame:
    """One curve: the proxy (``layer`` None) or POMT pruning N - n tokens in block ``layer``."""
    g = vit_geometry(model)
    if settings.cuda_graphs and device.type != "cuda":
        raise PomtError(f"CUDA graphs need a CUDA device, but the torch device is {device}: leave out --cuda-graphs")
    bad = [n for n in settings.grid if not g.num_prefix < n <= g.num_tokens]
    if bad:
        raise PomtError(f"token counts {bad[:5]} do not fit {g.describe()}: use n in {g.num_prefix + 1}..{g.num_tokens}")
    dtype = DTYPES[settings.dtype]
    try:
        model = model.eval().to(device=device, dtype=dtype)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise PomtError(f"{g.name} does not fit in the memory of {device}") from None
        raise
    images: dict[int, torch.Tensor] = {}

    def measure_point(batch_size: int, tokens: int, prior: list[float]) -> Measurement:
        try:
            if batch_size not in images:
                generator = torch.Generator().manual_seed(settings.seed)
                cpu = torch.randn(batch_size, *g.input_size, generator=generator)
                images[batch_size] = cpu.to(device=device, dtype=dtype)
            keep = kept_patches(g.num_patches, tokens - g.num_prefix, settings.seed * 100_003 + tokens).to(device)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            failed = True
        else:
            failed = False
        task = Task("proxy" if layer is None else f"pomt @{layer}", g.name, batch_size, tokens, settings.dtype)
        if failed:
            release_memory(device)
            mode = "cuda_graph" if settings.cuda_graphs else "eager"
            return Measurement.out_of_memory("inputs do not fit", mode=mode, rel_precision=settings.rel_precision,
                                             task=task)
        x = images[batch_size]
        if layer is None:
            def workload() -> torch.Tensor:
                return forward_kept(model, x, keep)
        else:
            # R = 0 is the unpruned model itself, as it would be deployed.
            pruned = remove(model) if tokens == g.num_tokens else apply(model, "pomt", r=g.num_tokens - tokens,
                                                                          layer=layer)

            def workload() -> torch.Tensor:
                return pruned(x)
        with torch.inference_mode():
            return measure(
                workload,
                device=device,
                rel_precision=settings.rel_precision,
                budget_s=settings.budget_s / settings.passes,
                min_samples=-(-settings.min_samples // settings.passes),
                # Caches for this shape were warmed on the first visit; one call re-primes them.
                warmup=settings.warmup if not prior else min(1, settings.warmup),
                cuda_graphs=settings.cuda_graphs,
                prior_ms=prior,
                task=task,
            )

    # The first calls of a process are slow (allocator, kernel selection, caches, clock
    # ramp-up): one untimed-for-the-record measurement per batch size absorbs them, so
    # that the first grid points visited are not their victims.
    for batch_size in settings.batch_sizes:
        if previous is None or previous.filter(pl.col("batch_size") == batch_size).height < len(settings.grid):
            measure_point(batch_size, max(settings.grid), [])

    try:
        return run_grid(
            settings.points(),
            measure_point,
            seed=settings.seed,
            passes=settings.passes,
            spike_tol=settings.spike_tol,
            remeasure_rounds=settings.remeasure_rounds,
            previous=previous,
            progress=progress,
            point_budget_s=settings.budget_s,
        )
    finally:
        remove(model)


#: The widest gap between grid points (in tokens) across which a drop counts as a step: on
#: a coarser grid a drop cannot be told from the curve's bending.
MAX_STEP_WIDTH = 4

#: Neighbouring pairs of grid points over which find_steps takes the curve's local trend.
TREND_WINDOW = 15


def find_steps(frame: pl.DataFrame, *, top: int = 8, min_drop: float = 0.02) -> pl.DataFrame:
    """The largest latency steps: drops between adjacent grid points well beyond the curve's trend.

    For adjacent measured points n > n - k of one batch size the relative drop is
    ``d = (L(n) - L(n-k)) / L(n)``. A smooth curve drops by about ``s k / L(n)``, where
    ``s`` is its local slope in ms per token (the running median of
    ``(L(n) - L(n-k)) / k`` over :data:`TREND_WINDOW` neighbouring pairs, which follows a
    curve that bends and does not mistake a fixed overhead for steps); the excess
    ``d - s k / L(n)`` of a step is above ``min_drop`` and above the excesses' own spread
    (3 x their scaled median absolute deviation), the two points' confidence intervals
    of the median do not overlap, and they are at most :data:`MAX_STEP_WIDTH` tokens apart.

    Returns:
        One row per step, at most ``top`` per batch size, largest excess first:
        ``batch_size, from_tokens, to_tokens, k, from_ms, to_ms, drop_pct, excess_pct``.
    """
    schema = {"batch_size": pl.Int64, "from_tokens": pl.Int64, "to_tokens": pl.Int64, "k": pl.Int64,
              "from_ms": pl.Float64, "to_ms": pl.Float64, "drop_pct": pl.Float64, "excess_pct": pl.Float64}
    measured = frame.filter(pl.col("latency_ms").is_not_null() & (pl.col("latency_ms") > 0))
    found: list[dict] = []
    for (batch_size,), part in measured.group_by(["batch_size"], maintain_order=True):
        curve = part.sort("tokens", descending=True)
        if curve.height < 3:
            continue
        low = curve["ci_low_ms"] if "ci_low_ms" in curve.columns else curve["latency_ms"]
        high = curve["ci_high_ms"] if "ci_high_ms" in curve.columns else curve["latency_ms"]
        pairs = pl.DataFrame({
            "from_tokens": curve["tokens"][:-1],
            "to_tokens": curve["tokens"][1:],
            "from_ms": curve["latency_ms"][:-1],
            "to_ms": curve["latency_ms"][1:],
            # A step is significant when the intervals of the median do not overlap.
            "separated": (low[:-1].fill_null(curve["latency_ms"][:-1]) > high[1:].fill_null(curve["latency_ms"][1:])),
        }).with_columns(
            k=pl.col("from_tokens") - pl.col("to_tokens"),
            drop=(pl.col("from_ms") - pl.col("to_ms")) / pl.col("from_ms"),
        )
        slope = ((pl.col("from_ms") - pl.col("to_ms")) / pl.col("k")).rolling_median(
            window_size=TREND_WINDOW, center=True, min_samples=1)
        pairs = pairs.with_columns(excess=pl.col("drop") - slope * pl.col("k") / pl.col("from_ms"))
        spread = pairs.select((pl.col("excess") - pl.col("excess").median()).abs().median()).item() * 1.4826
        steps = (
            pairs.filter((pl.col("drop") > 0) & pl.col("separated") & (pl.col("k") <= MAX_STEP_WIDTH)
                         & (pl.col("excess") > max(min_drop, 3 * spread)))
            .sort("excess", descending=True)
            .head(top)
        )
        for row in steps.to_dicts():
            found.append({
                "batch_size": int(batch_size), "from_tokens": row["from_tokens"], "to_tokens": row["to_tokens"],
                "k": row["k"], "from_ms": row["from_ms"], "to_ms": row["to_ms"],
                "drop_pct": 100 * row["drop"], "excess_pct": 100 * row["excess"],
            })
    return pl.DataFrame(found, schema=schema, orient="row") if found else pl.DataFrame(schema=schema)


def find_curve_steps(frame: pl.DataFrame, *, top: int = 8) -> pl.DataFrame:
    """:func:`find_steps` of each curve of a profile: one per layer (the proxy's is null).

    Returns:
        The rows of :func:`find_steps` with a ``layer`` column first.
    """
    if "layer" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, dtype=pl.Int64).alias("layer"))
    parts = []
    for layer in frame["layer"].unique(maintain_order=True).sort(nulls_last=False).to_list():
        curve = frame.filter(pl.col("layer").is_null() if layer is None else pl.col("layer") == layer)
        steps = find_steps(curve, top=top)
        parts.append(steps.select(pl.lit(layer, dtype=pl.Int64).alias("layer"), pl.all()))
    return pl.concat(parts) if parts else find_steps(frame, top=top).select(
        pl.lit(None, dtype=pl.Int64).alias("layer"), pl.all())


_RESUME_FIELDS = ("model", "num_tokens", "num_prefix", "img_size", "dtype", "batch_sizes", "grid", "timing_mode",
                  "device_preset", "torch_device", "workload", "layers")


def _show(value: object) -> str:
    if isinstance(value, list) and len(value) > 6:
        return f"[{value[0]}, {value[1]}, ..., {value[-1]}] ({len(value)} values)"
    return str(value)


def read_latency_profile(path: str | Path) -> tuple[pl.DataFrame, LatencyMeta]:
    """The frame and metadata of a latency profile file.

    Raises:
        PomtError: not a readable pomt latency profile.
    """
    frame, raw = read_profile(path, "latency")
    try:
        meta = LatencyMeta.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PomtError(
            f"{path} is not a latency profile of this pomt version (metadata field "
            f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}): measure it again"
        ) from None
    return frame, meta


def resume_rows(path: str | Path, expected: LatencyMeta) -> tuple[pl.DataFrame, LatencyMeta]:
    """The finished rows of the profile at ``path``, checked to belong to the run ``expected`` describes.

    Raises:
        PomtError: the file is not a latency profile, or was measured for another model,
            grid, batch sizes, dtype, timing mode or device.
    """
    frame, meta = read_latency_profile(path)
    for name in _RESUME_FIELDS:
        old, new = getattr(meta, name), getattr(expected, name)
        if old != new:
            raise PomtError(
                f"--resume {path} was measured with {name} {_show(old)}, but this run has {_show(new)}: "
                "resume with the same options, or leave out --resume to start afresh"
            )
    layers = expected.layers if expected.workload == "pomt" else [None]
    wanted = {(layer, b, n) for layer in layers for b in expected.batch_sizes for n in expected.grid}
    found = set(zip(frame["layer"].to_list(), frame["batch_size"].to_list(), frame["tokens"].to_list()))
    if found - wanted:
        raise PomtError(f"--resume {path} holds points outside its own grid: it is damaged; start afresh")
    return frame, meta
