"""The bench report file: its columns, its metadata, its one writer and its one reader."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Literal

import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from pomt_cli import __version__
from pomt_cli.errors import PomtError
from pomt_cli.formats.common import DtypeName, command_line, first_error, newer_version, open_parquet
from pomt_cli.formats.latency import ClockState, RuntimeName
from pomt_cli.formats.outputs import write_set
from pomt_cli.pruning import apply
from pomt_cli.pruning.registry import get as get_method

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
    "change_low_pct": pl.Float64,
    "change_high_pct": pl.Float64,
    "speedup": pl.Float64,
    "accuracy": pl.Float64,
    "top5": pl.Float64,
    "accuracy_change": pl.Float64,
    "images": pl.Int64,
    "predicted_ms": pl.Float64,
    "prediction_error": pl.Float64,
    "predicted_by": pl.String,
    "profile_ms": pl.Float64,
    "predicted_ratio": pl.Float64,
    "predicted_ratio_low": pl.Float64,
    "predicted_ratio_high": pl.Float64,
    "slower_than_none": pl.Boolean,
    "runtime": pl.String,
    "runtime_change_pct": pl.Float64,
}
"""Columns of a bench report, one row per (batch size, runtime, method)."""


#: Columns that earlier versions lacked, read as null: version 1 had no prediction;
#: version 2 predicted with the profile's absolute ms (its ``predicted_ms`` is also its
#: ``profile_ms``) and had no ratio.
PREDICTION_COLUMNS = ("predicted_ms", "prediction_error", "predicted_by", "profile_ms", "predicted_ratio",
                      "predicted_ratio_low", "predicted_ratio_high", "slower_than_none")


#: Columns that versions 1-3 lacked (one runtime per report): ``runtime`` is the file's
#: runtime and ``runtime_change_pct`` its own ``latency_change_pct`` (the reference is itself).
RUNTIME_COLUMNS = ("runtime", "runtime_change_pct")


#: Columns that versions 1-4 lacked, read as null: the interval of ``latency_change_pct``
#: from the rounds (:func:`pomt_cli.measure.ratio.paired_ratio`).
INTERVAL_COLUMNS = ("change_low_pct", "change_high_pct")


#: The Parquet metadata key of a bench report.
BENCH_METADATA_KEY = "pomt"
#: Version of a bench report's metadata (the ``pomt`` key of its Parquet file). 5: the
#: interval of each change against ``none`` (``change_low_pct``, ``change_high_pct``),
#: from the pooled samples and the paired rounds, which also judges ``slower_than_none``
#: (before: the two pooled intervals of the median). 4: several
#: runtimes per report (a ``runtime`` column, ``runtimes`` and ``runtimes_info`` in the
#: metadata). 3: the prediction is bench's unpruned ms times the profile's ratio
#: (``predicted_ms``), beside the profile's absolute ms (``profile_ms``); version 2 compared
#: with the absolute ms.
BENCH_FORMAT_VERSION = 5


class MethodSetting(BaseModel):
    """One method with its setting, as ``pomt_cli.pruning.apply`` takes it."""

    method: str
    r: int | list[int] = 0
    #: The block of a method that prunes in one (POMT; 3 when not given); None for the others.
    layer: int | None = None
    #: Tokens each block removes on the model, as applied (ToMe's schedule after the
    #: per-block cap); filled in by :func:`pomt_cli.bench.fit_settings`.
    per_block: list[int] | None = None
    #: ToMe: the first block whose r the cap lowered (None: not capped, or not fitted yet).
    capped_from: int | None = None

    @field_validator("method")
    @classmethod
    def _registered(cls, method: str) -> str:
        get_method(method)
        return method

    @model_validator(mode="after")
    def _layer_of_its_method(self) -> MethodSetting:
        takes = get_method(self.method).takes_layer
        if takes and self.layer is None:
            self.layer = 3
        elif not takes:
            self.layer = None
        return self

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
        return apply(model, self.method, r=self.r, **({} if self.layer is None else {"layer": self.layer}))


class BenchMeta(BaseModel):
    """Metadata of a bench report (the ``pomt`` key of its Parquet file; see docs/FORMATS.md)."""

    model_config = ConfigDict(protected_namespaces=())

    kind: Literal["bench"] = "bench"
    format_version: int = Field(BENCH_FORMAT_VERSION, ge=1, strict=True)
    model: str
    num_tokens: int
    num_prefix: int
    img_size: list[int]
    img_size_option: int | None
    num_blocks: int
    dtype: DtypeName
    batch_sizes: list[int]
    methods: list[str]
    settings: dict[str, list[MethodSetting]]
    r_from: str | None
    weights: str
    weights_file: str | None = Field(None, description="the checkpoint, resolved (reports before 0.1.1: absent)")
    weights_sha256: str | None = Field(None, description="models.state_dict_sha256 of the unpatched model, as "
                                       "loaded (reports before 0.1.1: absent)")
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
    runtime: RuntimeName = Field("eager", description="the reference runtime: the one benched, or of several eager "
                                 "when among them, else the first (reports without it: eager)")
    runtime_info: dict[str, Any] | None = Field(
        None, description="the reference runtime's providers and versions (pomt_cli.measure.runtimes.runtime_info)")
    runtimes: list[RuntimeName] = Field(default_factory=list,
                                        description="every runtime benched, in the order given (before 4: runtime)")
    runtimes_info: dict[str, dict[str, Any] | None] = Field(
        default_factory=dict, description="each runtime's providers and versions, by name (before 4: runtime_info)")
    pomt_received: str | None = Field(
        None, description="how POMT's block computed the attention received (float16/bfloat16 on CUDA): "
        "'triton kernel' or 'chunked product (Triton kernel off: why)'; None where the kernel was not tried")
    rel_precision: float
    budget_s: float
    rounds: int
    seed: int
    num_threads: int
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    command: str = Field(default_factory=lambda: command_line())
    pomt_version: str = __version__
    torch_version: str = torch.__version__

    @model_validator(mode="after")
    def _one_runtime_before_4(self) -> BenchMeta:
        """Reports before format 4 benched one runtime: ``runtime`` alone, with its ``runtime_info``."""
        if not self.runtimes:
            self.runtimes = [self.runtime]
        if not self.runtimes_info:
            self.runtimes_info = {self.runtime: self.runtime_info}
        return self


def write_bench(frame: pl.DataFrame, meta: BenchMeta, output_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write the report as CSV and as Parquet with ``meta``, as one set; returns both paths."""
    paths = write_set(output_dir, stem, {
        "csv": lambda tmp: frame.write_csv(tmp),
        "parquet": lambda tmp: frame.write_parquet(tmp, metadata={BENCH_METADATA_KEY: meta.model_dump_json()}),
    })
    return paths["csv"], paths["parquet"]


def read_bench(path: str | Path) -> tuple[pl.DataFrame, BenchMeta]:
    """The frame and metadata of a bench report's Parquet file, checked strictly.

    Raises:
        PomtError: the file is missing, not a pomt bench report, or damaged (the message
            names the field or column).
    """
    path = Path(path)
    again = "write it again with pomt bench"
    raw, frame = open_parquet(path, "bench report", "give the .parquet file written by pomt bench")
    try:
        data = json.loads(raw[BENCH_METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict) or data.get("kind") != "bench":
        raise PomtError(f"{path} is not a pomt bench report: give the .parquet file written by pomt bench")
    if (version := newer_version(data, BENCH_FORMAT_VERSION)) is not None:
        raise PomtError(f"{path} is a bench report of format {version}, newer than this pomt reads "
                        f"({BENCH_FORMAT_VERSION}): upgrade pomt")
    try:
        meta = BenchMeta.model_validate(data)
    except ValidationError as exc:
        where, msg = first_error(exc, "metadata")
        raise PomtError(f"bench report {path} is damaged (field {where}: {msg}): {again}") from None
    if meta.format_version == 2 and "profile_ms" not in frame.columns and "predicted_ms" in frame.columns:
        frame = frame.with_columns(profile_ms=pl.col("predicted_ms"))
    frame = frame.with_columns(pl.lit(None, dtype=SCHEMA[c]).alias(c) for c in (*PREDICTION_COLUMNS,
                                                                                *INTERVAL_COLUMNS)
                               if c not in frame.columns)
    if "runtime" not in frame.columns:
        frame = frame.with_columns(pl.lit(meta.runtime, dtype=pl.String).alias("runtime"))
    if "runtime_change_pct" not in frame.columns and "latency_change_pct" in frame.columns:
        frame = frame.with_columns(runtime_change_pct=pl.col("latency_change_pct"))
    missing = [c for c in SCHEMA if c not in frame.columns]
    if missing:
        raise PomtError(f"{path} lacks the column(s) {', '.join(missing)}: {again}")
    for name, dtype in SCHEMA.items():
        if frame.schema[name] != dtype:
            raise PomtError(f"{path}: column {name} has type {frame.schema[name]}, not {dtype}: is it damaged? "
                            f"{again}")
    return frame.select(list(SCHEMA)), meta
