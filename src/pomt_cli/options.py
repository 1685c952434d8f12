"""Typed values shared by the library's settings: dtypes, kept-token ranges, layer checks.

Standard library only (a dtype's torch type is looked up when it is asked for), so that
the command line's options use these types without importing torch or pydantic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from pomt_cli.errors import PomtError

if TYPE_CHECKING:
    from torch import dtype as TorchDtype

#: The largest --seed: seeds are combined with token counts into torch's 64-bit seeds.
SEED_MAX = 2**32 - 1


class Dtype(str, Enum):
    """The floating-point types a model runs in, each named as torch names it."""

    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"

    @property
    def torch(self) -> TorchDtype:
        """The torch dtype of this name (torch is imported here, when a model is about to run)."""
        import torch as torch_module

        return getattr(torch_module, self.value)


@dataclass(frozen=True)
class TokenRange:
    """A grid of kept-token counts ``START:STOP:STRIDE``, both ends inclusive, running downwards."""

    start: int
    stop: int
    stride: int

    def __str__(self) -> str:
        return f"{self.start}:{self.stop}:{self.stride}"


def token_grid(spec: TokenRange | None, num_tokens: int, num_prefix: int) -> list[int]:
    """Kept-token counts n of ``spec`` on a model of ``num_tokens`` tokens, descending.

    The default (``spec`` None) is every n from ``num_tokens`` down to ``num_prefix + 1``.
    ``197:17:20`` gives 197, 177, ..., 17 (10 points).

    Raises:
        PomtError: STOP <= p, STRIDE <= 0, START > N or START < STOP.
    """
    if spec is None:
        return list(range(num_tokens, num_prefix, -1))
    start, stop, stride = spec.start, spec.stop, spec.stride
    text = str(spec)
    if stride <= 0:
        raise PomtError(f"--tokens {text!r}: STRIDE must be positive, got {stride}")
    if start > num_tokens:
        raise PomtError(f"--tokens {text!r}: START {start} exceeds the model's {num_tokens} tokens")
    if stop <= num_prefix:
        raise PomtError(
            f"--tokens {text!r}: STOP {stop} must exceed the {num_prefix} prefix token(s); "
            f"the smallest grid point is {num_prefix + 1}"
        )
    if start < stop:
        raise PomtError(f"--tokens {text!r}: START {start} is below STOP {stop}; the grid runs downwards")
    return list(range(start, stop - 1, -stride))


def check_layers(layers: Sequence[int], num_blocks: int, name: str, option: str = "--layer") -> None:
    """Refuse pruning blocks the model does not have.

    Raises:
        PomtError: a layer outside 0..num_blocks - 1 (the message names the range).
    """
    bad = [layer for layer in layers if not 0 <= layer < num_blocks]
    if bad:
        raise PomtError(f"{option} {bad[0]} is out of range: {name} has {num_blocks} blocks "
                        f"(layer 0..{num_blocks - 1})")
