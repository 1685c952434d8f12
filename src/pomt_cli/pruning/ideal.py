"""The ideal of a token-reduction schedule: timm's own sub-layers run at the reduced counts.

Tokens are dropped by slicing, which costs nothing, so this is the latency a method would
reach if choosing, pruning and merging tokens were free. Benchmarks compare against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pomt_cli.errors import PruningError
from pomt_cli.pruning.geometry import embed_tokens, geometry


def forward_ideal(model: nn.Module, images: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Logits of the unpatched ``model`` when block i's attention sees ``counts[i]`` tokens
    and its MLP ``counts[i + 1]``.

    Args:
        model: an unpatched timm VisionTransformer.
        images: (B, C, H, W).
        counts: ``num_blocks + 1`` token counts, as from ``planned_token_counts``.

    Raises:
        PruningError: counts of another length, above the model's tokens, rising, or
            leaving no token besides the prefix.
    """
    g = geometry(model)
    counts = [int(c) for c in counts]
    if len(counts) != g.num_blocks + 1:
        raise PruningError(
            f"{len(counts)} token counts for {g.num_blocks} blocks: give num_blocks + 1 "
            "(tokens entering each block, then leaving the last), as planned_token_counts returns"
        )
    if counts[0] > g.num_tokens or counts[-1] <= g.num_prefix or any(b > a for a, b in zip(counts, counts[1:])):
        raise PruningError(
            f"token counts {counts} must not rise, start at most at the model's {g.num_tokens} "
            f"tokens and end above its {g.num_prefix} prefix tokens"
        )
    x = embed_tokens(model, images)[:, : counts[0]]
    for i, blk in enumerate(model.blocks):
        x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
        x = x[:, : counts[i + 1]]
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    x = model.norm(x)
    return model.forward_head(x)
