"""Top-K pruning: keep the tokens the class token attends to most.

Pure tensor functions, then :class:`Topk`, the method's declaration: its setting (r tokens
pruned per block) and the reduction it inserts into every block.
"""

from __future__ import annotations

import torch

from pomt_cli.errors import PruningError
from pomt_cli.pruning import tome
from pomt_cli.pruning.attention import fused, residual
from pomt_cli.pruning.registry import Method, register


def class_attention(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int) -> torch.Tensor:
    """The class token's attention to each non-prefix token, averaged over heads.

    Only the class token's row of the attention matrix is computed.

    Args:
        q: (B, H, N, D) queries; the class token is token 0.
        k: (B, H, N, D) keys.
        scale: the attention's logit scale (head_dim ** -0.5).
        num_prefix: p.

    Returns:
        (B, N - p) float32 scores.
    """
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
    return logits.float().softmax(dim=-1).mean(dim=1)[:, 0, num_prefix:]


def keep_top(x: torch.Tensor, scores: torch.Tensor, r: int, num_prefix: int) -> torch.Tensor:
    """Keep the prefix tokens and the N - r - p highest-scoring others, in their original order.

    Args:
        x: (B, N, C) tokens.
        scores: (B, N - p) scores of the non-prefix tokens.
        r: tokens to remove.
        num_prefix: p.

    Returns:
        (B, N - r, C).
    """
    B, N, C = x.shape
    p = num_prefix
    kept_idx = scores.topk(N - r - p, dim=-1, sorted=False).indices.sort(dim=-1).values + p
    index = torch.cat([torch.arange(p, device=x.device).expand(B, p), kept_idx], dim=1)
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, C))


@register
class Topk(Method):
    name = "topk"
    title = "Top-K"

    def schedule(self, g, r, layer):
        if isinstance(r, tuple):
            raise PruningError(f"Top-K r must be an int or a list with one entry per block, got {r!r}")
        per_block = [r] * g.num_blocks if isinstance(r, int) else tome.schedule(list(r), g.num_blocks)
        if any(per_block) and not g.has_class_token:
            raise PruningError(f"Top-K scores tokens by the class token's attention, and {g.name} has no class token")
        return per_block

    def reduce(self, block, x, q, k, v, size, plan):
        x = residual(block, x, fused(block.attn, q, k, v))
        scores = class_attention(q, k, block.attn.scale, plan.num_prefix)
        return keep_top(x, scores, plan.r, plan.num_prefix), size
