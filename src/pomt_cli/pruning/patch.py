"""Attaching the methods to a timm VisionTransformer: class swaps, undone by :func:`remove`.

The model's class is swapped for a subclass whose ``forward_features`` passes ToMe's
token sizes from block to block (a local variable, no per-forward state on the model),
and each block's class for a subclass whose ``forward_tokens`` is timm's
``Block.forward`` with the reduction inserted between the attention and MLP sub-layers.
Blocks that reduce nothing and see no token sizes run timm's own forward unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import nn

from pomt_cli.pruning import pomt, tome, topk
from pomt_cli.pruning.geometry import TokenGeometry

METHODS = ("none", "pomt", "tome", "topk")


@dataclass(frozen=True)
class BlockPlan:
    """What one block does: ``method`` with ``r`` tokens removed (0: nothing)."""

    method: str
    r: int
    num_prefix: int
    #: POMT's scoring: "lean" (fused attention, log-probabilities a chunk at a time),
    #: "explicit" (the full softmax matrix, as the paper's code; what exported, traced and
    #: compiled graphs get), or "auto": lean in float16/bfloat16, where it was measured
    #: faster (H200 and CPU, docs/PERFORMANCE.md), explicit in float32, where it was not.
    scoring: str = "auto"
    #: ToMe: whether the model has a class token (A's unmerged tokens then stay in position order).
    class_token: bool = True


_HALF = (torch.float16, torch.bfloat16)


def _qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys, values (B, H, N, D) as timm's Attention computes them."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _project(attn: Attention, o: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) attention output -> (B, N, C), as timm's Attention finishes."""
    B, H, N, D = o.shape
    o = o.transpose(1, 2).reshape(B, N, H * D)
    norm = getattr(attn, "norm", None)  # scale_norm; absent in early timm 1.0 releases
    return attn.proj_drop(attn.proj(o if norm is None else norm(o)))


def _fused(attn: Attention, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
    p = attn.attn_drop.p if attn.training else 0.0
    if mask is not None and pomt.tracing():
        # Exporters decompose SDPA with a mask into a layout that the following reshape
        # cannot view (torch 2.14); the same attention written out exports cleanly.
        a = ((q * attn.scale) @ k.transpose(-2, -1) + mask).softmax(dim=-1)
        return attn.attn_drop(a) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


class PrunedBlock(nn.Module):
    """Mixin for timm's ``Block``: the reduction sits after attention + residual, before the MLP."""

    pomt_plan: BlockPlan
    pomt_tokens: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("pruned blocks take no attention mask")
        return self.forward_tokens(x, None)[0]

    def forward_tokens(
        self, x: torch.Tensor, size: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block on ``x`` (B, N, C) with token sizes ``size`` (B, N, 1) or None."""
        plan = self.pomt_plan
        n_in = x.shape[1]
        if plan.r == 0 and size is None:
            x = super().forward(x)
            self.pomt_tokens = (n_in, n_in)
            return x, None
        attn = self.attn
        q, k, v = _qkv(attn, self.norm1(x))
        # --- modified from timm's Block.forward: the attention returns what the method needs,
        # --- and the tokens are reduced before the MLP.
        lean = plan.scoring == "lean" or (plan.scoring == "auto" and q.dtype in _HALF)
        explicit = not lean or (attn.training and attn.attn_drop.p > 0) or pomt.tracing()
        if plan.method == "pomt" and explicit:
            a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = x + self.drop_path1(self.ls1(_project(attn, attn.attn_drop(a) @ v)))
            x = pomt.prune_keep_mean(x, pomt.importance(a, v, plan.num_prefix), plan.r, plan.num_prefix)
        elif plan.method == "pomt":
            o, lse = pomt.attention_lse(q, k, v, attn.scale)
            x = x + self.drop_path1(self.ls1(_project(attn, o)))
            scores = pomt.importance_lean(q, k, v, lse, attn.scale, plan.num_prefix)
            x = pomt.prune_keep_mean(x, scores, plan.r, plan.num_prefix)
        elif plan.method == "topk":
            x = x + self.drop_path1(self.ls1(_project(attn, _fused(attn, q, k, v))))
            scores = topk.class_attention(q, k, attn.scale, plan.num_prefix)
            x = topk.keep_top(x, scores, plan.r, plan.num_prefix)
        else:  # tome
            mask = None if size is None else size.log().to(q.dtype).transpose(1, 2).unsqueeze(1)
            x = x + self.drop_path1(self.ls1(_project(attn, _fused(attn, q, k, v, mask))))
            if plan.r > 0:
                if size is None:
                    size = x.new_ones(x.shape[0], n_in, 1)
                matching = tome.bipartite_matching(k.mean(dim=1), plan.r, plan.num_prefix, plan.class_token)
                x, size = tome.merge(x, size, matching, plan.num_prefix)
        # --- end of modification
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        self.pomt_tokens = (n_in, x.shape[1])
        return x, size


class PrunedVisionTransformer(nn.Module):
    """Mixin for timm's ``VisionTransformer``: blocks hand token sizes on to the next."""

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("pruned models take no attention mask")
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        # --- modified from timm: blocks run one by one and pass ToMe's token sizes along.
        size = None
        for blk in self.blocks:
            x, size = blk.forward_tokens(x, size)
        # --- end of modification
        return self.norm(x)


@functools.cache
def patched_class(mixin: type, base: type) -> type:
    """``mixin`` on top of ``base``, created once per pair and remembering ``base``."""
    return type(f"Pomt{base.__name__}", (mixin, base), {"_pomt_base": base})


def original_class(module: nn.Module) -> type:
    return getattr(type(module), "_pomt_base", type(module))


def attach(model: nn.Module, plans: list[BlockPlan]) -> None:
    """Swap the classes of ``model`` and its blocks and give each block its plan."""
    model.__class__ = patched_class(PrunedVisionTransformer, original_class(model))
    for blk, plan in zip(model.blocks, plans):
        blk.__class__ = patched_class(PrunedBlock, original_class(blk))
        blk.pomt_plan = plan
        blk.pomt_tokens = None


def detach(model: nn.Module) -> None:
    """Undo :func:`attach`; a model that is not patched is left as it is."""
    model.__class__ = original_class(model)
    for blk in model.blocks:
        blk.__class__ = original_class(blk)
        for name in ("pomt_plan", "pomt_tokens"):
            blk.__dict__.pop(name, None)
    model.__dict__.pop("pomt_config", None)


def plan_blocks(
    geometry: TokenGeometry, method: str, r, layer: int
) -> tuple[list[BlockPlan], list[int], int | None]:
    """Validate a method's setting and return each block's plan and the token counts.

    ToMe's r is capped in every block at ``(n - p) // 2`` of the block's n tokens, as the
    original caps it (at ``(n - protected) // 2``); the plans and counts hold the capped r.

    Returns:
        ``(plans, counts, capped_from)``: one plan per block, ``num_blocks + 1`` counts
        (tokens entering each block, then tokens leaving the last), and the first block
        whose r the cap lowered (None if none was).

    Raises:
        ValueError: unknown method, bad r or layer; the message names the limit.
    """
    g = geometry
    p, depth = g.num_prefix, g.num_blocks
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if method == "pomt":
        if not isinstance(r, int):
            raise ValueError(f"POMT prunes once: r must be an int, got {r!r}")
        if not 0 <= layer < depth:
            raise ValueError(f"layer={layer} is out of range: {g.name} has {depth} blocks (layer 0..{depth - 1})")
        per_block = [r if i == layer else 0 for i in range(depth)]
    elif method == "tome":
        per_block = tome.schedule(r, depth)
    elif method == "topk":
        if isinstance(r, tuple):
            raise ValueError(f"Top-K r must be an int or a list with one entry per block, got {r!r}")
        per_block = [r] * depth if isinstance(r, int) else tome.schedule(list(r), depth)
        if any(per_block) and not g.has_class_token:
            raise ValueError(f"Top-K scores tokens by the class token's attention, and {g.name} has no class token")
    else:
        per_block = [0] * depth
    for i, ri in enumerate(per_block):
        if ri < 0:
            raise ValueError(f"r={ri} at block {i} is negative: give r >= 0")
    capped_from = None
    if method == "tome":
        requested, per_block = per_block, tome.cap(per_block, g.num_tokens, p)
        capped_from = next((i for i, (a, b) in enumerate(zip(requested, per_block)) if a != b), None)
    counts = [g.num_tokens]
    for i, ri in enumerate(per_block):
        n = counts[-1]
        limit = n - p - 1
        if ri > limit:
            where = "" if n == g.num_tokens else f" left at block {i}"
            raise ValueError(
                f"r={ri} is too large: {g.name} has {n} tokens ({p} prefix){where}, "
                f"at most {limit} can be pruned at block {i}"
            )
        counts.append(n - ri)
    plans = [BlockPlan(method, ri, p, class_token=g.has_class_token) for ri in per_block]
    return plans, counts, capped_from
