"""Parsing of option values shared by several commands (dtypes, lists, token grids)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pomt_cli.errors import PomtError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: The largest --seed: seeds are combined with token counts into torch's 64-bit seeds.
SEED_MAX = 2**32 - 1

_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def parse_dtype(name: str) -> tuple[str, torch.dtype]:
    """``"float16"`` (or ``fp16``/``half``) -> ``("float16", torch.float16)``."""
    key = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise PomtError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return key, DTYPES[key]


def parse_int_list(text: str, option: str, minimum: int = 1) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]``; every value at least ``minimum``."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise PomtError(f"{option} {text!r}: {part!r} is not an integer; give e.g. 1,4,16") from None
        if value < minimum:
            raise PomtError(f"{option} {text!r}: {value} is below {minimum}; give values >= {minimum}")
        values.append(value)
    if len(set(values)) != len(values):
        raise PomtError(f"{option} {text!r} repeats a value; give each value once")
    return values


def token_grid(spec: str | None, num_tokens: int, num_prefix: int) -> list[int]:
    """Kept-token counts n from ``START:STOP:STRIDE`` (both ends inclusive), descending.

    The default (``spec`` None) is every n from ``num_tokens`` down to ``num_prefix + 1``.
    ``197:17:20`` gives 197, 177, ..., 17 (10 points).

    Raises:
        PomtError: malformed spec, STOP <= p, STRIDE <= 0, START > N or START < STOP.
    """
    if spec is None:
        return list(range(num_tokens, num_prefix, -1))
    parts = spec.split(":")
    if len(parts) != 3:
        raise PomtError(f"--tokens {spec!r} is not START:STOP:STRIDE; give e.g. {num_tokens}:{num_prefix + 1}:1")
    try:
        start, stop, stride = (int(p) for p in parts)
    except ValueError:
        raise PomtError(f"--tokens {spec!r} must hold three integers START:STOP:STRIDE") from None
    if stride <= 0:
        raise PomtError(f"--tokens {spec!r}: STRIDE must be positive, got {stride}")
    if start > num_tokens:
        raise PomtError(f"--tokens {spec!r}: START {start} exceeds the model's {num_tokens} tokens")
    if stop <= num_prefix:
        raise PomtError(
            f"--tokens {spec!r}: STOP {stop} must exceed the {num_prefix} prefix token(s); "
            f"the smallest grid point is {num_prefix + 1}"
        )
    if start < stop:
        raise PomtError(f"--tokens {spec!r}: START {start} is below STOP {stop}; the grid runs downwards")
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
