"""The shared part of the profile formats: common metadata, column rules, writing."""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from pathlib import Path
from typing import Literal, TypeVar

import polars as pl
import timm
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pomt_cli import __version__
from pomt_cli.errors import PomtError
from pomt_cli.formats.command import command_line
from pomt_cli.formats.outputs import atomic_output


#: 2 added the ``layer`` column (POMT's pruning block; null for the proxy and the other
#: estimators); files of version 1 are read with a null ``layer``.
FORMAT_VERSION = 2


METADATA_KEY = "pomt"


#: Metadata fields that must agree between a latency and an accuracy profile (the token geometry).
GEOMETRY_FIELDS = ("model", "num_tokens", "num_prefix", "num_blocks", "embed_dim")


LATENCY_COLUMNS = ("batch_size", "tokens", "latency_ms", "p10_ms", "p90_ms", "samples", "status")


ACCURACY_COLUMNS = ("tokens", "accuracy", "top5", "images")


#: The floating-point types a model runs in (``pomt_cli.options.Dtype``'s values).
DtypeName = Literal["float32", "float16", "bfloat16"]


#: The largest latency a file may hold, in ms (11.6 days per forward pass): a larger one is damage.
MAX_LATENCY_MS = 1e9


#: The most tokens a model may have (N): a larger count is damage.
MAX_TOKENS = 1_000_000


def newer_version(data: dict, current: int) -> int | None:
    """The ``format_version`` of the raw record ``data`` when it is an integer above ``current``, else None.

    Checked before the record is validated, so that a newer file is refused as newer (upgrade
    pomt) even where its other fields no longer validate; any other value that is not an
    integer >= 1 fails the validation (``format_version`` is a strict field).
    """
    version = data.get("format_version")
    return version if type(version) is int and version > current else None


class ProfileMeta(BaseModel):
    """What every profile records about the model and the run."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    kind: Literal["latency", "accuracy"]
    format_version: int = Field(FORMAT_VERSION, ge=1, strict=True)
    model: str = Field(description="timm architecture name (or digits-vit)")
    num_tokens: int = Field(ge=1, le=MAX_TOKENS, description="N, tokens entering the first block")
    num_prefix: int = Field(ge=0, description="p, prefix tokens")
    num_blocks: int = Field(ge=1)
    embed_dim: int = Field(ge=1)
    dtype: DtypeName
    grid: list[int] = Field(description="kept-token counts n, in the order given")
    img_size: list[int] | None = Field(None, description="input height and width in pixels the model was built for")
    img_size_option: int | None = Field(None, description="--img-size as given (None: the model's default size)")
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    command: str = Field(default_factory=lambda: command_line())
    pomt_version: str = __version__
    torch_version: str = torch.__version__
    timm_version: str = timm.__version__
    python_version: str = platform.python_version()
    host: str = platform.node()

    @model_validator(mode="after")
    def _prefix_below_tokens(self) -> ProfileMeta:
        if self.num_prefix >= self.num_tokens:
            raise ValueError(f"num_prefix {self.num_prefix} is not below num_tokens {self.num_tokens}")
        outside = [n for n in self.grid if not self.num_prefix < n <= self.num_tokens]
        if outside:
            raise ValueError(f"grid holds n = {outside[0]}, outside {self.num_prefix + 1}..{self.num_tokens} "
                             f"(the model's {self.num_tokens} tokens, {self.num_prefix} of them prefix)")
        return self

    def recorded(self, field: str) -> object:
        """``field`` as the file holds it; None where it lacks the field (its default describes this run)."""
        return getattr(self, field) if field in self.model_fields_set else None

    def check_rows(self, path: Path, frame: pl.DataFrame) -> None:
        """Check that the rows' token counts are the grid's (within the model's tokens, as the
        metadata's validation checks); the kinds check also their batch sizes and layers.

        Raises:
            PomtError: one line naming the file, the column and what the metadata says.
        """
        extra = sorted(set(frame["tokens"].to_list()) - set(self.grid))
        if extra:
            shown = ", ".join(map(str, extra[:3])) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
            grid = f"{len(self.grid)} points from {max(self.grid)} to {min(self.grid)}" if self.grid else "empty"
            raise PomtError(f"{path} has rows at n = {shown}, which its grid ({grid}) does not list: is it "
                            "damaged? write it again with pomt")


def check_listed(path: Path, column: str, found: set, listed: list | None, whole: bool) -> None:
    """Check that the values ``found`` in ``column`` are those the metadata lists (``listed``).

    ``whole``: every listed value must have rows too (False for an interrupted profile,
    which may lack some). Nothing is checked where the metadata does not list them (None).

    Raises:
        PomtError: one line naming the file, the column and both sets of values.
    """
    if listed is None:
        return
    if found - set(listed) or (whole and set(listed) - found):
        raise PomtError(f"{path} has {column} {', '.join(map(str, sorted(found))) or 'none'} in its rows, but its "
                        f"metadata lists {', '.join(map(str, listed)) or 'none'}: is it damaged? "
                        "write it again with pomt")


def write_profile(path: str | Path, frame: pl.DataFrame, meta: ProfileMeta) -> Path:
    """Write ``frame`` with ``meta`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        frame.write_parquet(tmp, metadata={METADATA_KEY: meta.model_dump_json()})
    return Path(path)


#: What each known column must hold: its type (``int``, ``float``, ``str``) and its values.
#: ``latency``: finite, positive and at most :data:`MAX_LATENCY_MS` (null only where status is
#: ``oom``); ``spread``: finite, >= 0 and at most :data:`MAX_LATENCY_MS`; ``positive``: > 0;
#: ``count``: >= 0; ``percent``: finite, in [0, 100]; ``status``: ok, budget or oom. A rule
#: ending in ``?`` allows null (a statistic that too few samples leave undefined).
COLUMN_RULES: dict[str, tuple[str, str]] = {
    "batch_size": ("int", "positive"),
    "tokens": ("int", "positive"),
    "latency_ms": ("float", "latency"),
    "p10_ms": ("float", "latency"),
    "p90_ms": ("float", "latency"),
    "ci_low_ms": ("float", "latency?"),
    "ci_high_ms": ("float", "latency?"),
    "mean_ms": ("float", "latency?"),
    "min_ms": ("float", "latency?"),
    "max_ms": ("float", "latency?"),
    "visit_low_ms": ("float", "latency?"),
    "visit_high_ms": ("float", "latency?"),
    "std_ms": ("float", "spread?"),
    "samples": ("int", "count"),
    "status": ("str", "status"),
    "accuracy": ("float", "percent"),
    "top5": ("float", "percent"),
    "images": ("int", "positive"),
    "correct": ("int", "count"),
    "correct_top5": ("int", "count"),
    "layer": ("int", "count?"),
}


#: Pairs of columns (low, high) that each row must hold in order where both are there and
#: not null: a latency profile's statistics come from one set of samples (the median within
#: its percentiles, its interval and the extremes); top-5 hits include the top-1 hits.
ORDERED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("min_ms", "p10_ms"), ("p10_ms", "latency_ms"), ("latency_ms", "p90_ms"), ("p90_ms", "max_ms"),
    ("ci_low_ms", "latency_ms"), ("latency_ms", "ci_high_ms"), ("visit_low_ms", "visit_high_ms"),
    ("accuracy", "top5"), ("correct", "correct_top5"), ("correct_top5", "images"),
)


#: How far a row may be out of order by rounding, relative to the larger value.
ORDER_TOLERANCE = 1e-9


STATUSES = ("ok", "budget", "oom")


def _type_ok(dtype: pl.DataType, wanted: str) -> bool:
    if wanted == "int":
        return dtype.is_integer()
    if wanted == "float":
        return dtype.is_float() or dtype.is_integer()
    return dtype == pl.String


def check_columns(path: Path, frame: pl.DataFrame) -> None:
    """Check the type and the values of every known column of a profile, and each row's order (:data:`ORDERED_COLUMNS`).

    Raises:
        PomtError: one line naming the file, the column and the first bad row.
    """
    status = frame["status"].to_list() if "status" in frame.columns and frame.schema["status"] == pl.String else None
    for name, (wanted, rule) in COLUMN_RULES.items():
        if name not in frame.columns:
            continue
        dtype = frame.schema[name]
        if not _type_ok(dtype, wanted):
            kind = {"int": "integers", "float": "numbers", "str": "text"}[wanted]
            raise PomtError(f"{path}: column {name} has type {dtype}, but holds {kind} in a pomt profile: "
                            "is it damaged? write it again with pomt")
        nullable = rule.endswith("?")
        rule = rule.rstrip("?")
        for row, value in enumerate(frame[name].to_list()):
            problem = None
            if value is None:
                if not nullable and (rule != "latency" or status is None or status[row] != "oom"):
                    problem = "is empty"
            elif rule == "status":
                if value not in STATUSES:
                    problem = f"is {value!r}, not one of {', '.join(STATUSES)}"
            elif not math.isfinite(value):
                problem = f"is {value}, not a finite number"
            elif rule in ("latency", "positive") and value <= 0:
                problem = f"is {value}, not positive"
            elif rule in ("count", "spread") and value < 0:
                problem = f"is {value}, below 0"
            elif rule in ("latency", "spread") and value > MAX_LATENCY_MS:
                problem = f"is {value}, above {MAX_LATENCY_MS:.0e} ms"
            elif rule == "percent" and not 0 <= value <= 100:
                problem = f"is {value}, outside 0..100 (%)"
            if problem:
                raise PomtError(f"{path}: column {name} {problem} in row {row + 1}: is it damaged? "
                                "write it again with pomt")
    for low, high in ORDERED_COLUMNS:
        if low not in frame.columns or high not in frame.columns:
            continue
        for row, (a, b) in enumerate(zip(frame[low].to_list(), frame[high].to_list())):
            if a is not None and b is not None and a - b > ORDER_TOLERANCE * max(abs(a), abs(b)):
                raise PomtError(f"{path}: column {low} is {a}, above {high} {b}, in row {row + 1}: is it damaged? "
                                "write it again with pomt")


def check_points_once(path: Path, frame: pl.DataFrame, key: tuple[str, ...]) -> None:
    """Check that no point (the columns ``key``) has two rows.

    Raises:
        PomtError: one line naming the file and the first repeated point.
    """
    repeated = frame.filter(frame.select(key).is_duplicated())
    if repeated.height:
        row = repeated.row(0, named=True)
        point = ", ".join(f"{name} {row[name]}" for name in key if row[name] is not None)
        raise PomtError(f"{path} holds the point {point} twice: is it damaged? write it again with pomt")


M = TypeVar("M", bound="ProfileMeta")


def first_error(exc: ValidationError, whole: str) -> tuple[str, str]:
    """Where the first error of ``exc`` is (dotted field path, or ``whole``) and what it says."""
    first = exc.errors()[0]
    return ".".join(str(part) for part in first["loc"]) or whole, first["msg"]


_KINDS = {
    "latency": "a latency profile (from `pomt profile`)",
    "accuracy": "an accuracy profile (from `pomt estimate-accuracy`)",
    "bench": "a bench report (from `pomt bench`)",
    "compute_r": "a compute-r report (from `pomt compute-r`)",
}


def pomt_file_kind(path: Path) -> str | None:
    """What pomt file ``path`` is, in words (``a latency profile (from `pomt profile`)``), or None.

    For the message when a file of one kind is given where another is needed: it reads
    the ``kind`` of a Parquet file's pomt metadata or of a JSON report, and never raises.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PAR1":
            kind = json.loads(pl.read_parquet_metadata(path)[METADATA_KEY]).get("kind")
            kinds = ("latency", "accuracy", "bench")
        else:
            kind, kinds = json.loads(Path(path).read_text(encoding="utf-8")).get("kind"), ("compute_r",)
    except Exception:  # any unreadable or foreign file: nothing to say about it
        return None
    return _KINDS[kind] if kind in kinds else None


def open_parquet(path: Path, what: str, give: str) -> tuple[dict[str, str], pl.DataFrame]:
    """The key-value metadata and the frame of the Parquet file ``path``.

    Raises:
        PomtError: ``path`` is a folder, missing or unreadable; the message names it as
            ``what`` (``profile``, ``bench report``) and ends with ``give``.
    """
    if path.is_dir():
        raise PomtError(f"{what} {path} is a folder: {give}")
    if not path.is_file():
        raise PomtError(f"{what} {path} does not exist: {give}")
    try:
        return pl.read_parquet_metadata(path), pl.read_parquet(path)
    except Exception as exc:  # polars raises several types for corrupt files
        if (kind := pomt_file_kind(path)) is not None:
            if what in kind:  # the kind wanted, with a readable footer but damaged data
                raise PomtError(f"{path} is {kind}, but its data cannot be read ({type(exc).__name__}): "
                                "is it damaged? write it again with pomt") from None
            raise PomtError(f"{path} is {kind}, not a {what}: {give}") from None
        raise PomtError(
            f"{what} {path} is not a readable Parquet file ({type(exc).__name__}): is it corrupt?") from None


def read_checked(path: str | Path, meta_model: type[M]) -> tuple[pl.DataFrame, M]:
    """The frame and the typed metadata of a profile file of ``meta_model``'s kind, checked strictly.

    The metadata must validate as ``meta_model`` (types included; the fields that only
    pomt's own writer fills are optional, so that profiles other tools write still read),
    every known column must have its type and valid values, each row its statistics in order
    (:func:`check_columns`), and the rows the batch sizes and layers that the metadata lists
    (``check_rows``).

    Raises:
        PomtError: the file is missing, not a Parquet file, not a pomt profile, of the
            other kind, of a newer format, or damaged (the message names the field, or
            the point that has two rows).
    """
    kind = meta_model.model_fields["kind"].default
    path = Path(path)
    raw, frame = open_parquet(path, "profile", "give the path of a .parquet file written by pomt")
    if METADATA_KEY not in raw:
        raise PomtError(f"{path} is a Parquet file without pomt metadata: was it written by pomt?")
    try:
        data = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError:
        raise PomtError(f"{path} has damaged pomt metadata (not JSON): write it again with pomt") from None
    if isinstance(data, dict) and data.get("kind") == "bench":
        raise PomtError(f"{path} is {_KINDS['bench']}, but {_KINDS[kind]} is needed here")
    if not isinstance(data, dict) or data.get("kind") not in ("latency", "accuracy"):
        raise PomtError(f"{path} has damaged pomt metadata (kind is not latency or accuracy): write it again with pomt")
    article = {"latency": "a", "accuracy": "an"}
    if data["kind"] != kind:
        hint = "pomt profile" if kind == "latency" else "pomt estimate-accuracy"
        raise PomtError(f"{path} is {article[data['kind']]} {data['kind']} profile, but {article[kind]} {kind} "
                        f"profile is needed here (from `{hint}`)")
    if (version := newer_version(data, FORMAT_VERSION)) is not None:
        raise PomtError(f"{path} is {article[kind]} {kind} profile of format {version}, newer than this pomt reads "
                        f"({FORMAT_VERSION}): upgrade pomt")
    try:
        meta = meta_model.model_validate(data)
    except ValidationError as exc:
        where, msg = first_error(exc, "metadata")
        raise PomtError(f"{path} has damaged pomt metadata (field {where}: {msg}): write it again with pomt") from None
    wanted = LATENCY_COLUMNS if kind == "latency" else ACCURACY_COLUMNS
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise PomtError(f"{path} lacks the column(s) {', '.join(missing)}: write it again with pomt")
    if "layer" not in frame.columns:  # format version 1
        frame = frame.with_columns(pl.lit(None, dtype=pl.Int64).alias("layer"))
    check_columns(path, frame)
    meta.check_rows(path, frame)
    check_points_once(path, frame, ("batch_size", "layer", "tokens") if kind == "latency" else ("layer", "tokens"))
    return frame, meta
