"""The pruned model against the baseline, ToMe and Top-K: latency (and accuracy) side by side.

:func:`run_bench` patches one model in turn with each method's setting and times a forward
pass on random inputs with the timing engine (:func:`pomt_cli.measure.timing.measure`), for each
batch size. Methods are timed in interleaved rounds (each round visits the methods in a
fresh seeded order) and a method's samples are pooled over the rounds, so that drift and
background load fall on all methods alike and ratios are fair. With labelled images,
each method is also evaluated once on them (top-1, top-5).

With a compute-r report, a method's predicted latency is bench's own measurement of the
unpruned model at that batch size times the report's ratio (the profile's latency of the
chosen point over the same curve's unpruned point): an offset common to the whole profile,
such as its short visits against bench's long interleaved rounds, cancels in the ratio.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import polars as pl
import torch
from pydantic import BaseModel, Field
from torch import nn

from pomt_cli.accuracy.data import LabelledImages, evaluate
from pomt_cli.errors import PomtError
from pomt_cli.formats.bench import SCHEMA, MethodSetting
from pomt_cli.formats.report import Choice
from pomt_cli.pruning import capped_from, geometry, none, remove, removed_per_block, token_counts
from pomt_cli.measure.runtimes import Prepared, Runtime, RuntimeOptions, prepare, weights_digest
from pomt_cli.measure.timing import Measurement, Task, is_out_of_memory, measure, release_memory

#: The method every other is compared with (latency and accuracy changes, speedups).
BASELINE = none.NoReduction.name

class Prediction(BaseModel):
    """What a compute-r report predicts for one bench row.

    Attributes:
        profile_ms: the profile's own latency of the setting (for ``none``, of the unpruned model).
        ratio: the setting's latency over the unpruned model's, from one curve of the profile;
            None for ``none`` itself, whose measurement is the reference.
        low, high: the ratio's interval, when the profile stores confidence intervals.
        workload: ``pomt`` (the real pruned model) or ``proxy`` (the all-blocks proxy).
    """

    profile_ms: float | None = None
    ratio: float | None = None
    low: float | None = None
    high: float | None = None
    workload: str


Predictions = Mapping[tuple[int, str], Prediction]
"""``{(batch size, setting label): prediction}``."""


class BenchTiming(BaseModel):
    """How latency is measured (the timing engine's settings)."""

    dtype: torch.dtype = Field(torch.float32)
    cuda_graphs: bool = False
    rel_precision: float = Field(0.01, gt=0, lt=1)
    budget_s: float = Field(2.0, gt=0, description="seconds per method and round")
    min_samples: int = Field(10, ge=1)
    warmup: int = Field(3, ge=0)
    rounds: int = Field(3, ge=1)
    seed: int = 0
    runtime: Runtime = Runtime.eager
    runtime_options: RuntimeOptions = Field(default_factory=RuntimeOptions)

    model_config = {"arbitrary_types_allowed": True}


@dataclass(frozen=True)
class BenchProgress:
    """One method timed in one round (for progress bars)."""

    done: int
    total: int
    batch_size: int
    method: str
    round: int


def fit_settings(model: nn.Module, settings: Sequence[MethodSetting]) -> list[MethodSetting]:
    """Each setting checked against the model, with the tokens each block removes and ToMe's cap.

    The model is left unpatched.

    Raises:
        PomtError: a setting the model cannot take (r too large, layer out of range...).
    """
    fitted = []
    try:
        for s in settings:
            s.apply_to(model)
            fitted.append(s.model_copy(update={"per_block": removed_per_block(model), "capped_from": capped_from(model)}))
    except ValueError as exc:
        raise PomtError(f"{s.label}: {exc}") from None
    finally:
        remove(model)
    return fitted


def check_settings(model: nn.Module, settings: Sequence[MethodSetting]) -> list[int]:
    """Tokens leaving the last block for each setting; every setting checked against the model.

    Raises:
        PomtError: a setting the model cannot take (r too large, layer out of range...).
    """
    geometry_ = geometry(model)
    return [geometry_.num_tokens - sum(s.per_block) for s in fit_settings(model, settings)]


def _planned_out(model: nn.Module) -> int:
    return int(model.pomt_config["planned_tokens"][-1]) if hasattr(model, "pomt_config") else geometry(model).num_tokens


def time_methods(
    model: nn.Module,
    plan: Mapping[int, Sequence[MethodSetting]],
    timing: BenchTiming,
    *,
    device: torch.device,
    on_progress: Callable[[BenchProgress], None] | None = None,
) -> dict[tuple[int, str], tuple[Measurement, int]]:
    """Latency of each batch size's settings (``plan``), in interleaved rounds.

    The model must be on ``device`` in ``timing.dtype``; it is left unpatched. Each
    setting runs in ``timing.runtime``: with compile or onnxruntime it is made ready once
    per batch size (:func:`pomt_cli.measure.runtimes.prepare`) and kept across the rounds.

    Returns:
        ``{(batch_size, label): (measurement, tokens leaving the last block)}``.
    """
    g = geometry(model)
    mode = "cuda_graph" if timing.cuda_graphs else "eager"
    dtype = str(timing.dtype).removeprefix("torch.")
    rng = random.Random(timing.seed)
    total = sum(len(settings) for settings in plan.values()) * timing.rounds
    done = 0
    results: dict[tuple[int, str], tuple[Measurement, int]] = {}
    eager = timing.runtime is Runtime.eager
    digest = weights_digest(model) if timing.runtime is Runtime.onnxruntime else None
    try:
        for batch_size, settings in plan.items():
            generator = torch.Generator().manual_seed(timing.seed)
            try:
                images = torch.randn(batch_size, *g.input_size, generator=generator).to(device=device,
                                                                                       dtype=timing.dtype)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                images = None
            if images is None:  # the inputs alone do not fit: every method is out of memory
                release_memory(device)
                for s in settings:
                    results[(batch_size, s.label)] = (
                        Measurement.out_of_memory("inputs do not fit", mode=mode, rel_precision=timing.rel_precision,
                                                  task=Task(s.label, g.name, batch_size, dtype=dtype)),
                        _planned_out(s.apply_to(model)))
                remove(model)
                continue
            parts: dict[str, list[Measurement]] = {s.label: [] for s in settings}
            leaving: dict[str, int] = {}
            ready: dict[str, Prepared] = {}
            for round_ in range(timing.rounds):
                order = list(settings)
                rng.shuffle(order)
                for s in order:
                    s.apply_to(model)
                    prepared = ready.get(s.label)
                    if prepared is None:
                        prepared = prepare(model, images, timing.runtime, label=s.label, weights=digest,
                                           options=timing.runtime_options)
                        if not eager:  # eager calls the model as patched now: made again each round
                            ready[s.label] = prepared
                    with torch.inference_mode():
                        m = measure(prepared.fn, device=device, rel_precision=timing.rel_precision,
                                    budget_s=timing.budget_s, min_samples=timing.min_samples, warmup=timing.warmup,
                                    cuda_graphs=timing.cuda_graphs, task=Task(s.label, g.name, batch_size, dtype=dtype))
                    if m.status != "oom" and s.label not in leaving:
                        with torch.inference_mode():
                            model(images[:1])
                        leaving[s.label] = token_counts(model)[-1]
                    parts[s.label].append(m)
                    done += 1
                    if on_progress is not None:
                        on_progress(BenchProgress(done, total, batch_size, s.label, round_))
            for s in settings:
                merged = Measurement.pool(parts[s.label])
                results[(batch_size, s.label)] = (merged, leaving.get(s.label, _planned_out(s.apply_to(model))))
            remove(model)
    finally:
        remove(model)
    return results


def prediction_columns(prediction: Prediction | None, measured_ms: float | None, none_ms: float | None) -> dict:
    """The prediction columns of one row.

    ``predicted_ms`` is ``none_ms`` (bench's own unpruned measurement at that batch size)
    times the profile's ratio, ``prediction_error`` is measured / predicted - 1, and
    ``profile_ms`` keeps the profile's absolute latency. A prediction without a ratio (the
    unpruned model's, the reference) has no predicted ms and no error.
    """
    if prediction is None:
        return {"predicted_ms": None, "prediction_error": None, "predicted_by": None, "profile_ms": None,
                "predicted_ratio": None, "predicted_ratio_low": None, "predicted_ratio_high": None}
    predicted = none_ms * prediction.ratio if none_ms and prediction.ratio is not None else None
    error = measured_ms / predicted - 1 if measured_ms and predicted else None
    return {"predicted_ms": predicted, "prediction_error": error, "predicted_by": prediction.workload,
            "profile_ms": prediction.profile_ms, "predicted_ratio": prediction.ratio,
            "predicted_ratio_low": prediction.low, "predicted_ratio_high": prediction.high}


def slower_than_none(row: Measurement, none: Measurement | None) -> bool | None:
    """Whether ``row`` measured slower than ``none`` beyond both intervals (its CI above none's).

    None when either lacks an interval (out of memory) or ``row`` is ``none`` itself.
    """
    if none is None or row is none or None in (row.ci_low_ms, none.ci_high_ms):
        return None
    return row.ci_low_ms > none.ci_high_ms


def accuracy_of_methods(
    model: nn.Module,
    settings: Sequence[MethodSetting],
    data: LabelledImages,
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    on_done: Callable[[str], None] | None = None,
) -> dict[str, tuple[float, float, int]]:
    """``{label: (top-1 %, top-5 %, images)}`` of each setting on ``data`` (model left unpatched)."""
    out = {}
    try:
        for s in settings:
            counts = evaluate(s.apply_to(model), data, batch_size=batch_size, device=device, dtype=dtype)
            out[s.label] = (counts.top1_percent, counts.top5_percent, counts.images)
            if on_done is not None:
                on_done(s.label)
    finally:
        remove(model)
    return out


def bench_frame(
    plan: Mapping[int, Sequence[MethodSetting]],
    timed: dict[tuple[int, str], tuple[Measurement, int]],
    accuracy: dict[str, tuple[float, float, int]] | None,
    predictions: Predictions | None = None,
) -> pl.DataFrame:
    """The report: one row per (batch size, method), changes against ``none`` when it was run.

    A row with a prediction (from a compute-r report) carries it (:func:`prediction_columns`),
    the workload that made it, and the prediction error ``measured / predicted - 1``. Each
    row but ``none`` says whether it measured slower than ``none`` beyond both intervals.
    """
    predictions = predictions or {}
    rows = []
    for b, settings in plan.items():
        base = timed.get((b, BASELINE))
        base_ms = base[0].median_ms if base else None
        base_m = base[0] if base else None
        base_acc = accuracy.get(BASELINE) if accuracy else None
        for s in settings:
            m, leaving = timed[(b, s.label)]
            acc = accuracy.get(s.label) if accuracy else None
            change = 100 * (m.median_ms / base_ms - 1) if base_ms and m.median_ms else None
            rows.append({
                "batch_size": b, "method": s.method, "setting": s.label, "tokens_out": leaving,
                "latency_ms": m.median_ms, "p10_ms": m.p10_ms, "p90_ms": m.p90_ms,
                "ci_low_ms": m.ci_low_ms, "ci_high_ms": m.ci_high_ms, "samples": m.samples, "status": m.status,
                "latency_change_pct": change,
                "speedup": base_ms / m.median_ms if base_ms and m.median_ms else None,
                "accuracy": acc[0] if acc else None, "top5": acc[1] if acc else None,
                "accuracy_change": acc[0] - base_acc[0] if acc and base_acc else None,
                "images": acc[2] if acc else None,
                **prediction_columns(predictions.get((b, s.label)), m.median_ms, base_ms),
                "slower_than_none": slower_than_none(m, base_m),
            })
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


class ChoiceCheck(BaseModel):
    """A compute-r choice for one batch size against what bench measured.

    Savings are percentages of the unpruned model's latency (positive: faster). For R = 0
    nothing is predicted beyond the unpruned model: the predicted fields are None.
    """

    batch_size: int
    R: int
    layer: int | None
    pays: bool
    setting: str
    predicted_saving_pct: float | None
    saving_low_pct: float | None
    saving_high_pct: float | None
    measured_saving_pct: float | None
    profile_ms: float | None
    predicted_ms: float | None
    measured_ms: float | None
    prediction_error: float | None
    slower: bool | None = Field(description="measured slower than none beyond both intervals (None: unknown)")


def check_choices(frame: pl.DataFrame, choices: Iterable[Choice]) -> list[ChoiceCheck]:
    """Each choice with its bench row: the chosen POMT setting, or ``none`` when R = 0."""
    checks = []
    for c in choices:
        rows = frame.filter((pl.col("batch_size") == c.batch_size)
                            & (pl.col("method") == ("pomt" if c.R else BASELINE)))
        if rows.is_empty():
            continue
        row = rows.row(0, named=True)
        ratio, low, high = row["predicted_ratio"], row["predicted_ratio_low"], row["predicted_ratio_high"]
        pruned = c.R > 0
        checks.append(ChoiceCheck(
            batch_size=c.batch_size, R=c.R, layer=c.layer, pays=c.pays, setting=row["setting"],
            predicted_saving_pct=100 * (1 - ratio) if pruned and ratio is not None else None,
            saving_low_pct=100 * (1 - high) if pruned and high is not None else None,
            saving_high_pct=100 * (1 - low) if pruned and low is not None else None,
            measured_saving_pct=(-row["latency_change_pct"] if pruned and row["latency_change_pct"] is not None
                                 else None),
            profile_ms=row["profile_ms"], predicted_ms=row["predicted_ms"] if pruned else None,
            measured_ms=row["latency_ms"], prediction_error=row["prediction_error"] if pruned else None,
            slower=row["slower_than_none"] if pruned else False))
    return checks


def check_text(check: ChoiceCheck) -> str:
    """One sentence: the choice's predicted and measured saving, and whether it measured slower."""
    if check.R == 0:
        return (f"batch {check.batch_size}: R = 0, nothing is predicted beyond the unpruned model "
                "(never slower: it is the unpruned model)")
    parts = []
    if check.predicted_saving_pct is not None:
        parts.append(f"predicted {check.predicted_saving_pct:.1f}%")
        if check.saving_low_pct is not None and check.saving_high_pct is not None:
            parts[-1] += f" ({check.saving_low_pct:.1f}% to {check.saving_high_pct:.1f}%)"
    if check.measured_saving_pct is not None:
        parts.append(f"measured {check.measured_saving_pct:.1f}%")
    saving = f" saving {', '.join(parts)};" if parts else ""
    verdict = {True: "SLOWER than none beyond both intervals", False: "not slower than none beyond both intervals",
               None: "slower or not: unknown (no interval)"}[check.slower]
    return f"batch {check.batch_size}: {check.setting}:{saving} {verdict}"


class BenchPlan(BaseModel):
    """What one bench run times: each batch size's method settings, and the report's choices.

    Attributes:
        settings: per batch size, the settings timed (fitted to the model).
        predictions: ``{(batch size, setting label): prediction}`` from a compute-r report.
    """

    settings: dict[int, list[MethodSetting]]
    predictions: dict[tuple[int, str], Prediction] = Field(default_factory=dict)

    def distinct(self) -> list[MethodSetting]:
        """Each setting once (accuracy does not depend on the batch size)."""
        return list({s.label: s for group in self.settings.values() for s in group}.values())

    def slugs(self) -> list[str]:
        """The settings' parts of the report's file name, in plan order."""
        return list(dict.fromkeys(s.slug for group in self.settings.values() for s in group))
