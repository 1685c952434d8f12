"""What the pipelines share: the :class:`Reporter`, the settings every command takes, clock helpers.

``DEFAULT_LAYER`` is POMT's block where nothing gives one; the defaults that ``--help`` shows
(``BUDGET_S``, ``ROUNDS``...) are :mod:`pomt_cli.defaults`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from pomt_cli.accuracy.evaluate import EvalProgress
from pomt_cli.bench import BenchProgress
from pomt_cli.devices.clocks import ClockRestoreError
from pomt_cli.devices.presets import DevicePreset, default_preset_name, load_preset
from pomt_cli.devices.torch_device import resolve_torch_device
from pomt_cli.errors import PomtError
from pomt_cli.formats.latency import ClockState
from pomt_cli.measure.grid import GridProgress
from pomt_cli.measure.runtimes import Runtime, RuntimeOptions, check_runtime, runtime_info

#: POMT's pruning block when neither the settings nor a report give one.
DEFAULT_LAYER = 3


class Reporter:
    """What a pipeline tells its caller while it runs; every method does nothing here.

    The CLI subclasses it to draw progress bars and print lines; a library caller passes
    nothing (silence) or its own subclass.
    """

    def note(self, text: str) -> None:
        """A line worth showing: which file was found, that nothing was left to measure."""

    def grid(self, event: GridProgress) -> None:
        """A profile's point started (``event.frame`` None) or finished."""

    def interrupted(self, saved: int, path: Path) -> None:
        """A profile stopped early; ``saved`` points are kept in ``path`` for ``--resume``."""

    def decoding(self, done: int, total: int) -> None:
        """Images decoded so far by this process."""

    def evaluating(self, event: EvalProgress) -> None:
        """Accuracy grid points evaluated so far."""

    def timing(self, event: BenchProgress) -> None:
        """One bench method timed in one round."""

    def scoring(self, done: int, total: int) -> None:
        """Bench settings whose accuracy was evaluated so far."""

    def step(self, title: str, args: Sequence[str]) -> None:
        """The demo starts a step: what it does, and the ``pomt`` command line it equals."""

    def finished(self, result: object) -> None:
        """The demo finished a step with this result."""


SILENT = Reporter()


class Settings(BaseModel):
    """What the settings of every pipeline share: frozen, a misspelled field refused (pydantic's
    ``ValidationError``, a ``ValueError``), and the command line to record."""

    model_config = ConfigDict(protected_namespaces=(), frozen=True, extra="forbid")

    command: str | None = Field(None, description="the command line recorded in the files (default: this process's)")


def recorded_command(command: str | None) -> dict:
    """The metadata's ``command`` field where the settings give one (else the metadata's default)."""
    return {} if command is None else {"command": command}


def preset_and_device(device: str | None, torch_device: str | None) -> tuple[DevicePreset, torch.device]:
    """The device preset (default: this machine's) and the torch device (default: the preset's)."""
    preset = load_preset(device or default_preset_name())
    return preset, resolve_torch_device(torch_device or preset.torch_device)


class RuntimeSettings(Settings):
    """What runs the timed forward passes (``--runtime``, ``--ort-providers``, ``--compile-backend``)."""

    runtime: Runtime = Runtime.eager
    ort_providers: list[str] | None = Field(None, description="ONNX Runtime's providers (None: those available)")
    compile_backend: str | None = Field(None, description="torch.compile's backend (None: inductor)")

    @property
    def backend(self) -> str:
        """torch.compile's backend: the one given, else :class:`RuntimeOptions`'s default."""
        return self.compile_backend or RuntimeOptions.compile_backend

    def runtime_options(self, cuda_graphs: bool) -> RuntimeOptions:
        providers = None if self.ort_providers is None else tuple(self.ort_providers)
        return RuntimeOptions(providers=providers, compile_backend=self.backend, cuda_graphs=cuda_graphs)

    def check_runtime_options(self, runtimes: Sequence[Runtime]) -> None:
        """Refuse ``--ort-providers`` or ``--compile-backend`` given without the runtime they set up.

        Raises:
            PomtError: an option whose runtime is not among ``runtimes``.
        """
        for given, option, runtime in ((self.ort_providers is not None, "--ort-providers", Runtime.onnxruntime),
                                       (self.compile_backend is not None, "--compile-backend", Runtime.compile)):
            if given and runtime not in runtimes:
                raise PomtError(f"{option} sets up --runtime {runtime.value}, which this run does not time: "
                                f"add --runtime {runtime.value}, or leave {option} out")

    def checked_runtime(self, device: torch.device, dtype: torch.dtype, cuda_graphs: bool,
                        runtime: Runtime | None = None) -> dict:
        """The record of ``runtime`` (default: ``self.runtime``) for the metadata, once it is checked to run
        here as asked.

        Raises:
            PomtError: CUDA graphs with compile or onnxruntime, a missing extra, a
                provider not available here, a dtype the runtime cannot take.
        """
        runtime = self.runtime if runtime is None else Runtime(runtime)
        options = self.runtime_options(cuda_graphs)
        check_runtime(runtime, device=device, dtype=dtype, options=options)
        return runtime_info(runtime, options, device=device)

    def runtime_slug(self, runtimes: Sequence[Runtime] | None = None) -> tuple[str, ...]:
        """The runtimes' part of a file name (default: ``self.runtime``), in the order given.

        One runtime: its name, none for eager (eager's names stay as they were). Several:
        every name, eager's too, so that ``eager,onnxruntime`` and ``onnxruntime`` differ.
        """
        runtimes = [self.runtime] if runtimes is None else [Runtime(r) for r in runtimes]
        if len(runtimes) > 1:
            return tuple(r.value for r in runtimes)
        return tuple(r.value for r in runtimes if r is not Runtime.eager)


def unrestored_state(clocks: ClockState) -> ClockState:
    """The clock record of a measurement whose clocks were locked but not restored."""
    return clocks.model_copy(update={"detail": "locked for the measurement; restoring them after failed"})


def raise_unrestored(error: ClockRestoreError | None, what: str, path: Path) -> None:
    """Raise a clock restore that failed after the measurement, once its files are written."""
    if error is not None:
        raise ClockRestoreError(f"{error} ({what}: {path})") from None
