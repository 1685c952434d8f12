"""Token geometry of a timm VisionTransformer: how many tokens, how many prefix tokens.

One vocabulary, timm's: ``N`` tokens enter the first block, the first ``p`` of them are
prefix tokens (class, distillation, register tokens) that are never pruned or merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from pomt_cli.errors import PruningError


@dataclass(frozen=True)
class TokenGeometry:
    """The token layout of one model.

    Attributes:
        name: the model's timm architecture name (or its class name).
        num_tokens: N, tokens entering the first block (prefix + patch tokens).
        num_prefix: p, prefix tokens at the front of the sequence.
        num_blocks: transformer blocks.
        embed_dim: channels per token.
        has_class_token: whether token 0 is a class token.
        input_size: (channels, height, width) of the model's input.
    """

    name: str
    num_tokens: int
    num_prefix: int
    num_blocks: int
    embed_dim: int
    has_class_token: bool
    input_size: tuple[int, int, int]

    @property
    def num_patches(self) -> int:
        return self.num_tokens - self.num_prefix

    def describe(self) -> str:
        return f"{self.name} has {self.num_tokens} tokens ({self.num_prefix} prefix)"


def model_name(model: nn.Module) -> str:
    """The model's name in messages and files: timm's architecture, else ``pomt_name``, else its class."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or getattr(model, "pomt_name", None) or type(model).__name__


def geometry(model: nn.Module) -> TokenGeometry:
    """The token geometry of a supported model.

    Raises:
        PruningError: the model is not a timm VisionTransformer with standard blocks and
            attention, or uses a dynamic image size.
    """
    name = model_name(model)
    if not isinstance(model, VisionTransformer):
        raise PruningError(
            f"{name} ({type(model).__name__}) is not supported: pomt patches timm VisionTransformer "
            "models (vit_*, deit_*, *_dinov2)"
        )
    for i, blk in enumerate(model.blocks):
        block_cls = getattr(type(blk), "_pomt_base", type(blk))
        attn = getattr(blk, "attn", None)  # ParallelScalingBlock and others have none
        if block_cls is not Block or type(attn) is not Attention:
            with_attn = "" if attn is None else f" with {type(attn).__name__}"
            raise PruningError(
                f"{name} is not supported: block {i} is {block_cls.__name__}{with_attn}; "
                "pomt needs timm's Block with its standard Attention"
            )
        if getattr(blk.attn, "gate", None) is not None:
            raise PruningError(f"{name} is not supported: block {i} uses gated attention")
    if getattr(model, "dynamic_img_size", False):
        raise PruningError(f"{name} is not supported: it uses a dynamic image size; create it with a fixed img_size")
    num_prefix = int(model.num_prefix_tokens)
    grid = model.patch_embed.grid_size
    num_tokens = num_prefix + int(grid[0]) * int(grid[1])
    img = model.patch_embed.img_size
    in_chans = model.patch_embed.proj.in_channels
    return TokenGeometry(
        name=name,
        num_tokens=num_tokens,
        num_prefix=num_prefix,
        num_blocks=len(model.blocks),
        embed_dim=int(model.embed_dim),
        has_class_token=model.cls_token is not None,
        input_size=(int(in_chans), int(img[0]), int(img[1])),
    )


def embed_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Tokens as they enter the first block: patch embedding, position embedding, norm_pre.

    A near copy of the start of timm's ``VisionTransformer.forward_features``.
    """
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def keep_tokens(x: torch.Tensor, keep: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """The prefix tokens followed by the patch tokens indexed by ``keep``.

    Args:
        x: (B, N, C) tokens.
        keep: (B, k) or (k,) indices into the patch tokens (0 = first patch token).
        num_prefix: p.

    Returns:
        (B, p + k, C).
    """
    patches = x[:, num_prefix:]
    if keep.dim() == 1:
        kept = patches.index_select(1, keep)
    else:
        kept = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :num_prefix], kept], dim=1)


def forward_kept(model: nn.Module, images: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Logits of ``model`` when only the prefix tokens and the patch tokens in ``keep`` enter the blocks.

    Every block then runs on ``p + keep.shape[-1]`` tokens. This is the workload of the
    latency profile and the paper's random-token accuracy estimate. ``keep=None`` keeps all.
    The model must be unpatched (or patched with methods that tolerate fewer tokens).
    """
    x = embed_tokens(model, images)
    if keep is not None:
        x = keep_tokens(x, keep, int(model.num_prefix_tokens))
    x = model.blocks(x)
    x = model.norm(x)
    return model.forward_head(x)
