"""Step analysis of a latency curve: where L(n) drops."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import polars as pl


#: The widest gap between grid points (in tokens) across which a drop counts as a step: on
#: a coarser grid a drop cannot be told from the curve's bending.
MAX_STEP_WIDTH = 4


#: Neighbouring pairs of grid points over which find_steps takes the curve's local trend.
TREND_WINDOW = 15


#: Grid points either side of a drop whose median tells a step from an excursion.
LEVEL_WINDOW = 6


#: The per-curve level of the threshold on a drop's excess (Bonferroni over the pairs). The
#: MAD's own noise and the excesses' tails make the rate of false steps higher: with it,
#: 3% or less of step-free curves of 196 points show a step (docs/PERFORMANCE.md).
STEP_LEVEL = 0.01


#: The fewest pairs of points that may place a step from which find_steps takes the curve's
#: roughness; with fewer, it takes it from all pairs.
MIN_ROUGH_PAIRS = 20


#: How closely (relative to its median) the visits' medians of a point that did not reach
#: the precision must agree for it to place a step: twice the default ``--rel-precision``,
#: as the grid's spike tolerance.
VISITS_AGREE = 0.02


def spread_factor(pairs: int, level: float = STEP_LEVEL) -> float:
    """How many scaled MADs of the excesses a step's excess must exceed, among ``pairs`` adjacent pairs.

    Were each excess normal with the MAD's scale on a curve without a step, the threshold
    ``z = Phi^-1(1 - level / pairs)`` would let noise pass it somewhere on ``level`` of
    such curves (Bonferroni); never below 3, the rule for short curves.
    """
    return max(3.0, NormalDist().inv_cdf(1.0 - level / max(pairs, 1)))


def _excursions(ms: np.ndarray, margin: float) -> np.ndarray:
    """For each adjacent pair of a curve (descending n), whether its drop is an excursion.

    It is when the curve rises back on either side: the pair's upper point lies clearly
    (``margin``, relative) above its upper neighbour or above the median of the
    :data:`LEVEL_WINDOW` points above it (it sits above its own level), or the lower
    point lies clearly below its lower neighbour or below the median of the points below
    it (a dip). A step leaves the curve at the higher level above it and at the lower
    level below it.
    """
    out = np.zeros(max(len(ms) - 1, 0), dtype=bool)
    for i in range(len(out)):
        above, below = ms[max(0, i - LEVEL_WINDOW):i], ms[i + 2:i + 2 + LEVEL_WINDOW]
        high = above.size > 0 and ms[i] > min(above[-1], np.median(above)) * (1 + margin)
        low = below.size > 0 and ms[i + 1] < max(below[0], np.median(below)) * (1 - margin)
        out[i] = high or low
    return out


def _levels(curve: pl.DataFrame, widen: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per point of ``curve``: the low and high ends of its level, and whether it may place a step.

    The level's ends are those of the confidence interval of the median, widened to take in
    every visit's own median (``visit_low_ms``, ``visit_high_ms``): a point whose visits
    disagree has drifted, which the interval of the pooled samples does not show. A
    point may place a step when its interval reached the precision asked for (``status``
    ``"ok"``), or when it was visited more than once and its visits' medians agree within
    :data:`VISITS_AGREE` of its median: its level held still between visits although
    its interval is wide (a profile with a short budget per point ends few points
    ``"ok"``). Any other point spent its budget first where timing is bound by the host
    and drifts, which cannot place a step. Columns a frame lacks (profiles of other tools,
    or written before the visits' medians were recorded) count as absent. With ``widen``
    False the ends are the interval's alone.
    """
    median = curve["latency_ms"].to_numpy()

    def column(name: str) -> np.ndarray:
        """The column as floats, NaN where it is null or absent."""
        if name not in curve.columns:
            return np.full(curve.height, np.nan)
        return curve[name].cast(pl.Float64).fill_null(np.nan).to_numpy()

    ok = (curve["status"] == "ok").to_numpy() if "status" in curve.columns else np.ones(curve.height, dtype=bool)
    ci_low, ci_high = column("ci_low_ms"), column("ci_high_ms")
    ci_low, ci_high = np.where(np.isnan(ci_low), median, ci_low), np.where(np.isnan(ci_high), median, ci_high)
    if widen:  # fmin and fmax pass over the NaN of a point visited once
        ci_low, ci_high = np.fmin(ci_low, column("visit_low_ms")), np.fmax(ci_high, column("visit_high_ms"))
    return ci_low, ci_high, ok | visits_agree(curve).to_numpy()


def visit_spread(frame: pl.DataFrame) -> pl.Series:
    """Per row of a profile: how far apart its visits' medians lie, relative to its median
    (null for a point visited once, or where the frame lacks the visits' medians)."""
    if "visit_low_ms" not in frame.columns or "visit_high_ms" not in frame.columns:
        return pl.repeat(None, frame.height, dtype=pl.Float64, eager=True).alias("visit_spread")
    return ((frame["visit_high_ms"] - frame["visit_low_ms"]) / frame["latency_ms"]).alias("visit_spread")


def visits_agree(frame: pl.DataFrame) -> pl.Series:
    """Per row of a profile: whether the point was visited more than once and its visits'
    medians lie within :data:`VISITS_AGREE` of its median (False where that is unknown)."""
    return (visit_spread(frame) <= VISITS_AGREE).fill_null(False).alias("visits_agree")


def find_steps(frame: pl.DataFrame, *, top: int = 8, min_drop: float = 0.02,
               excursions: bool = False, level: float = STEP_LEVEL) -> pl.DataFrame:
    """The largest latency steps: drops between adjacent grid points well beyond the curve's trend.

    For adjacent measured points n > n - k of one batch size the relative drop is
    ``d = (L(n) - L(n-k)) / L(n)``. A smooth curve drops by about ``s k / L(n)``, where
    ``s`` is its local slope in ms per token (the running median of
    ``(L(n) - L(n-k)) / k`` over :data:`TREND_WINDOW` neighbouring pairs, which follows a
    curve that bends and does not mistake a fixed overhead for steps); the excess
    ``d - s k / L(n)`` of a step is above ``min_drop``, the two points' levels (their
    confidence intervals of the median, widened to their visits' medians: :func:`_levels`)
    do not overlap, and they are at most :data:`MAX_STEP_WIDTH` tokens apart.
    Both the excess and the drop that is sure (the gap between the two intervals, relative)
    must stand out of the curve's roughness: the scaled median absolute deviation of the
    excesses of the pairs whose points may place a step (all pairs when fewer than
    :data:`MIN_ROUGH_PAIRS` may), times :func:`spread_factor` of ``level``, which grows
    with the number of pairs so that a long curve's noise does not pass it by chance.
    (Judged on the medians alone, a drop at that threshold is reported by one run and not
    by the next, as the threshold's estimate moves by more than the drop does.) Both points must be measured to the precision asked
    for (``status`` ``"ok"`` where the frame has it), or their visits must agree
    (:func:`_levels`): a point that spent its budget first is where timing is bound by the
    host and drifts, which cannot place a step unless its visits show that it held still.
    A drop where the curve rises back on either side (a point above the level of the
    points above it, or below the level of those below it: see :func:`_excursions`) is
    noise, such as single slow calls where eager timing is bound by the host, not a step;
    ``excursions=True`` keeps such drops and those of imprecise points too, and judges the
    intervals without the visits' medians (the grid visits the ends of all of them again).

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
        # The grid's search for drops to visit again (excursions) takes every drop that the
        # intervals alone allow: a neighbour's slow visit must not hide one.
        low, high, precise = _levels(curve, widen=not excursions)
        pairs = pl.DataFrame({
            "from_tokens": curve["tokens"][:-1],
            "to_tokens": curve["tokens"][1:],
            "from_ms": curve["latency_ms"][:-1],
            "to_ms": curve["latency_ms"][1:],
            # A step is significant when the levels (intervals of the median) do not overlap.
            "separated": low[:-1] > high[1:],
            "gap": (low[:-1] - high[1:]) / curve["latency_ms"].to_numpy()[:-1],
            "precise": precise[:-1] & precise[1:],
            "excursion": _excursions(curve["latency_ms"].to_numpy(), min_drop),
        }).with_columns(
            k=pl.col("from_tokens") - pl.col("to_tokens"),
            drop=(pl.col("from_ms") - pl.col("to_ms")) / pl.col("from_ms"),
        )
        slope = ((pl.col("from_ms") - pl.col("to_ms")) / pl.col("k")).rolling_median(
            window_size=TREND_WINDOW, center=True, min_samples=1)
        pairs = pairs.with_columns(excess=pl.col("drop") - slope * pl.col("k") / pl.col("from_ms"))
        # The roughness of the part of the curve that can place steps: drifting points (host-bound
        # timing) would raise it for all.
        settled = pairs.filter(pl.col("precise"))
        judged = settled if settled.height >= MIN_ROUGH_PAIRS else pairs
        spread = judged.select((pl.col("excess") - pl.col("excess").median()).abs().median()).item() * 1.4826
        rough = spread_factor(pairs.height, level) * spread
        steps = (
            pairs.filter((pl.col("drop") > 0) & pl.col("separated") & (pl.col("k") <= MAX_STEP_WIDTH)
                         & (excursions | (~pl.col("excursion") & pl.col("precise")))
                         & (pl.col("excess") > max(min_drop, rough)) & (pl.col("gap") > rough))
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


def step_pairs(steps: pl.DataFrame) -> set[tuple[int, int]]:
    """The (from_tokens, to_tokens) of each row of :func:`find_steps`."""
    return set(zip(steps["from_tokens"].to_list(), steps["to_tokens"].to_list()))


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


def cut_steps(steps: pl.DataFrame, top: int) -> tuple[pl.DataFrame, dict[tuple[int | None, int], int]]:
    """The first ``top`` steps of each curve of :func:`find_curve_steps`, and how many each leaves out.

    Returns:
        The rows kept (in their order), and per (layer, batch size) whose curve has more
        than ``top`` steps, the number of steps left out.
    """
    keys = ["layer", "batch_size"]
    kept = steps.group_by(keys, maintain_order=True).head(top).select(steps.columns)
    counts = steps.group_by(keys, maintain_order=True).len().iter_rows()
    return kept, {(layer, int(b)): n - top for layer, b, n in counts if n > top}
