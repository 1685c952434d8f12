"""Accuracy estimators: the reduction each one applies at n, its grid, and the random patch order."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from pomt_cli.errors import PomtError
from pomt_cli.formats.accuracy import estimator_method
from pomt_cli.options import TokenRange, token_grid
from pomt_cli.pruning.geometry import TokenGeometry


def fewest_tokens(estimator: str, g: TokenGeometry) -> int:
    """The smallest n the estimator can reach on a model (p + 1, except for ToMe on shallow models)."""
    method = estimator_method(estimator)
    return g.num_prefix + 1 if method is None else method.fewest_tokens(g)


def reduction(estimator: str, g: TokenGeometry, n: int, layer: int) -> dict | None:
    """Keyword arguments of ``pomt_cli.pruning.apply`` that leave ``n`` tokens (None for ``random``)."""
    method = estimator_method(estimator)
    return None if method is None else method.estimator_setting(g, g.num_tokens - n, layer)


def accuracy_grid(spec: TokenRange | None, g: TokenGeometry, estimator: str) -> list[int]:
    """The kept-token counts n to evaluate: ``--tokens`` or every n the estimator can reach.

    Raises:
        PomtError: malformed spec, or a point the estimator cannot reach.
    """
    fewest = fewest_tokens(estimator, g)
    if spec is None:
        return list(range(g.num_tokens, fewest - 1, -1))
    grid = token_grid(spec, g.num_tokens, g.num_prefix)
    if grid[-1] < fewest:
        raise PomtError(
            f"--tokens {str(spec)!r}: ToMe merges at most half of the non-prefix tokens per block, so on "
            f"{g.name} ({g.num_blocks} blocks) it leaves at least {fewest} tokens; give STOP >= {fewest}"
        )
    return grid


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Sebastiano Vigna's SplitMix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def random_patch_order(names: list[str], seed: int, num_patches: int) -> torch.Tensor:
    """Each image's fixed random ranking of its patch tokens.

    Row i is a permutation of 0..P-1 that depends only on ``seed`` and ``names[i]``
    (SHA-256 of both, mixed with each patch index by SplitMix64), never on the batch, the
    process or the other images. Keeping the first n - p entries gives the random tokens
    at count n.

    Returns:
        (K, P) int64.
    """
    base = np.array(
        [int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little") for name in names],
        dtype=np.uint64,
    ).reshape(-1, 1)
    keys = _splitmix64(base ^ _splitmix64(np.arange(num_patches, dtype=np.uint64)))
    return torch.from_numpy(np.argsort(keys, axis=1, kind="stable").astype(np.int64))
