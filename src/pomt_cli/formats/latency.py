"""The latency profile file: its columns, its metadata, its one reader, and resume checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import polars as pl
import torch
from pydantic import BaseModel, Field

from pomt_cli.errors import PomtError
from pomt_cli.formats.common import ProfileMeta, check_listed, read_checked


class ClockState(BaseModel):
    """What happened to the clocks around a measurement (recorded in profiles).

    ``mode``: ``locked`` (pomt locked them and restored them after), ``already_locked``
    (a state saved by ``pomt clocks lock`` existed, so they were left as they were),
    ``unlocked`` (``--no-lock-clocks``), ``unavailable`` (the machine has no controllable
    clocks, e.g. no cpufreq in a VM).
    """

    preset: str
    mode: Literal["locked", "already_locked", "unlocked", "unavailable"]
    detail: str = ""
    values: dict[str, str] = Field(default_factory=dict, description="values read before locking")
    status: str | None = Field(None, description="output of the preset's status commands while measuring")

    @property
    def locked(self) -> bool:
        return self.mode in ("locked", "already_locked")


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
    "visit_low_ms": pl.Float64,
    "visit_high_ms": pl.Float64,
}


Workload = Literal["proxy", "pomt"]

#: What runs the timed forward passes (``pomt_cli.measure.runtimes.Runtime``'s values).
RuntimeName = Literal["eager", "compile", "onnxruntime"]


#: Columns of a latency profile file: the engine's, then ``layer`` (POMT's block, null for the proxy).
FILE_SCHEMA: dict[str, pl.DataType] = {**SCHEMA, "layer": pl.Int64}


class LatencyMeta(ProfileMeta):
    """Metadata of a latency profile (see docs/FORMATS.md).

    pomt's own writer fills every field; those without a default here are None in a
    profile that another tool wrote with the common fields only (:class:`ProfileMeta`).
    """

    kind: Literal["latency"] = "latency"
    batch_sizes: list[int] | None = Field(None, description="None: the batch sizes of the frame's rows")
    timing_mode: Literal["eager", "cuda_graphs"] | None = None
    device_preset: str | None = None
    device_display_name: str | None = None
    device_name: str | None = None
    torch_device: str | None = None
    clocks: ClockState | None = None
    clocks_locked: bool | None = None
    pretrained: bool = False
    checkpoint: str | None = None
    rel_precision: float | None = None
    budget_s: float | None = None
    min_samples: int | None = None
    warmup: int | None = None
    seed: int | None = None
    remeasure_rounds: int | None = None
    passes: int = 1
    num_threads: int = Field(default_factory=torch.get_num_threads)
    float32_matmul_precision: str = Field(default_factory=torch.get_float32_matmul_precision)
    complete: bool = Field(False, description="every point measured and spikes re-measured")
    elapsed_s: float = Field(0.0, description="seconds spent measuring, over all resumed runs")
    resumed_rows: int = Field(0, description="rows taken over from an interrupted run (--resume)")
    workload: Workload = Field("proxy", description="proxy: every block at n; pomt: the POMT-patched model")
    layers: list[int] | None = Field(None, description="POMT's pruning blocks of the pomt workload; None for the proxy")
    runtime: RuntimeName = Field("eager", description="what ran the timed calls (files without it: eager)")
    runtime_info: dict[str, Any] | None = Field(
        None, description="the runtime's providers and versions (pomt_cli.measure.runtimes.runtime_info)")
    pomt_received: str | None = Field(
        None, description="how the pomt workload's block computed the attention received (float16/bfloat16 on "
        "CUDA): 'triton kernel' or 'chunked product (Triton kernel off: why)'; None where the kernel was not tried")

    def check_rows(self, path: Path, frame: pl.DataFrame) -> None:
        """Check also that the rows' batch sizes and layers are the metadata's (some may lack rows while incomplete).

        Raises:
            PomtError: one line naming the file, the column and both sets of values.
        """
        super().check_rows(path, frame)
        check_listed(path, "batch sizes", set(frame["batch_size"].to_list()), self.batch_sizes, self.complete)
        layers = set(frame["layer"].drop_nulls().to_list())
        check_listed(path, "layers", layers, self.layers, self.complete)


_RESUME_FIELDS = ("model", "num_tokens", "num_prefix", "img_size", "dtype", "batch_sizes", "grid", "timing_mode",
                  "device_preset", "torch_device", "workload", "layers", "runtime", "runtime_info", "num_threads",
                  "float32_matmul_precision", "rel_precision", "budget_s", "min_samples", "warmup", "seed",
                  "remeasure_rounds", "passes")

#: The option that sets a resume field, where its name is not the option's.
_RESUME_OPTIONS = {"num_threads": "--threads; without it, OMP_NUM_THREADS or the cores", "budget_s": "--budget",
                   "remeasure_rounds": "--remeasure", "batch_sizes": "--batch-size", "grid": "--tokens",
                   "layers": "--layer", "img_size": "--img-size",
                   "runtime_info": "--ort-providers, --compile-backend or the installed versions",
                   "float32_matmul_precision": "torch.set_float32_matmul_precision"}


def _show(value: object) -> str:
    if isinstance(value, list) and len(value) > 6:
        return f"[{value[0]}, {value[1]}, ..., {value[-1]}] ({len(value)} values)"
    return str(value)


def read_latency(path: str | Path) -> tuple[pl.DataFrame, LatencyMeta]:
    """The frame and metadata of a latency profile file, checked strictly.

    Raises:
        PomtError: the file is missing, not a pomt latency profile, or damaged.
    """
    return read_checked(path, LatencyMeta)


def resume_rows(path: str | Path, expected: LatencyMeta) -> tuple[pl.DataFrame, LatencyMeta]:
    """The finished rows of the profile at ``path``, checked to belong to the run ``expected`` describes.

    Raises:
        PomtError: the file is not a latency profile, or was measured for another model,
            grid, batch sizes, dtype, timing mode or device, or is marked complete but lacks points.
    """
    frame, meta = read_latency(path)
    for name in _RESUME_FIELDS:
        old, new = getattr(meta, name), getattr(expected, name)
        if name == "runtime_info" and old is not None and new is not None:
            name, old, new = next((f"{name}.{k}", old.get(k), new.get(k)) for k in sorted({*old, *new})
                                  if old.get(k) != new.get(k)) if old != new else (name, old, new)
        if old is not None and old != new:  # None: a file from before the field was recorded
            option = _RESUME_OPTIONS.get(name.split(".")[0], "--" + name.replace("_", "-"))
            raise PomtError(
                f"--resume {path} was measured with {name} {_show(old)}, but this run has {_show(new)}: "
                f"resume with the same options ({option}), or leave out --resume to start afresh"
            )
    layers = expected.layers if expected.workload == "pomt" else [None]
    wanted = {(layer, b, n) for layer in layers for b in expected.batch_sizes for n in expected.grid}
    found = set(zip(frame["layer"].to_list(), frame["batch_size"].to_list(), frame["tokens"].to_list()))
    if found - wanted:
        raise PomtError(f"--resume {path} holds points outside its own grid: it is damaged; start afresh")
    if meta.complete and wanted - found:
        raise PomtError(f"--resume {path} is marked complete but lacks {len(wanted - found)} of its {len(wanted)} "
                        "points: it is damaged; start afresh")
    return frame, meta
