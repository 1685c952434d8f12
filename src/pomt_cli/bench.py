"""The pruned model against the baseline, ToMe and Top-K: latency (and accuracy) side by side.

:func:`run_bench` patches one model in turn with each method's setting and times a forward
pass on random inputs with the timing engine (:func:`pomt_cli.measure.timing.measure`), for each
batch size. Methods are timed in interleaved rounds (each round visits the methods in a
fresh seeded order) and a method's samples are pooled over the rounds, so that drift and
background load fall on all methods alike and ratios are fair. With labelled images,
each method is also evaluated once on them (top-1, top-5).
"""

from __future__ import annotations

import datetime as _dt
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from pomt_cli import __version__
from pomt_cli.accuracy.data import LabelledImages, evaluate
from pomt_cli.formats.latency import ClockState, RuntimeName
from pomt_cli.errors import PomtError
from pomt_cli.formats.outputs import write_set
from pomt_cli.formats.common import command_line
from pomt_cli.pruning import apply, capped_from, geometry, none, remove, removed_per_block, token_counts
from pomt_cli.pruning.registry import get as get_method
from pomt_cli.measure.runtimes import Prepared, Runtime, RuntimeOptions, prepare, weights_digest
from pomt_cli.measure.timing import Measurement, Task, is_out_of_memory, measure, release_memory

#: The method every other is compared with (latency and accuracy changes, speedups).
BASELINE = none.NoReduction.name

SCHEMA: dict[str, pl.DataType] = {
    "batch_size": pl.Int64,
    "method": pl.String,
    "setting": pl.String,
    "tokens_out": pl.Int64,
    "latency_ms": pl.Float64,
    "p10_ms": pl.Float64,
    "p90_ms": pl.Float64,
    "ci_low_ms": pl.Float64,
    "ci_high_ms": pl.Float64,
    "samples": pl.Int64,
    "status": pl.String,
    "latency_change_pct": pl.Float64,
    "speedup": pl.Float64,
    "accuracy": pl.Float64,
    "top5": pl.Float64,
    "accuracy_change": pl.Float64,
    "images": pl.Int64,
    "predicted_ms": pl.Float64,
    "prediction_error": pl.Float64,
    "predicted_by": pl.String,
}
"""Columns of a bench report, one row per (batch size, method)."""

Predictions = Mapping[tuple[int, str], tuple[float, str]]
"""``{(batch size, setting label): (predicted ms, workload that predicted it)}``."""


class MethodSetting(BaseModel):
    """One method with its setting, as ``pomt_cli.pruning.apply`` takes it."""

    method: str
    r: int | list[int] = 0
    layer: int = 3
    #: Tokens each block removes on the model, as applied (ToMe's schedule after the
    #: per-block cap); filled in by :func:`fit_settings`.
    per_block: list[int] | None = None
    #: ToMe: the first block whose r the cap lowered (None: not capped, or not fitted yet).
    capped_from: int | None = None

    @field_validator("method")
    @classmethod
    def _registered(cls, method: str) -> str:
        get_method(method)
        return method

    @property
    def label(self) -> str:
        """``none``, ``pomt r=56 @3`` (r tokens pruned in block 3), ``tome r=8``, ``tome r=16 (capped from block 11)``."""
        label = get_method(self.method).label(self.r, self.layer)
        return label + (f" (capped from block {self.capped_from})" if self.capped_from is not None else "")

    @property
    def slug(self) -> str:
        """The setting in a file name: ``none``, ``pomt-r56-l3``, ``tome-r8``."""
        return get_method(self.method).slug(self.r, self.layer)

    def apply_to(self, model: nn.Module) -> nn.Module:
        return apply(model, self.method, r=self.r, layer=self.layer)


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


def prediction_columns(prediction: tuple[float, str] | None, measured_ms: float | None) -> dict:
    """``predicted_ms``, ``prediction_error`` (measured / predicted - 1) and ``predicted_by`` of one row."""
    if prediction is None:
        return {"predicted_ms": None, "prediction_error": None, "predicted_by": None}
    predicted, workload = prediction
    error = measured_ms / predicted - 1 if measured_ms and predicted else None
    return {"predicted_ms": predicted, "prediction_error": error, "predicted_by": workload}


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

    A row with a prediction (from a compute-r report) carries it, the workload that made
    it, and the prediction error ``measured / predicted - 1``.
    """
    predictions = predictions or {}
    rows = []
    for b, settings in plan.items():
        base = timed.get((b, BASELINE))
        base_ms = base[0].median_ms if base else None
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
                **prediction_columns(predictions.get((b, s.label)), m.median_ms),
            })
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


#: The Parquet metadata key of a bench report.
BENCH_METADATA_KEY = "pomt"
#: Version of a bench report's metadata (the ``pomt`` key of its Parquet file).
BENCH_FORMAT_VERSION = 2


class BenchPlan(BaseModel):
    """What one bench run times: each batch size's method settings, and the report's choices.

    Attributes:
        settings: per batch size, the settings timed (fitted to the model).
        predictions: ``{(batch size, setting label): (predicted ms, workload)}`` from a compute-r report.
    """

    settings: dict[int, list[MethodSetting]]
    predictions: dict[tuple[int, str], tuple[float, str]] = Field(default_factory=dict)

    def distinct(self) -> list[MethodSetting]:
        """Each setting once (accuracy does not depend on the batch size)."""
        return list({s.label: s for group in self.settings.values() for s in group}.values())

    def slugs(self) -> list[str]:
        """The settings' parts of the report's file name, in plan order."""
        return list(dict.fromkeys(s.slug for group in self.settings.values() for s in group))


class BenchMeta(BaseModel):
    """Metadata of a bench report (the ``pomt`` key of its Parquet file; see docs/FORMATS.md)."""

    model_config = ConfigDict(protected_namespaces=())

    kind: Literal["bench"] = "bench"
    format_version: int = BENCH_FORMAT_VERSION
    model: str
    num_tokens: int
    num_prefix: int
    img_size: list[int]
    img_size_option: int | None
    num_blocks: int
    dtype: str
    batch_sizes: list[int]
    methods: list[str]
    settings: dict[str, list[MethodSetting]]
    r_from: str | None
    weights: str
    data: str | None
    num_images: int | None
    limit: int | None
    skipped_images: int | None
    device_preset: str
    device_display_name: str
    device_name: str
    torch_device: str
    clocks: ClockState
    timing_mode: Literal["eager", "cuda_graphs"]
    runtime: RuntimeName = Field("eager", description="what ran the timed calls (reports without it: eager)")
    runtime_info: dict[str, Any] | None = Field(
        None, description="the runtime's providers and versions (pomt_cli.measure.runtimes.runtime_info)")
    rel_precision: float
    budget_s: float
    rounds: int
    seed: int
    num_threads: int
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    command: str = Field(default_factory=lambda: command_line())
    pomt_version: str = __version__
    torch_version: str = torch.__version__


def write_bench(frame: pl.DataFrame, meta: BenchMeta, output_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write the report as CSV and as Parquet with ``meta``, as one set; returns both paths."""
    paths = write_set(output_dir, stem, {
        "csv": lambda tmp: frame.write_csv(tmp),
        "parquet": lambda tmp: frame.write_parquet(tmp, metadata={BENCH_METADATA_KEY: meta.model_dump_json()}),
    })
    return paths["csv"], paths["parquet"]
