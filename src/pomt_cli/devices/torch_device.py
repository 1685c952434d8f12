"""Torch devices: resolving a --device spec, naming a device, selecting a GPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from pomt_cli.errors import PomtError


def _visible_devices() -> str:
    """Why torch may see fewer GPUs than the machine has (``; CUDA_VISIBLE_DEVICES=...``), or ``""``."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return ""
    if not value.strip() or value.strip().startswith("-"):
        return f"; CUDA_VISIBLE_DEVICES={value!r} hides every GPU: unset it to use them"
    return f"; CUDA_VISIBLE_DEVICES={value!r} shows torch only those GPUs, numbered from 0"


def _parse_device(spec: str | torch.device) -> torch.device:
    try:
        return torch.device(spec)
    except (RuntimeError, TypeError):
        raise PomtError(f"torch device {spec!r} is not a device name: use cpu, cuda, cuda:1 or mps") from None


def resolve_torch_device(spec: str) -> torch.device:
    """The torch device for ``spec`` (``cuda``, ``cuda:1``, ``cpu``, ``mps``), checked to exist here.

    Raises:
        PomtError: malformed, unsupported or absent device.
    """
    device = _parse_device(spec)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PomtError(
                f"torch device {spec!r} asked for, but CUDA is not available here (torch {torch.__version__}"
                f"{_visible_devices()}): use --torch-device cpu or a CPU preset such as --device cpu"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise PomtError(f"torch device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
                            f"{_visible_devices()}")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise PomtError(f"torch device {spec!r} asked for, but MPS is not available here: use --torch-device cpu")
        return device
    raise PomtError(f"torch device {spec!r} is not supported: use cpu, cuda or mps")


def usable_cores() -> int:
    """The logical cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def set_cpu_threads(count: int, *, source: str = "--threads") -> None:
    """Give torch ``count`` intra-op CPU threads, at most the usable cores.

    More threads than cores would time their contention, not the model, and a count in the
    thousands exhausts memory while torch starts them (a crash, not an error).

    Raises:
        PomtError: ``count`` exceeds the usable cores; ``source`` names where it came from.
    """
    cores = usable_cores()
    if count > cores:
        raise PomtError(f"{source} {count} exceeds the {cores} logical cores this process may use: "
                        f"give --threads {cores} or fewer")
    torch.set_num_threads(count)


def device_name(device: torch.device) -> str:
    """A human name for the hardware behind ``device``, e.g. ``NVIDIA H100 80GB HBM3``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (MPS)"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return f"{model} ({os.cpu_count()} logical cores, torch using {threads} thread{'' if threads == 1 else 's'})"


def gpu_selector(device: torch.device | str | None) -> str:
    """What ``nvidia-smi -i`` needs for ``device``: the GPU's UUID when CUDA sees it, else its index.

    The UUID survives CUDA_VISIBLE_DEVICES renumbering; without CUDA (e.g. on a board
    where torch lacks it) the index is the best guess.

    Raises:
        PomtError: ``device`` is not a device name.
    """
    device = _parse_device(device) if device is not None else None
    index = device.index if device is not None and device.type == "cuda" and device.index is not None else 0
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        try:
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        except (AttributeError, RuntimeError):
            pass
    return str(index)


def short_device_name(name: str, width: int = 40) -> str:
    """``name`` for a title at most ``width`` characters wide, cut where a reader sees it was cut.

    A CPU's name loses its parenthesis of cores and threads first (the files keep the
    whole name); what is still too long is cut at a word and ends with an ellipsis.
    """
    if len(name) <= width:
        return name
    name = name.split(" (", 1)[0]
    if len(name) <= width:
        return name
    cut = name[:width - 1].rsplit(" ", 1)[0] if " " in name[:width - 1] else name[:width - 1]
    return cut.rstrip(" ,") + "\u2026"
