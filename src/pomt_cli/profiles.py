"""Profile files: latency and accuracy against kept tokens, as Parquet with JSON metadata.

A profile is a polars frame (one row per grid point) plus a pydantic metadata record,
stored in the Parquet file's key-value metadata under the key ``pomt``. The format is
documented in docs/FORMATS.md; other tools may read the Parquet directly.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Literal

import polars as pl
import timm
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pomt_cli import __version__
from pomt_cli.errors import PomtError
from pomt_cli.outputs import atomic_output

#: 2 added the ``layer`` column (POMT's pruning block; null for the proxy and the other
#: estimators); files of version 1 are read with a null ``layer``.
FORMAT_VERSION = 2
METADATA_KEY = "pomt"

LATENCY_COLUMNS = ("batch_size", "tokens", "latency_ms", "p10_ms", "p90_ms", "samples", "status")
ACCURACY_COLUMNS = ("tokens", "accuracy", "top5", "images")


_command_line: list[str] | None = None


def set_command_line(args: list[str]) -> None:
    """Record the arguments of this ``pomt`` invocation (the CLI calls this first)."""
    global _command_line
    _command_line = list(args)


def command_line() -> str:
    """The ``pomt ...`` command line of this invocation, as a shell would read it."""
    return shlex.join(["pomt", *(sys.argv[1:] if _command_line is None else _command_line)])


class ProfileMeta(BaseModel):
    """What every profile records about the model and the run."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    kind: Literal["latency", "accuracy"]
    format_version: int = FORMAT_VERSION
    model: str = Field(description="timm architecture name (or digits-vit)")
    num_tokens: int = Field(description="N, tokens entering the first block")
    num_prefix: int = Field(description="p, prefix tokens")
    num_blocks: int
    embed_dim: int
    dtype: str
    grid: list[int] = Field(description="kept-token counts n, in the order given")
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    command: str = Field(default_factory=command_line)
    pomt_version: str = __version__
    torch_version: str = torch.__version__
    timm_version: str = timm.__version__
    python_version: str = platform.python_version()
    host: str = platform.node()


def write_profile(path: str | Path, frame: pl.DataFrame, meta: ProfileMeta) -> Path:
    """Write ``frame`` with ``meta`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        frame.write_parquet(tmp, metadata={METADATA_KEY: meta.model_dump_json()})
    return Path(path)


def read_profile(path: str | Path, kind: str | None = None) -> tuple[pl.DataFrame, dict]:
    """The frame and the metadata (a dict) of a profile file.

    Args:
        path: the Parquet file.
        kind: ``"latency"`` or ``"accuracy"`` to insist on one kind.

    Raises:
        PomtError: the file is missing, not a Parquet file, not a pomt profile, or of
            the other kind.
    """
    path = Path(path)
    if not path.is_file():
        raise PomtError(f"profile {path} does not exist: give the path of a .parquet file written by pomt")
    try:
        raw = pl.read_parquet_metadata(path)
        frame = pl.read_parquet(path)
    except Exception as exc:  # polars raises several types for corrupt files
        raise PomtError(f"profile {path} is not a readable Parquet file ({type(exc).__name__}): is it corrupt?") from None
    if METADATA_KEY not in raw:
        raise PomtError(f"{path} is a Parquet file without pomt metadata: was it written by pomt?")
    try:
        meta = json.loads(raw[METADATA_KEY])
        ProfileMeta.model_validate(meta)
    except (json.JSONDecodeError, ValidationError):
        raise PomtError(f"{path} has damaged pomt metadata: write it again with pomt") from None
    if kind is not None and meta["kind"] != kind:
        hint = "pomt profile" if kind == "latency" else "pomt estimate-accuracy"
        article = "an" if kind == "accuracy" else "a"
        raise PomtError(f"{path} is a {meta['kind']} profile, but {article} {kind} profile is needed here (from `{hint}`)")
    wanted = LATENCY_COLUMNS if meta["kind"] == "latency" else ACCURACY_COLUMNS
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise PomtError(f"{path} lacks the column(s) {', '.join(missing)}: write it again with pomt")
    if "layer" not in frame.columns:  # format version 1
        frame = frame.with_columns(pl.lit(None, dtype=pl.Int64).alias("layer"))
    return frame, meta
