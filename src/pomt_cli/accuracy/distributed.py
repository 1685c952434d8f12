"""Processes of one evaluation: torch.distributed under torchrun, or a single process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pomt_cli.devices.torch_device import resolve_torch_device
from pomt_cli.errors import PomtError


@dataclass(frozen=True)
class Processes:
    """This process's place in a (possibly single-process) run."""

    rank: int
    world_size: int
    device: torch.device
    _held: list = field(default_factory=list, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def hold(self, tensor: torch.Tensor) -> torch.Tensor:
        """Keep ``tensor``, given to a collective, alive until the process group is destroyed.

        Gloo's worker thread may drop its reference to a finished collective's tensor after
        the caller has moved on; were that the last one, it would need the GIL, which the
        group's destructor holds while it joins that thread: rank 1 then hung for ever at
        exit (torch 2.1 to 2.7; torch released the GIL there from 2.8, pytorch#154976).
        """
        self._held.append(tensor)
        return tensor


def _resolve_device(spec: str, local_rank: int, world_size: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = resolve_torch_device(spec)
    if device.type == "cuda" and world_size > 1:
        if local_rank >= torch.cuda.device_count():
            raise PomtError(f"process {local_rank} has no GPU: this machine has {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
    return device


@contextmanager
def processes(device: str = "auto") -> Iterator[Processes]:
    """This process's rank and device; under ``torchrun`` (``WORLD_SIZE`` > 1) a process group too.

    The group uses NCCL on CUDA and gloo otherwise, and is destroyed on exit.

    Args:
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``...; under torchrun each
            process takes the GPU of its local rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = _resolve_device(device, local_rank, world_size)
    if world_size == 1 or dist.is_initialized():
        yield Processes(rank=rank, world_size=world_size, device=torch_device)
        return
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    procs = Processes(rank=rank, world_size=world_size, device=torch_device)
    try:
        yield procs
    finally:
        dist.destroy_process_group()
        procs._held.clear()  # the group's threads are gone: the last references are ours


def gather(procs: Processes, obj: object) -> list:
    if procs.world_size == 1:
        return [obj]
    out: list = [None] * procs.world_size
    dist.all_gather_object(out, obj)
    return out
