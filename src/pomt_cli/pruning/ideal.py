"""The ideal of a token-reduction schedule: timm's own sub-layers run at the reduced counts.

Tokens are dropped by slicing, which costs nothing, so this is the latency a method would
reach if choosing, pruning and merging tokens were free. Benchmarks compare against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pomt_cli.pruning.geometry import embed_tokens


def forward_ideal(model: nn.Module, images: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Logits of the unpatched ``model`` when block i's attention sees ``counts[i]`` tokens
    and its MLP ``counts[i + 1]``.

    Args:
        model: an unpatched timm VisionTransformer.
        images: (B, C, H, W).
        counts: ``num_blocks + 1`` token counts, as from ``planned_token_counts``.
    """
    x = embed_tokens(model, images)[:, : counts[0]]
    for i, blk in enumerate(model.blocks):
        x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
        x = x[:, : counts[i + 1]]
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    x = model.norm(x)
    return model.forward_head(x)
