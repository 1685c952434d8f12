"""POMT ("Pruning One More Token is Enough"): one-shot pruning in a single block.

Pure tensor functions; :mod:`pomt_cli.pruning.patch` attaches them to timm blocks.
"""

from __future__ import annotations

import torch


def importance(attn: torch.Tensor, v: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Importance of each non-prefix token: attention received + value magnitude.

    Each image is normalised by itself, so a token's score never depends on the other
    images of the batch.

    Args:
        attn: (B, H, N, N) softmax attention, queries on dim -2, keys on dim -1.
        v: (B, H, N, D) values.
        num_prefix: p, prefix tokens at the front.

    Returns:
        (B, N - p) float32 scores, higher is more important.
    """
    p = num_prefix
    # Attention received: max over heads, non-prefix queries and keys, sum over queries.
    received = attn.amax(dim=1)[:, p:, p:].sum(dim=1, dtype=torch.float32)
    received = received / received.amax(dim=-1, keepdim=True)
    # Value magnitude: max over heads, sum over features, softmax over all N tokens.
    magnitude = v.amax(dim=1).float().sum(dim=-1).softmax(dim=-1)[:, p:]
    return received + magnitude


def prune_keep_mean(x: torch.Tensor, scores: torch.Tensor, r: int, num_prefix: int) -> torch.Tensor:
    """Keep the prefix and the N - r - p - 1 best tokens, append the mean of the others.

    Kept tokens stay in their original order.

    Args:
        x: (B, N, C) tokens.
        scores: (B, N - p) importance of the non-prefix tokens.
        r: tokens to remove, 0 <= r <= N - p - 1.
        num_prefix: p.

    Returns:
        (B, N - r, C): prefix tokens, kept tokens, then the mean of the r + 1 discarded ones.
    """
    B, N, C = x.shape
    p = num_prefix
    keep = N - r - p - 1
    order = scores.argsort(dim=-1, descending=True)
    kept_idx = order[:, :keep].sort(dim=-1).values + p
    dropped_idx = order[:, keep:] + p
    prefix_idx = torch.arange(p, device=x.device).expand(B, p)
    index = torch.cat([prefix_idx, kept_idx], dim=1)
    kept = x.gather(1, index.unsqueeze(-1).expand(-1, -1, C))
    dropped = x.gather(1, dropped_idx.unsqueeze(-1).expand(-1, -1, C)).mean(dim=1, keepdim=True)
    return torch.cat([kept, dropped], dim=1)
