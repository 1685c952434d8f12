"""Choosing R: how many tokens to prune, from a latency profile and an accuracy profile.

The two profiles are joined on the kept-token count n. For each batch size of the latency
profile, every common grid point gets

- the paper's utility ``U(n) = alpha * (1 - L(n) / max L) + (1 - alpha) * A(n) / max A``
  (maxima over the common points of that batch size),
- the latency saved and the accuracy lost relative to the largest common n (the full
  model when the grid contains N),

and one n is chosen by one criterion: the largest utility (ties: the larger n), the most
accurate n within a latency budget, or the fastest n within an accuracy drop. The answer
is ``R = N - n``: pruning R tokens leaves n of the N tokens.

When both profiles carry POMT's ``layer`` (``pomt profile --method pomt --layer ...`` and
``pomt estimate-accuracy --estimator pomt --layer ...``) they are joined on (layer, n) and
the criterion chooses the layer and R together, among the unpruned model (R = 0, whose
latency is the median of every layer's n = N point) and the pruned points. With the
paper's proxy latency (every block at n) the prediction is labelled as the proxy's.
Either way only pruned points faster than the unpruned model beyond both intervals
(``ci_high_ms`` below its ``ci_low_ms``, :func:`paying_points`) are candidates; when none
is, the answer is R = 0: pruning does not pay at that batch size.

Each choice also carries its predicted saving as a ratio (:func:`latency_ratio`): the
chosen point's latency over the same curve's unpruned point (the same layer, n = N), with
the interval of that ratio from the two points' confidence intervals. ``pomt bench``
multiplies its own measurement of the unpruned model by this ratio, so that an offset
common to the whole profile (its short visits against bench's long rounds) cancels.

Everything here returns data and raises :class:`~pomt_cli.errors.PomtError` for bad input;
the report (:class:`Report`) is the JSON file that ``pomt bench --r-from`` reads.

``pomt refine`` measures the best pruned candidates (:func:`refine_candidates`) again beside
the unpruned model, in interleaved rounds on the device, and :func:`rechoose` makes the
choice again with their refined ratios on the profile's scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pomt_cli.defaults import DEFAULT_ALPHA, REFINE_CANDIDATES
from pomt_cli.errors import PomtError
from pomt_cli.formats.common import GEOMETRY_FIELDS
from pomt_cli.formats.accuracy import AccuracyMeta, read_accuracy
from pomt_cli.formats.latency import LatencyMeta, read_latency
from pomt_cli.formats.report import Choice, Criterion, ProfileInput, Report, sha256_file
from pomt_cli.measure.steps import VISITS_AGREE, visit_spread

#: Candidates listed per batch size.
TOP_CANDIDATES = 10
#: Utilities closer than this count as a tie (broken towards the larger n).
UTILITY_TIE = 1e-12


class SelectionSettings(BaseModel):
    """Which criterion chooses n, and its parameter.

    ``alpha`` is always set: it weighs the utility column (shown in every mode) and
    chooses n only when ``criterion`` is ``"utility"``.
    """

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    criterion: Criterion = "utility"
    alpha: float = Field(DEFAULT_ALPHA, ge=0.0, le=1.0)
    latency_budget_ms: float | None = Field(None, gt=0.0)
    max_accuracy_drop: float | None = Field(None, ge=0.0, le=100.0)

    @model_validator(mode="after")
    def _parameter_of_the_criterion(self) -> SelectionSettings:
        """The criterion's own parameter is given, and no other criterion's (it would be ignored)."""
        for criterion, name in (("latency_budget", "latency_budget_ms"), ("max_accuracy_drop", "max_accuracy_drop")):
            given = getattr(self, name) is not None
            if self.criterion == criterion and not given:
                raise ValueError(f"criterion {criterion!r} needs {name}")
            if self.criterion != criterion and given:
                raise ValueError(f"{name} is the parameter of criterion {criterion!r}, not of {self.criterion!r}: "
                                 f"set criterion={criterion!r}")
        return self


@dataclass(frozen=True)
class Selection:
    """What :func:`compute_r` found.

    Attributes:
        report: the report to write.
        curves: per batch size, every common point scored (:func:`score`), n descending.
        candidates: per batch size, the best points by the criterion (at most
            :data:`TOP_CANDIDATES`), best first; the first row is the choice.
        points: per batch size, the common points before the unpruned ones are merged
            (each layer's own n = N point, with the intervals).
    """

    report: Report
    curves: dict[int, pl.DataFrame]
    candidates: dict[int, pl.DataFrame]
    points: dict[int, pl.DataFrame] = field(default_factory=dict)


def utility(latency_ms: pl.Series, accuracy: pl.Series, alpha: float,
            maxima: tuple[float, float] | None = None) -> pl.Series:
    """The paper's utility ``alpha * (1 - L / max L) + (1 - alpha) * A / max A``.

    When every accuracy is 0 the accuracy term is 0 (it cannot tell the points apart).

    Args:
        latency_ms: L(n) of the candidate points.
        accuracy: A(n) of the same points, in the same order.
        alpha: weight of latency, in [0, 1].
        maxima: ``(max L, max A)`` of a larger set of points (default: of these points).
    """
    max_l, max_a = maxima if maxima is not None else (latency_ms.max(), accuracy.max())
    latency_term = 1.0 - latency_ms / max_l
    accuracy_term = accuracy / max_a if max_a and max_a > 0 else accuracy * 0.0
    return (alpha * latency_term + (1.0 - alpha) * accuracy_term).alias("utility")


def score(points: pl.DataFrame, num_tokens: int, alpha: float, maxima: tuple[float, float] | None = None,
          carry: Sequence[str] = ()) -> pl.DataFrame:
    """Every point with R, the latency saved, the accuracy lost and the utility.

    Args:
        points: columns ``tokens, latency_ms, accuracy`` (one batch size, at least one row).
        num_tokens: N.
        alpha: the utility's weight of latency.
        maxima: the utility's ``(max L, max A)`` (default: over ``points``).
        carry: further columns of ``points`` kept at the end.

    Returns:
        ``tokens, R, latency_ms, latency_saved_pct, accuracy, accuracy_lost, utility``,
        n descending, then ``layer``, ``ci_low_ms`` and ``ci_high_ms`` where ``points`` has them. The
        reference of the saving and the loss is the largest n (one row: with layers, the
        unpruned model's, see :func:`merge_unpruned`).
    """
    extra = [c for c in ("layer", "ci_low_ms", "ci_high_ms") if c in points.columns] + list(carry)
    order = ["tokens", *(["layer"] if "layer" in extra else [])]
    frame = points.select("tokens", "latency_ms", "accuracy", *extra).sort(
        order, descending=[True] + [False] * (len(order) - 1))
    ref_latency = frame["latency_ms"][0]
    ref_accuracy = frame["accuracy"][0]
    return frame.with_columns(
        R=num_tokens - pl.col("tokens"),
        latency_saved_pct=100.0 * (1.0 - pl.col("latency_ms") / ref_latency),
        accuracy_lost=ref_accuracy - pl.col("accuracy"),
        utility=utility(frame["latency_ms"], frame["accuracy"], alpha, maxima),
    ).select("tokens", "R", "latency_ms", "latency_saved_pct", "accuracy", "accuracy_lost", "utility", *extra)


def _round_up(value: float) -> float:
    """``value`` rounded up to a precision that shows it (two decimals, more below 1)."""
    decimals = 2 if value >= 1 or value <= 0 else 2 - math.floor(math.log10(value))
    factor = 10**decimals
    rounded = math.ceil(value * factor - 1e-9) / factor
    return rounded if rounded >= value else rounded + 1 / factor


def _fmt(value: float) -> str:
    """A latency or accuracy as the messages show it (trailing zeros dropped)."""
    return f"{_round_up(value):.6f}".rstrip("0").rstrip(".")


def rank(scored: pl.DataFrame, settings: SelectionSettings, batch_size: int) -> pl.DataFrame:
    """The points that meet the criterion, best first (the first row is the choice).

    - utility: largest utility first; utilities within :data:`UTILITY_TIE` tie and the
      larger n wins (prune less).
    - latency budget: points with ``L <= budget``, highest accuracy first; ties: lower
      latency, then the larger n.
    - accuracy drop: points with ``A >= A(n_max) - drop``, lowest latency first; ties:
      higher accuracy, then the larger n.

    Args:
        scored: a frame of :func:`score` (one batch size).
        settings: the criterion.
        batch_size: for the messages.

    Raises:
        PomtError: no point meets the latency budget (the message gives the fastest point).
    """
    if settings.criterion == "utility":
        best = scored["utility"].max()
        tied = pl.col("utility") >= best - UTILITY_TIE
        # Within the tie, n decides before the utility (the two differ by rounding only).
        return (scored.with_columns(_tie=tied.cast(pl.Int8), _n=pl.when(tied).then(pl.col("tokens")).otherwise(0))
                .sort(["_tie", "_n", "utility", "tokens"], descending=[True, True, True, True], maintain_order=True)
                .drop("_tie", "_n"))
    if settings.criterion == "latency_budget":
        budget = settings.latency_budget_ms
        feasible = scored.filter(pl.col("latency_ms") <= budget)
        if feasible.is_empty():
            fastest = scored.sort(["latency_ms", "tokens"], descending=[False, True]).row(0, named=True)
            raise PomtError(
                f"no n meets --latency-budget {budget:g} ms at batch {batch_size}: the fastest point is "
                f"n={fastest['tokens']} at {fastest['latency_ms']:.2f} ms; give at least {_fmt(fastest['latency_ms'])}"
            )
        return feasible.sort(["accuracy", "latency_ms", "tokens"], descending=[True, False, True])
    reference = scored.sort("tokens", descending=True)["accuracy"][0]
    threshold = reference - settings.max_accuracy_drop
    # The largest n (the reference) always qualifies for a drop >= 0; the small slack
    # keeps a drop given to the displayed precision from missing a point by rounding.
    feasible = scored.filter(pl.col("accuracy") >= threshold - 1e-9)
    return feasible.sort(["latency_ms", "accuracy", "tokens"], descending=[False, True, True])


def check_geometry(latency_meta: LatencyMeta, accuracy_meta: AccuracyMeta, latency_path: Path,
                   accuracy_path: Path) -> list[str]:
    """Refuse profiles of different token geometries; describe allowed differences.

    Returns:
        One note per difference that is allowed: device, dtype, machine, an incomplete
        latency profile.

    Raises:
        PomtError: model name, N, p, depth or width differ.
    """
    differing = [f for f in GEOMETRY_FIELDS if getattr(latency_meta, f) != getattr(accuracy_meta, f)]
    if differing:
        parts = ", ".join(f"{f} {getattr(latency_meta, f)} vs {getattr(accuracy_meta, f)}" for f in differing)
        raise PomtError(
            f"{latency_path} and {accuracy_path} describe different models ({parts}): "
            "profile latency and accuracy of the same model"
        )
    notes: list[str] = []
    lat_device = (latency_meta.torch_device or "").split(":")[0]
    acc_device = accuracy_meta.device_type
    if lat_device and acc_device and lat_device != acc_device:
        notes.append(f"latency was measured on {latency_meta.device_preset or lat_device} "
                     f"({lat_device}), accuracy estimated on {acc_device}")
    if latency_meta.dtype != accuracy_meta.dtype:
        notes.append(f"latency was measured in {latency_meta.dtype}, accuracy estimated in {accuracy_meta.dtype}")
    lat_host, acc_host = latency_meta.recorded("host"), accuracy_meta.recorded("host")
    if lat_host != acc_host:
        notes.append(f"the profiles come from different machines (latency: {lat_host}, accuracy: {acc_host})")
    if latency_meta.recorded("complete") is False:
        notes.append(f"{latency_path} is an interrupted profile: only its measured points are used")
    return notes


def common_points(
    latency: pl.DataFrame,
    accuracy: pl.DataFrame,
    batch_size: int,
    latency_path: Path,
    accuracy_path: Path,
) -> pl.DataFrame:
    """The grid points of ``batch_size`` with a measured latency and an accuracy.

    Both frames may carry ``layer`` (null, or POMT's block): points are joined on
    (layer, n).

    Returns:
        ``tokens, latency_ms, accuracy, layer, ci_low_ms, ci_high_ms``, n descending (the
        interval is null where the profile has none).

    Raises:
        PomtError: fewer than 2 points in common.
    """
    def keyed(frame: pl.DataFrame) -> pl.DataFrame:
        layer = pl.col("layer") if "layer" in frame.columns else pl.lit(None, dtype=pl.Int64)
        return frame.with_columns(_key=layer.fill_null(-1).cast(pl.Int64), layer=layer.cast(pl.Int64))

    lat = keyed(latency.filter((pl.col("batch_size") == batch_size) & (pl.col("status") != "oom")
                               & pl.col("latency_ms").is_not_null() & pl.col("latency_ms").is_not_nan()))
    bounds = [pl.col(c).cast(pl.Float64) if c in lat.columns else pl.lit(None, dtype=pl.Float64).alias(c)
              for c in ("ci_low_ms", "ci_high_ms")]
    lat = lat.unique(["_key", "tokens"], keep="last").select("_key", "layer", "tokens", "latency_ms", *bounds)
    acc = (keyed(accuracy.filter(pl.col("accuracy").is_not_null() & pl.col("accuracy").is_not_nan()))
           .unique(["_key", "tokens"], keep="last").select("_key", "tokens", "accuracy"))
    joined = (lat.join(acc, on=["_key", "tokens"], how="inner")
              .sort(["_key", "tokens"], descending=[False, True])
              .select("tokens", "latency_ms", "accuracy", "layer", "ci_low_ms", "ci_high_ms"))
    if joined.height < 2:
        raise PomtError(
            f"{latency_path} and {accuracy_path} have {joined.height} grid point(s) in common at batch "
            f"{batch_size} (the latency profile has {lat.height} measured point(s), the accuracy profile "
            f"{acc.height}); at least 2 are needed: profile both on the same --tokens grid"
        )
    return joined


def profile_layers(frame: pl.DataFrame) -> list[int]:
    """POMT's layers a profile carries (empty for the proxy and the other estimators)."""
    if "layer" not in frame.columns:
        return []
    return sorted(frame["layer"].drop_nulls().unique().to_list())


def check_layers_match(latency_layers: list[int], accuracy_layers: list[int], latency_path: Path,
                       accuracy_path: Path) -> tuple[list[int], list[str]]:
    """The layers both profiles carry, and notes on those only one carries.

    Raises:
        PomtError: one profile has layers and the other none, or they share no layer.
    """
    shown = ",".join(map(str, latency_layers or accuracy_layers))
    if latency_layers and not accuracy_layers:
        raise PomtError(
            f"{latency_path} measured the POMT-patched model at layer(s) {shown}, but {accuracy_path} has no "
            f"layers: estimate accuracy with --estimator pomt --layer {shown} so that both carry the same layers")
    if accuracy_layers and not latency_layers:
        raise PomtError(
            f"{accuracy_path} holds POMT's accuracy at layer(s) {shown}, but {latency_path} is the all-blocks "
            f"proxy without layers: profile latency with --method pomt --layer {shown} so that both carry the "
            "same layers")
    common = [layer for layer in latency_layers if layer in accuracy_layers]
    if latency_layers and not common:
        raise PomtError(
            f"{latency_path} has layer(s) {','.join(map(str, latency_layers))} and {accuracy_path} layer(s) "
            f"{','.join(map(str, accuracy_layers))}: none in common; give both commands the same --layer")
    notes = []
    only = sorted(set(latency_layers) ^ set(accuracy_layers))
    if only:
        notes.append(f"layer(s) {', '.join(map(str, only))} are in one profile only and were left out")
    return common, notes


def merge_unpruned(points: pl.DataFrame, num_tokens: int, batch_size: int, latency_path: Path) -> pl.DataFrame:
    """With layers: every layer's n = N point is the same unpruned model; one row stands for them all.

    Its latency and interval are the medians over the layers, its layer the first
    (:func:`latency_ratio` reads each layer's own n = N point from the frame before the merge).

    Raises:
        PomtError: the common grid lacks n = N (the unpruned model was not measured).
    """
    full = points.filter(pl.col("tokens") == num_tokens)
    if full.is_empty():
        raise PomtError(
            f"{latency_path} has no point at n = {num_tokens} (the unpruned model) at batch {batch_size} in common "
            f"with the accuracy profile: profile both with a --tokens grid that starts at {num_tokens}")
    merged = full.sort("layer").head(1).with_columns(
        **{c: pl.lit(full[c].median(), dtype=pl.Float64) for c in ("latency_ms", "ci_low_ms", "ci_high_ms")})
    return pl.concat([merged, points.filter(pl.col("tokens") != num_tokens)])


class Ratio(BaseModel):
    """The predicted latency of a choice over the unpruned model's, from one curve of the profile."""

    ratio: float
    unpruned_ms: float
    low: float | None = None
    high: float | None = None


def latency_ratio(point: dict, unpruned: dict) -> Ratio:
    """``L(layer, n*) / L(layer, N)``: the chosen point over the same curve's unpruned point.

    The interval is the ratio's range over the two points' confidence intervals,
    ``ci_low(n*) / ci_high(N)`` to ``ci_high(n*) / ci_low(N)``; None when either point
    lacks one.

    Args:
        point: the chosen point (``latency_ms``, ``ci_low_ms``, ``ci_high_ms``).
        unpruned: the point at n = N on the same curve, with the same keys.
    """
    bounds = (point.get("ci_low_ms"), point.get("ci_high_ms"), unpruned.get("ci_low_ms"), unpruned.get("ci_high_ms"))
    whole = all(v is not None and v > 0 and not math.isnan(v) for v in bounds)
    return Ratio(ratio=point["latency_ms"] / unpruned["latency_ms"], unpruned_ms=unpruned["latency_ms"],
                 low=bounds[0] / bounds[3] if whole else None, high=bounds[1] / bounds[2] if whole else None)


def drift_note(latency: pl.DataFrame, batch_size: int, best: dict, num_tokens: int) -> str | None:
    """A note when the profile's visits of the chosen point or of its unpruned point disagreed.

    Visits whose medians lie further apart than :data:`~pomt_cli.measure.steps.VISITS_AGREE`
    show that the device drifted between them; the intervals of the pooled medians, and so
    the predicted ratio's, do not include that. None when R = 0, when the visits agree, or
    when the profile did not record them.
    """
    if best["R"] == 0 or "visit_low_ms" not in latency.columns:
        return None
    layer = pl.col("layer").is_null() if best.get("layer") is None else pl.col("layer") == best["layer"]
    rows = latency.filter((pl.col("batch_size") == batch_size) & layer
                          & pl.col("tokens").is_in([best["tokens"], num_tokens]) & pl.col("latency_ms").is_not_null())
    spread = (rows.with_columns(visit_spread(rows)).filter(pl.col("visit_spread") > VISITS_AGREE)
              .select("tokens", "visit_low_ms", "visit_high_ms", "visit_spread").sort("tokens", descending=True))
    if spread.is_empty():
        return None
    where = "; ".join(f"n = {n}: {low:.3f} to {high:.3f} ms, {100 * v:.1f}% of its median"
                      for n, low, high, v in spread.iter_rows())
    return (f"batch {batch_size}: the profile's visits disagreed ({where}): the device drifted between them, "
            "which the predicted interval does not include: measure the choice side by side (pomt refine, "
            "pomt bench)")


def _ratio_of(best: dict, points: pl.DataFrame, num_tokens: int) -> Ratio | None:
    """The choice's :func:`latency_ratio` (1 for R = 0); None when its curve lacks n = N."""
    if best["R"] == 0:
        return Ratio(ratio=1.0, unpruned_ms=best["latency_ms"])
    curve = points.filter(pl.col("tokens") == num_tokens)
    if best.get("layer") is not None:
        curve = curve.filter(pl.col("layer") == best["layer"])
    if curve.is_empty():
        return None
    return latency_ratio(best, curve.row(0, named=True))


def paying_points(scored: pl.DataFrame) -> pl.DataFrame:
    """The reference (the first row, the largest n) and the points faster than it beyond the intervals.

    A point pays when its interval of the median lies wholly below the reference's (the
    rule of refine and bench): two equal settings then pass for different in under 1% of
    cases, where the point's interval below the reference's median alone let 8 to 11%
    through (docs/PERFORMANCE.md). A point or reference without an interval counts by its median.

    Args:
        scored: a frame of :func:`score` (one batch size), with ``ci_low_ms`` and ``ci_high_ms``.
    """
    reference = scored.row(0, named=True)
    low = reference["ci_low_ms"]
    ceiling = reference["latency_ms"] if low is None or math.isnan(low) else low
    high = pl.col("ci_high_ms").fill_null(pl.col("latency_ms"))
    return scored.filter((pl.col("tokens") == reference["tokens"]) | (high < ceiling))


def _input_record(path: Path, meta: LatencyMeta | AccuracyMeta) -> ProfileInput:
    """The report's record of one input profile: the fields of :class:`ProfileInput` that the file holds."""
    fields = {k: getattr(meta, k) for k in ProfileInput.model_fields
              if k in meta.model_fields_set and k not in ("path", "sha256")}
    return ProfileInput(path=str(path.resolve()), sha256=sha256_file(path), **fields)


def compute_r(
    latency_path: str | Path,
    accuracy_path: str | Path,
    settings: SelectionSettings,
    batch_sizes: Sequence[int] | None = None,
) -> Selection:
    """Read both profiles, check that they fit together and choose n for each batch size.

    Args:
        latency_path: a latency profile (``pomt profile``).
        accuracy_path: an accuracy profile (``pomt estimate-accuracy``).
        settings: the criterion.
        batch_sizes: only these batch sizes of the latency profile (default: all, in the
            profile's order).

    Raises:
        PomtError: a missing, corrupt or wrong-kind file, different models, a batch size
            the profile lacks, fewer than 2 common points, an infeasible budget.
    """
    latency_path, accuracy_path = Path(latency_path), Path(accuracy_path)
    latency, latency_meta = read_latency(latency_path)
    accuracy, accuracy_meta = read_accuracy(accuracy_path)
    notes = check_geometry(latency_meta, accuracy_meta, latency_path, accuracy_path)
    available = list(latency_meta.batch_sizes or [])
    for b in latency["batch_size"].unique(maintain_order=True).to_list():
        if b not in available:
            available.append(b)
    if batch_sizes is None:
        chosen = [b for b in available if not latency.filter(pl.col("batch_size") == b).is_empty()]
    else:
        missing = [b for b in batch_sizes if b not in available]
        if missing:
            raise PomtError(
                f"--batch-size {','.join(map(str, missing))} is not in {latency_path} (it has batch size(s) "
                f"{', '.join(map(str, available)) or 'none'}): give one of those or profile that batch size"
            )
        chosen = list(batch_sizes)
    if not chosen:
        raise PomtError(f"{latency_path} holds no measured points: run pomt profile again")

    num_tokens = latency_meta.num_tokens
    layers, layer_notes = check_layers_match(profile_layers(latency), profile_layers(accuracy), latency_path,
                                             accuracy_path)
    notes += layer_notes
    workload = "pomt" if layers else "proxy"
    if layers:
        latency = latency.filter(pl.col("layer").is_in(layers))
        accuracy = accuracy.filter(pl.col("layer").is_in(layers))
    else:
        notes.append("latency comes from the all-blocks proxy (every block at n tokens): a POMT model runs the "
                     "blocks up to its layer on all N tokens and pays for scoring, so the real saving will be "
                     "smaller than predicted; profile with --method pomt --layer L to predict the pruned model itself")
    curves: dict[int, pl.DataFrame] = {}
    candidates: dict[int, pl.DataFrame] = {}
    common: dict[int, pl.DataFrame] = {}
    choices: list[Choice] = []
    for b in chosen:
        curve_points = common_points(latency, accuracy, b, latency_path, accuracy_path)
        points = merge_unpruned(curve_points, num_tokens, b, latency_path) if layers else curve_points
        scored = score(points, num_tokens, settings.alpha)
        reference = scored.row(0, named=True)
        paying = paying_points(scored)
        pays = paying.height > 1
        if not pays:
            unpruned = "unpruned model" if reference["R"] == 0 else f"reference n = {reference['tokens']}"
            notes.append(f"batch {b}: pruning does not pay here: no pruned point is faster than the {unpruned} "
                         f"({reference['latency_ms']:.3f} ms) beyond both intervals, so R = {reference['R']}")
        ranked = rank(paying, settings, b)
        best = ranked.row(0, named=True)
        ratio = _ratio_of(best, curve_points, num_tokens)
        if (drift := drift_note(latency, b, best, num_tokens)) is not None:
            notes.append(drift)
        curves[b] = scored.drop("ci_low_ms", "ci_high_ms")
        candidates[b] = ranked.head(TOP_CANDIDATES).drop("ci_low_ms", "ci_high_ms")
        common[b] = curve_points
        choices.append(Choice(batch_size=b, reference_tokens=int(reference["tokens"]),
                              layer=best["layer"] if layers else None, workload=workload,
                              reference_ms=reference["latency_ms"], pays=pays,
                              latency_ratio=ratio.ratio if ratio else None,
                              latency_ratio_low=ratio.low if ratio else None,
                              latency_ratio_high=ratio.high if ratio else None,
                              unpruned_ms=ratio.unpruned_ms if ratio else None,
                              **{k: best[k] for k in ("R", "tokens", "latency_ms", "latency_saved_pct",
                                                      "accuracy", "accuracy_lost", "utility")}))

    first = choices[0]
    report = Report(
        model=latency_meta.model, num_tokens=num_tokens, num_prefix=latency_meta.num_prefix,
        num_blocks=latency_meta.num_blocks, embed_dim=latency_meta.embed_dim,
        criterion=settings.criterion, alpha=settings.alpha, latency_budget_ms=settings.latency_budget_ms,
        max_accuracy_drop=settings.max_accuracy_drop, R=first.R, tokens=first.tokens,
        batch_size=first.batch_size, layer=first.layer, workload=workload, layers=layers or None, choices=choices,
        latency=_input_record(latency_path, latency_meta), accuracy=_input_record(accuracy_path, accuracy_meta),
        notes=notes,
    )
    return Selection(report=report, curves=curves, candidates=candidates, points=common)


# Refining a choice (``pomt refine``): the candidates measured again side by side, and the
# choice made again among them.

def refine_candidates(curve: pl.DataFrame, settings: SelectionSettings, batch_size: int,
                      count: int = REFINE_CANDIDATES) -> pl.DataFrame:
    """The ``count`` best pruned points (R > 0) of one batch size by the criterion.

    Ranked like :func:`compute_r` ranks, but without its "faster beyond its interval"
    filter, so that the noise of one grid point cannot hide a point that pays.

    Args:
        curve: a frame of :func:`score` (one batch size, the unpruned row merged).
        settings: the report's criterion.
        batch_size: for the messages.
        count: at most this many points.

    Returns:
        The points, best first (empty when no pruned point meets a latency budget).
    """
    try:
        ranked = rank(curve, settings, batch_size)
    except PomtError:  # no point within the latency budget: nothing to measure
        return curve.head(0)
    return ranked.filter(pl.col("R") > 0).head(count)


@dataclass(frozen=True)
class Rechoice:
    """The choice of one batch size made again from a side-by-side measurement.

    Attributes:
        choice: the new choice (``refined`` True).
        table: every setting measured, unpruned first: ``layer, tokens, R, ms, ci_low_ms,
            ci_high_ms, samples, profile_ratio, ratio, ratio_low, ratio_high, chosen``.
        pays: whether a pruned candidate measured faster beyond the ratio's interval.
    """

    choice: Choice
    table: pl.DataFrame
    pays: bool


def _ratio_fields(ratio: Ratio) -> dict:
    return {"ratio": ratio.ratio, "ratio_low": ratio.low, "ratio_high": ratio.high}


def rechoose(curve: pl.DataFrame, points: pl.DataFrame, measured: pl.DataFrame, settings: SelectionSettings,
             batch_size: int, num_tokens: int) -> Rechoice:
    """Choose again among the unpruned model and the candidates, with their refined ratios.

    A candidate's latency becomes its refined ratio (its median over the unpruned
    model's, measured side by side) times the profile's unpruned latency (the reference
    compute-r chose against); the unpruned model keeps its profile latency. The points
    are scored with the maxima of the whole curve and ranked by the criterion. Only
    candidates whose ratio interval lies below 1 may be chosen; when none does, R = 0.

    Args:
        curve: the batch size's scored curve (:func:`score`, the unpruned row merged).
        points: the same batch size's common points before the merge
            (:attr:`Selection.points`), for each candidate's profile ratio.
        measured: ``layer, tokens, R, ms, ci_low_ms, ci_high_ms, samples``: the unpruned
            model (R = 0) and each candidate, as measured side by side; optionally
            ``ratio_low, ratio_high``, each candidate's interval of its ratio from the
            rounds (:func:`pomt_cli.measure.ratio.paired_ratio`), which then replaces the
            one from the two intervals of the median.
        settings: the report's criterion.
        batch_size: the batch size.
        num_tokens: N.

    Raises:
        PomtError: no setting meets the report's latency budget any more.
    """
    unpruned_rows = measured.filter(pl.col("R") == 0)
    if unpruned_rows.is_empty():
        raise ValueError("the unpruned model (R = 0) must be among the measured settings")
    unpruned = unpruned_rows.row(0, named=True)
    reference = curve.filter(pl.col("R") == 0).row(0, named=True)
    as_point = {"latency_ms": unpruned["ms"], "ci_low_ms": unpruned["ci_low_ms"], "ci_high_ms": unpruned["ci_high_ms"]}
    rows = [{"tokens": reference["tokens"], "layer": reference.get("layer"), "latency_ms": reference["latency_ms"],
             "accuracy": reference["accuracy"], "ci_low_ms": unpruned["ci_low_ms"],
             "ci_high_ms": unpruned["ci_high_ms"], "ms": unpruned["ms"], "samples": unpruned["samples"],
             "profile_ratio": 1.0, "ratio": 1.0, "ratio_low": None, "ratio_high": None}]
    for m in measured.filter(pl.col("R") > 0).iter_rows(named=True):
        where = (pl.col("tokens") == m["tokens"]) & (pl.col("layer") == m["layer"])
        on_curve, point = curve.filter(where), points.filter(where)
        if on_curve.is_empty() or point.is_empty():
            raise ValueError(f"layer {m['layer']}, n = {m['tokens']} is not on the curve of batch {batch_size}")
        ratio = latency_ratio({"latency_ms": m["ms"], "ci_low_ms": m["ci_low_ms"], "ci_high_ms": m["ci_high_ms"]},
                              as_point)
        if m.get("ratio_low") is not None and m.get("ratio_high") is not None:
            ratio = ratio.model_copy(update={"low": m["ratio_low"], "high": m["ratio_high"]})
        profile = _ratio_of({**point.row(0, named=True), "R": m["R"]}, points, num_tokens)
        rows.append({"tokens": m["tokens"], "layer": m["layer"], "latency_ms": ratio.ratio * reference["latency_ms"],
                     "accuracy": on_curve["accuracy"][0], "ci_low_ms": m["ci_low_ms"], "ci_high_ms": m["ci_high_ms"],
                     "ms": m["ms"], "samples": m["samples"], "profile_ratio": profile.ratio if profile else None,
                     **_ratio_fields(ratio)})
    floats = ("latency_ms", "accuracy", "ci_low_ms", "ci_high_ms", "ms", "profile_ratio", "ratio", "ratio_low",
              "ratio_high")
    frame = pl.DataFrame(rows, schema={"tokens": pl.Int64, "layer": pl.Int64, "samples": pl.Int64,
                                       **{c: pl.Float64 for c in floats}})
    maxima = (curve["latency_ms"].max(), curve["accuracy"].max())
    scored = score(frame, num_tokens, settings.alpha, maxima,
                   carry=("ms", "samples", "profile_ratio", "ratio", "ratio_low", "ratio_high"))
    # Side by side, a candidate pays only when its interval says so: one without (too few samples) is unproven.
    paying = scored.filter((pl.col("R") == 0) | (pl.col("ratio_high").is_not_null() & (pl.col("ratio_high") < 1.0)))
    try:
        best = rank(paying, settings, batch_size).row(0, named=True)
    except PomtError:
        fastest = scored.sort("latency_ms").row(0, named=True)
        raise PomtError(
            f"measured side by side, no setting meets the report's latency budget {settings.latency_budget_ms:g} ms "
            f"at batch {batch_size} (the fastest reads {fastest['latency_ms']:.3f} ms on the profile's scale): "
            "run pomt compute-r with a larger --latency-budget") from None
    pays = paying.height > 1
    pruned = best["R"] > 0
    choice = Choice(
        batch_size=batch_size, reference_tokens=int(reference["tokens"]), layer=best["layer"], workload="pomt",
        reference_ms=reference["latency_ms"], pays=pays, latency_ratio=best["ratio"],
        latency_ratio_low=best["ratio_low"] if pruned else None, latency_ratio_high=best["ratio_high"] if pruned else None,
        unpruned_ms=unpruned["ms"], refined=True, refined_ms=best["ms"], refined_unpruned_ms=unpruned["ms"],
        **{k: best[k] for k in ("R", "tokens", "latency_ms", "latency_saved_pct", "accuracy", "accuracy_lost",
                                "utility")})
    chosen = (pl.col("R") == best["R"]) & ((pl.col("R") == 0) | (pl.col("layer") == best["layer"]))
    table = scored.select("layer", "tokens", "R", "ms", "ci_low_ms", "ci_high_ms", "samples", "profile_ratio",
                          "ratio", "ratio_low", "ratio_high", chosen=chosen)
    return Rechoice(choice=choice, table=table, pays=pays)

