"""The compute-r report file: the chosen R per batch size, as validated JSON."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pomt_cli import __version__
from pomt_cli.errors import PomtError
from pomt_cli.formats.common import (
    MAX_LATENCY_MS,
    MAX_TOKENS,
    DtypeName,
    command_line,
    first_error,
    newer_version,
    pomt_file_kind,
)
from pomt_cli.formats.outputs import atomic_write_text


#: 2 added the chosen layer, the workload of the prediction and whether pruning pays;
#: reports of version 1 are read with ``layer`` None and the ``proxy`` workload.
#: 3 added the predicted saving as a ratio to the same curve's unpruned point, with its
#: interval; reports of versions 1 and 2 are read without it (:attr:`Choice.ratio` falls
#: back to ``1 - latency_saved_pct / 100``).
#: 4 added ``pomt refine``: each choice says whether it was re-chosen from a side-by-side
#: measurement (``refined``, ``refined_ms``, ``refined_unpruned_ms``) and the report records
#: the refinement (:class:`RefineRecord`); reports of versions 1 to 3 are read with
#: ``refined`` False and no record.
REPORT_FORMAT_VERSION = 4


Criterion = Literal["utility", "latency_budget", "max_accuracy_drop"]


#: The largest latency ratio a report may hold (a pruned model 1000 times slower): a larger one is damage.
MAX_RATIO = 1e3


#: The criteria that need a parameter, and its field.
CRITERION_FIELDS = {"latency_budget": "latency_budget_ms", "max_accuracy_drop": "max_accuracy_drop"}


class Choice(BaseModel):
    """The chosen n for one batch size."""

    model_config = ConfigDict(allow_inf_nan=False)

    batch_size: int = Field(ge=1)
    R: int = Field(ge=0, description="tokens to prune, N - n")
    tokens: int = Field(ge=1, description="n*, tokens kept")
    latency_ms: float = Field(gt=0, le=MAX_LATENCY_MS)
    latency_saved_pct: float = Field(ge=100 * (1 - MAX_RATIO), le=100, description="100 * (1 - L(n*) / L(n_max))")
    accuracy: float = Field(ge=0, le=100, description="top-1 accuracy (%) at n*")
    accuracy_lost: float = Field(ge=-100, le=100, description="A(n_max) - A(n*), percentage points")
    utility: float = Field(description="U(n*) with the report's alpha")
    reference_tokens: int = Field(ge=1, description="n_max, the largest n both profiles contain")
    layer: int | None = Field(None, description="POMT's pruning block; None with a proxy latency profile")
    workload: Literal["pomt", "proxy"] = Field(
        "proxy", description="where latency_ms comes from: the POMT-patched model or the all-blocks proxy")
    reference_ms: float | None = Field(None, gt=0, le=MAX_LATENCY_MS,
                                       description="L(n_max): the unpruned model's latency when n_max = N")
    pays: bool = Field(True, description="False: no pruned point was faster than the unpruned model (R = 0)")
    latency_ratio: float | None = Field(
        None, gt=0, lt=MAX_RATIO,
        description="L(layer, n*) / L(layer, N): the chosen point over the same curve's unpruned point")
    latency_ratio_low: float | None = Field(None, gt=0, lt=MAX_RATIO,
                                            description="the ratio's interval from the two points' CIs")
    latency_ratio_high: float | None = Field(None, gt=0, lt=MAX_RATIO)
    unpruned_ms: float | None = Field(None, gt=0, le=MAX_LATENCY_MS,
                                      description="L(layer, N): the denominator of latency_ratio")
    refined: bool = Field(False, description="re-chosen by pomt refine from a side-by-side measurement")
    refined_ms: float | None = Field(None, gt=0, le=MAX_LATENCY_MS,
                                     description="refine: the chosen setting's measured median")
    refined_unpruned_ms: float | None = Field(None, gt=0, le=MAX_LATENCY_MS,
                                              description="refine: the unpruned model's measured median")

    @model_validator(mode="after")
    def _consistent(self) -> Choice:
        if self.tokens > self.reference_tokens:
            raise ValueError(f"tokens {self.tokens} is above reference_tokens {self.reference_tokens}")
        low, high = self.latency_ratio_low, self.latency_ratio_high
        if low is not None and high is not None and low > high:
            raise ValueError(f"latency_ratio_low {low} is above latency_ratio_high {high}")
        return self

    @property
    def setting_text(self) -> str:
        """``R = 32 at layer 0``, or ``R = 0`` (the unpruned model has no layer)."""
        return f"R = {self.R}" + (f" at layer {self.layer}" if self.R and self.layer is not None else "")

    def same_setting(self, other: Choice) -> bool:
        """Whether ``other`` chose the same R (and, when pruning, the same layer)."""
        return (self.R, self.R and self.layer) == (other.R, other.R and other.layer)

    @property
    def predicted_ms(self) -> float:
        """The latency the profile predicts for the chosen model (L(n*))."""
        return self.latency_ms

    @property
    def ratio(self) -> float | None:
        """The predicted latency over the unpruned model's (1 for R = 0); None when the profile cannot say.

        Reports before version 3 lack :attr:`latency_ratio`: their ratio is
        ``1 - latency_saved_pct / 100`` (``latency_ms / reference_ms``) when the reference
        is the unpruned model.
        """
        if self.latency_ratio is not None:
            return self.latency_ratio
        if self.R == 0:
            return 1.0
        if self.reference_tokens == self.R + self.tokens:
            return 1 - self.latency_saved_pct / 100
        return None


class ProfileInput(BaseModel):
    """Where an input profile came from."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    path: str = Field(description="the file, resolved")
    sha256: str
    kind: Literal["latency", "accuracy"]
    dtype: DtypeName
    host: str | None = None
    created: str | None = None
    device_preset: str | None = None
    device_display_name: str | None = None
    device_name: str | None = None
    timing_mode: str | None = None
    img_size_option: int | None = Field(None, description="latency: --img-size as given (None: the model's default)")
    estimator: str | None = None
    device_type: str | None = None
    num_images: int | None = None
    runtime: str | None = Field(None, description="latency: what ran the timed calls (None: a file without it, eager)")
    runtime_info: dict[str, Any] | None = Field(None, description="latency: the runtime's providers and versions")


class RefinedSetting(BaseModel):
    """One setting that ``pomt refine`` measured: its median and ratio to the unpruned model's."""

    model_config = ConfigDict(allow_inf_nan=False)

    batch_size: int = Field(ge=1)
    setting: str = Field(description="the bench label: none, pomt r=R @layer")
    layer: int | None = None
    tokens: int = Field(ge=1)
    R: int = Field(ge=0)
    ms: float = Field(gt=0, le=MAX_LATENCY_MS, description="median over the pooled rounds")
    ci_low_ms: float | None = None
    ci_high_ms: float | None = None
    samples: int = Field(ge=0)
    profile_ratio: float | None = Field(None, description="L(layer, n) / L(layer, N) in the latency profile")
    ratio: float = Field(gt=0, lt=MAX_RATIO, description="ms over the unpruned model's refined ms")
    ratio_low: float | None = None
    ratio_high: float | None = None
    chosen: bool = False


class RefineRecord(BaseModel):
    """What ``pomt refine`` measured, and compute-r's choices before it."""

    candidates: int = Field(ge=1, description="pruned candidates per batch size (C)")
    candidates_measured: dict[str, int] = Field(description="batch size -> pruned candidates measured")
    budget_s: float = Field(gt=0, description="seconds per setting and round")
    rounds: int = Field(ge=1)
    seed: int = Field(ge=0)
    elapsed_s: float = Field(ge=0)
    torch_device: str
    num_threads: int
    clocks: str = Field(description="locked, already_locked, unlocked or unavailable")
    settings: list[RefinedSetting]
    before: list[Choice] = Field(description="compute-r's choices, from the profile alone")
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    command: str = Field(default_factory=lambda: command_line())


class Report(BaseModel):
    """The JSON report of ``pomt compute-r`` (format in docs/FORMATS.md)."""

    model_config = ConfigDict(protected_namespaces=(), allow_inf_nan=False)

    format_version: int = Field(REPORT_FORMAT_VERSION, ge=1, strict=True)
    kind: Literal["compute_r"] = "compute_r"
    model: str
    num_tokens: int = Field(ge=1, le=MAX_TOKENS)
    num_prefix: int = Field(ge=0)
    num_blocks: int = Field(ge=1)
    embed_dim: int = Field(ge=1)
    criterion: Criterion
    alpha: float = Field(ge=0, le=1)
    latency_budget_ms: float | None = Field(None, gt=0)
    max_accuracy_drop: float | None = Field(None, ge=0)
    R: int = Field(ge=0, description="R of the first batch size")
    tokens: int = Field(ge=1, description="n* of the first batch size")
    batch_size: int = Field(ge=1, description="the first batch size")
    layer: int | None = Field(None, description="the chosen layer of the first batch size (pomt workload)")
    workload: Literal["pomt", "proxy"] = "proxy"
    layers: list[int] | None = Field(None, description="the layers both profiles contain (pomt workload)")
    choices: list[Choice] = Field(min_length=1)
    latency: ProfileInput
    accuracy: ProfileInput
    notes: list[str] = Field(default_factory=list)
    refine: RefineRecord | None = Field(None, description="pomt refine's measurement (None: not refined)")
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    command: str = Field(default_factory=lambda: command_line())
    pomt_version: str = __version__

    @model_validator(mode="after")
    def _consistent(self) -> Report:
        """The choices agree with the model's N, with each other and with the first choice's summary."""
        if (field := CRITERION_FIELDS.get(self.criterion)) is not None and getattr(self, field) is None:
            raise ValueError(f"criterion {self.criterion} needs {field}, which is null")
        for criterion, other in CRITERION_FIELDS.items():
            if criterion != self.criterion and getattr(self, other) is not None:
                raise ValueError(f"{other} is set, but the criterion is {self.criterion}, not {criterion}")
        if self.num_prefix >= self.num_tokens:
            raise ValueError(f"num_prefix {self.num_prefix} is not below num_tokens {self.num_tokens}")
        seen = set()
        for c in self.choices:
            if c.batch_size in seen:
                raise ValueError(f"batch size {c.batch_size} has two choices")
            seen.add(c.batch_size)
            if c.R + c.tokens != self.num_tokens:
                raise ValueError(f"batch size {c.batch_size}: R {c.R} + tokens {c.tokens} is not num_tokens "
                                 f"{self.num_tokens}")
            if c.reference_tokens > self.num_tokens:
                raise ValueError(f"batch size {c.batch_size}: reference_tokens {c.reference_tokens} is above "
                                 f"num_tokens {self.num_tokens}")
        first = self.choices[0]
        if (self.R, self.tokens, self.batch_size) != (first.R, first.tokens, first.batch_size):
            raise ValueError(f"R {self.R}, tokens {self.tokens}, batch_size {self.batch_size} are not the first "
                             f"choice's ({first.R}, {first.tokens}, {first.batch_size})")
        return self

    @property
    def runtime(self) -> str:
        """What ran the latency profile's timed calls (eager for profiles that do not say)."""
        return self.latency.runtime or "eager"

    def choice_for(self, batch_size: int) -> Choice | None:
        """The choice made for ``batch_size``, or None when the report has none."""
        return next((c for c in self.choices if c.batch_size == batch_size), None)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_report(report: Report, path: str | Path) -> Path:
    """Write ``report`` to ``path`` as indented JSON, atomically."""
    return atomic_write_text(path, report.model_dump_json(indent=2) + "\n")


def read_report(path: str | Path, model: str | None = None) -> Report:
    """The report in ``path``, checked to be for ``model`` when given.

    Raises:
        PomtError: the file is missing, not JSON, not a compute-r report, of a newer
            format, or computed for another model.
    """
    path = Path(path)
    if not path.is_file():
        raise PomtError(f"report {path} does not exist: give the .json file written by pomt compute-r")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        if (kind := pomt_file_kind(path)) is not None:
            raise PomtError(f"{path} is {kind}, not a compute-r report: give the .json file written by pomt "
                            "compute-r") from None
        raise PomtError(
            f"report {path} is not readable JSON: is it corrupt? write it again with pomt compute-r"
        ) from None
    if not isinstance(data, dict) or data.get("kind") != "compute_r":
        raise PomtError(f"{path} is not a pomt compute-r report: give the .json file written by pomt compute-r")
    if (version := newer_version(data, REPORT_FORMAT_VERSION)) is not None:
        raise PomtError(f"{path} is a compute-r report of format {version}, newer than this pomt reads "
                        f"({REPORT_FORMAT_VERSION}): upgrade pomt")
    try:
        report = Report.model_validate(data)
    except ValidationError as exc:
        where, msg = first_error(exc, "the report")
        raise PomtError(f"report {path} is damaged ({where}: {msg}): write it again with pomt compute-r") from None
    if model is not None and report.model != model:
        raise PomtError(
            f"{path} was computed for {report.model}, not {model}: run pomt compute-r with profiles of {model}, "
            "or give --r directly"
        )
    return report
