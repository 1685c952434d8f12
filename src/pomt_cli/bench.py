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
from pomt_cli.pruning.geometry import TokenGeometry
from pomt_cli.pruning import capped_from, geometry, none, remove, removed_per_block, token_counts
from pomt_cli.measure.runtimes import Prepared, Runtime, RuntimeOptions, prepare, weights_digest
from pomt_cli.measure.ratio import paired_ratio
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
    """One setting timed in one round, or (``preparing``) made ready in a runtime (for progress bars)."""

    done: int
    total: int
    batch_size: int
    method: str
    round: int
    runtime: str = Runtime.eager.value
    preparing: bool = False


def reference_runtime(runtimes: Sequence[Runtime]) -> Runtime:
    """The runtime every row is compared with across runtimes: eager when benched, else the first."""
    return Runtime.eager if Runtime.eager in runtimes else Runtime(runtimes[0])


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


def _random_inputs(g: TokenGeometry, batch_size: int, timing: BenchTiming, device: torch.device) -> torch.Tensor | None:
    """The seeded random batch a bench times on, or None when it does not fit in memory."""
    generator = torch.Generator().manual_seed(timing.seed)
    try:
        return torch.randn(batch_size, *g.input_size, generator=generator).to(device=device, dtype=timing.dtype)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        release_memory(device)
        return None


Timed = dict[tuple[str, int, str], tuple[Measurement, int]]
"""``{(runtime, batch size, label): (measurement, tokens leaving the last block)}``."""


def time_methods(
    model: nn.Module,
    plan: Mapping[int, Sequence[MethodSetting]],
    timing: BenchTiming,
    *,
    device: torch.device,
    on_progress: Callable[[BenchProgress], None] | None = None,
) -> dict[tuple[int, str], tuple[Measurement, int]]:
    """Latency of each batch size's settings (``plan``) in ``timing.runtime``, in interleaved rounds.

    Returns:
        ``{(batch_size, label): (measurement, tokens leaving the last block)}``.
    """
    timed = time_runtimes(model, plan, timing, [timing.runtime], device=device, on_progress=on_progress)
    return {(b, label): value for (_, b, label), value in timed.items()}


def time_runtimes(
    model: nn.Module,
    plan: Mapping[int, Sequence[MethodSetting]],
    timing: BenchTiming,
    runtimes: Sequence[Runtime],
    *,
    device: torch.device,
    on_progress: Callable[[BenchProgress], None] | None = None,
) -> Timed:
    """Latency of each batch size's settings (``plan``) in each runtime, in the same interleaved rounds.

    The model must be on ``device`` in ``timing.dtype``; it is left unpatched. First every
    (runtime, setting) of every batch size that is not eager is made ready
    (:func:`pomt_cli.measure.runtimes.prepare`: exported or compiled, untimed), so that a
    workload a runtime refuses fails before anything is timed. Then, per batch size, each
    round visits every (runtime, setting) in one seeded shuffled order, and each pair's
    samples are pooled over the rounds: drift and background load fall on all runtimes
    and settings alike.
    """
    runtimes = [Runtime(r) for r in runtimes]
    g = geometry(model)
    mode = "cuda_graph" if timing.cuda_graphs else "eager"
    dtype = str(timing.dtype).removeprefix("torch.")
    rng = random.Random(timing.seed)
    results: Timed = {}
    digest = weights_digest(model) if Runtime.onnxruntime in runtimes else None
    compiled = [r for r in runtimes if r is not Runtime.eager]
    try:
        # The runtimes made ready beforehand need every batch size's inputs at once; eager
        # alone holds one batch size's at a time.
        inputs = {b: _random_inputs(g, b, timing, device) for b in plan} if compiled else {}
        ready: dict[tuple[str, int, str], Prepared] = {}
        to_prepare = [(r, b, s) for r in compiled for b, settings in plan.items() if inputs[b] is not None
                      for s in settings]
        for done, (runtime, b, s) in enumerate(to_prepare):
            if on_progress is not None:  # before each: an export or a compilation may take long
                on_progress(BenchProgress(done, len(to_prepare), b, s.label, 0, runtime.value, preparing=True))
            s.apply_to(model)
            ready[(runtime.value, b, s.label)] = prepare(model, inputs[b], runtime, label=s.label, weights=digest,
                                                         options=timing.runtime_options)
        if to_prepare and on_progress is not None:
            runtime, b, s = to_prepare[-1]
            on_progress(BenchProgress(len(to_prepare), len(to_prepare), b, s.label, 0, runtime.value,
                                      preparing=True))
        remove(model)
        total = sum(len(settings) for settings in plan.values()) * len(runtimes) * timing.rounds
        done = 0
        for batch_size, settings in plan.items():
            images = inputs.pop(batch_size) if batch_size in inputs else _random_inputs(g, batch_size, timing, device)
            if images is None:  # the inputs alone do not fit: every method is out of memory
                for runtime in runtimes:
                    for s in settings:
                        results[(runtime.value, batch_size, s.label)] = (
                            Measurement.out_of_memory("inputs do not fit", mode=mode,
                                                      rel_precision=timing.rel_precision,
                                                      task=Task(s.label, g.name, batch_size, dtype=dtype)),
                            _planned_out(s.apply_to(model)))
                remove(model)
                continue
            visits = [(r, s) for r in runtimes for s in settings]
            parts: dict[tuple[str, str], list[Measurement]] = {(r.value, s.label): [] for r, s in visits}
            leaving: dict[str, int] = {}
            for round_ in range(timing.rounds):
                order = list(visits)
                rng.shuffle(order)
                for runtime, s in order:
                    s.apply_to(model)  # eager calls the model as patched now; the others were made ready
                    prepared = ready.get((runtime.value, batch_size, s.label))
                    if prepared is None:
                        prepared = prepare(model, images, runtime, label=s.label, options=timing.runtime_options)
                    with torch.inference_mode():
                        m = measure(prepared.fn, device=device, rel_precision=timing.rel_precision,
                                    budget_s=timing.budget_s, min_samples=timing.min_samples, warmup=timing.warmup,
                                    cuda_graphs=timing.cuda_graphs, task=Task(s.label, g.name, batch_size, dtype=dtype))
                    if m.status != "oom" and s.label not in leaving:
                        with torch.inference_mode():
                            model(images[:1])
                        leaving[s.label] = token_counts(model)[-1]
                    parts[(runtime.value, s.label)].append(m)
                    done += 1
                    if on_progress is not None:
                        on_progress(BenchProgress(done, total, batch_size, s.label, round_, runtime.value))
            for runtime, s in visits:
                merged = Measurement.pool(parts[(runtime.value, s.label)])
                results[(runtime.value, batch_size, s.label)] = (
                    merged, leaving.get(s.label, _planned_out(s.apply_to(model))))
            remove(model)
            for key in [k for k in ready if k[1] == batch_size]:
                del ready[key]  # this batch size's graphs and sessions are done with
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
    """Whether ``row`` measured slower than ``none`` beyond the interval of their ratio.

    The interval is :func:`~pomt_cli.measure.ratio.paired_ratio`'s: the pooled intervals
    of the median and, over two rounds or more, the drift between rounds. None when
    there is no interval (out of memory, too few samples) or ``row`` is ``none`` itself.
    """
    if none is None or row is none:
        return None
    ratio = paired_ratio(row, none)
    return None if ratio is None else ratio.above_one


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
    *,
    runtime: Runtime = Runtime.eager,
    judged: bool = True,
) -> pl.DataFrame:
    """The report of one runtime: one row per (batch size, method), changes against ``none`` when it was run.

    A row with a prediction (from a compute-r report) carries it (:func:`prediction_columns`),
    the workload that made it, and the prediction error ``measured / predicted - 1``. Each
    row but ``none`` carries the interval of its change against ``none`` from the pooled
    samples and the rounds (``change_low_pct``, ``change_high_pct``:
    :func:`~pomt_cli.measure.ratio.paired_ratio`) and says whether it measured slower than
    ``none`` beyond that interval (unless ``judged`` is False). ``runtime_change_pct`` is
    ``latency_change_pct``: the runtime is its own reference (:func:`runtimes_frame`
    compares runtimes).
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
            ratio = paired_ratio(m, base_m) if base_m is not None and m is not base_m else None
            rows.append({
                "batch_size": b, "method": s.method, "setting": s.label, "tokens_out": leaving,
                "latency_ms": m.median_ms, "p10_ms": m.p10_ms, "p90_ms": m.p90_ms,
                "ci_low_ms": m.ci_low_ms, "ci_high_ms": m.ci_high_ms, "samples": m.samples, "status": m.status,
                "latency_change_pct": change,
                "change_low_pct": 100 * (ratio.low - 1) if ratio and ratio.low is not None else None,
                "change_high_pct": 100 * (ratio.high - 1) if ratio and ratio.high is not None else None,
                "speedup": base_ms / m.median_ms if base_ms and m.median_ms else None,
                "accuracy": acc[0] if acc else None, "top5": acc[1] if acc else None,
                "accuracy_change": acc[0] - base_acc[0] if acc and base_acc else None,
                "images": acc[2] if acc else None,
                **prediction_columns(predictions.get((b, s.label)), m.median_ms, base_ms),
                "slower_than_none": ratio.above_one if judged and ratio is not None else None,
                "runtime": Runtime(runtime).value, "runtime_change_pct": change,
            })
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def runtimes_frame(
    plan: Mapping[int, Sequence[MethodSetting]],
    timed: Timed,
    runtimes: Sequence[Runtime],
    accuracy: dict[str, tuple[float, float, int]] | None,
    predictions: Predictions | None = None,
    predicted_runtime: Runtime | None = None,
) -> pl.DataFrame:
    """The report of several runtimes: per batch size, each runtime's rows (:func:`bench_frame`) in turn.

    ``latency_change_pct`` compares with the ``none`` of the same runtime and batch size,
    ``runtime_change_pct`` with the ``none`` of :func:`reference_runtime` at the same batch
    size. Predictions and ``slower_than_none`` belong to the rows of ``predicted_runtime``
    (the compute-r report's runtime) when one is given, else ``slower_than_none`` to every row.
    """
    runtimes = [Runtime(r) for r in runtimes]
    frames = []
    for runtime in runtimes:
        own = {(b, label): value for (r, b, label), value in timed.items() if r == runtime.value}
        mine = predicted_runtime is None or runtime is Runtime(predicted_runtime)
        frames.append(bench_frame(plan, own, accuracy, predictions if mine else None, runtime=runtime,
                                  judged=mine))
    order = {b: i for i, b in enumerate(plan)}
    frame = pl.concat(frames).with_row_index("_row").sort(
        pl.col("batch_size").replace_strict(order, return_dtype=pl.Int64), "_row").drop("_row")
    reference = (frame.filter((pl.col("runtime") == reference_runtime(runtimes).value)
                              & (pl.col("method") == BASELINE))
                 .select("batch_size", pl.col("latency_ms").alias("_reference_ms")))
    change = 100 * (pl.col("latency_ms") / pl.col("_reference_ms") - 1)
    return (frame.join(reference, on="batch_size", how="left", maintain_order="left")
            .with_columns(runtime_change_pct=pl.when(pl.col("_reference_ms") > 0).then(change))
            .select(list(SCHEMA)))


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
    measured_low_pct: float | None = None
    measured_high_pct: float | None = None
    profile_ms: float | None
    predicted_ms: float | None
    measured_ms: float | None
    prediction_error: float | None
    slower: bool | None = Field(description="measured slower than none beyond the interval of their ratio "
                                            "(None: unknown)")


def check_choices(frame: pl.DataFrame, choices: Iterable[Choice], runtime: str | None = None) -> list[ChoiceCheck]:
    """Each choice with its bench row: the chosen POMT setting, or ``none`` when R = 0.

    With ``runtime`` (the report's, in a bench of several runtimes) only that runtime's rows count.
    """
    if runtime is not None:
        frame = frame.filter(pl.col("runtime") == runtime)
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
            measured_low_pct=-row["change_high_pct"] if pruned and row["change_high_pct"] is not None else None,
            measured_high_pct=-row["change_low_pct"] if pruned and row["change_low_pct"] is not None else None,
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
        if check.measured_low_pct is not None and check.measured_high_pct is not None:
            parts[-1] += f" ({check.measured_low_pct:.1f}% to {check.measured_high_pct:.1f}%)"
    saving = f" saving {', '.join(parts)};" if parts else ""
    verdict = {True: "SLOWER than none beyond the interval", False: "not slower than none beyond the interval",
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
