"""Attaching the methods to a timm VisionTransformer: class swaps, undone by :func:`remove`.

The model's class is swapped for a subclass whose ``forward_features`` and
``forward_intermediates`` pass ToMe's token sizes from block to block (a local variable, no
per-forward state on the model; timm's gradient checkpointing is kept),
and each block's class for a subclass whose ``forward_tokens`` is timm's
``Block.forward`` with the method's reduction (:meth:`Method.reduce
<pomt_cli.pruning.registry.Method.reduce>`) between the attention and MLP sub-layers.
Blocks that reduce nothing and see no token sizes run timm's own forward unchanged.
The model calls each block as a module, so hooks on a block run; a reducing block
computes its attention itself, so hooks on its ``attn`` do not.
"""

from __future__ import annotations

import functools

import torch
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from pomt_cli.errors import PruningError
from pomt_cli.pruning import registry
from pomt_cli.pruning.attention import qkv as _qkv
from pomt_cli.pruning.geometry import TokenGeometry
from pomt_cli.pruning.registry import BlockPlan

__all__ = ["BlockPlan", "PrunedBlock", "PrunedVisionTransformer", "attach", "detach", "plan_blocks"]


def _new_patched(mixin: type, base: type) -> nn.Module:
    """An empty instance of ``mixin`` on ``base``, for unpickling (the class is made at run time)."""
    cls = patched_class(mixin, base)
    return cls.__new__(cls)


class _Patched(nn.Module):
    """Pickles a patched module by its mixin and timm base class, which pickle can find by name."""

    def __reduce_ex__(self, protocol):
        cls = type(self)
        return _new_patched, (cls._pomt_mixin, cls._pomt_base), self.__dict__


class PrunedBlock(_Patched):
    """Mixin for timm's ``Block``: the reduction sits after attention + residual, before the MLP."""

    pomt_plan: BlockPlan
    pomt_tokens: tuple[int, int] | None = None

    def forward(
        self, x: torch.Tensor, attn_mask=None, is_causal: bool = False, *,
        size: torch.Tensor | None = None, return_size: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """timm's ``Block.forward`` with the plan's reduction; hooks on the block run as on timm's.

        Args:
            x: (B, N, C) tokens.
            size: (B, N, 1) token sizes from the block before, for a merging method (ToMe).
            return_size: return ``(x, size)`` instead of ``x``. The patched model calls the
                blocks of a merging method so; the others return ``x`` alone.

        Raises:
            PruningError: an attention mask; a block after ToMe's first merge called without
                the sizes (run the model, or pass them along); a token count other than planned.
        """
        if attn_mask is not None or is_causal:
            raise PruningError("pruned blocks take no attention mask")
        if size is None and self.pomt_plan.sizes_needed:
            raise PruningError(
                "this block follows ToMe's first merge and needs the merged tokens' sizes: run the "
                "model (forward, forward_features, forward_intermediates), or pass each block's sizes "
                "on with x, size = block(x, size=size, return_size=True)"
            )
        x, size = self.forward_tokens(x, size)
        return (x, size) if return_size else x

    def forward_tokens(
        self, x: torch.Tensor, size: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block on ``x`` (B, N, C) with token sizes ``size`` (B, N, 1) or None (no hooks run)."""
        plan = self.pomt_plan
        n_in = x.shape[1]
        if plan.tokens and n_in != plan.tokens:
            raise PruningError(
                f"a pruned block got {n_in} tokens where its plan expects {plan.tokens}: after changing "
                "the input size (set_input_size), call apply(model, ...) again"
            )
        if plan.r == 0 and size is None:
            x = super().forward(x)
            self.pomt_tokens = (n_in, n_in)
            return x, None
        q, k, v = _qkv(self.attn, self.norm1(x))
        # --- modified from timm's Block.forward: the method computes the attention sub-layer
        # --- and reduces the tokens before the MLP.
        x, size = registry.get(plan.method).reduce(self, x, q, k, v, size, plan)
        # --- end of modification
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        self.pomt_tokens = (n_in, x.shape[1])
        return x, size


class PrunedVisionTransformer(_Patched):
    """Mixin for timm's ``VisionTransformer``: blocks hand token sizes on to the next."""

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise PruningError("pruned models take no attention mask")
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self._patch_drop(x)
        x = self.norm_pre(x)
        # --- modified from timm: blocks run one by one and pass ToMe's token sizes along.
        size = None
        for blk in self.blocks:
            x, size = self._run_block(blk, x, size)
        # --- end of modification
        return self.norm(x)

    def _patch_drop(self, x: torch.Tensor) -> torch.Tensor:
        """timm's patch dropout, refused where it drops tokens (the plan counts every token)."""
        n = x.shape[1]
        x = self.patch_drop(x)
        if x.shape[1] != n:
            raise PruningError(
                "patch dropout (patch_drop_rate) removed tokens, and pruned models plan for all "
                "of them: train without it, or call model.eval()"
            )
        return x

    def _run_block(
        self, blk: nn.Module, x: torch.Tensor, size: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block, called as a module so that its hooks run, and checkpointed as timm's where
        gradient checkpointing is on; a merging method's blocks take and return the sizes."""
        kwargs = {"size": size, "return_size": True} if blk.pomt_plan.sizes else {}
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            out = checkpoint(blk, x, use_reentrant=False, **kwargs)
        else:
            out = blk(x, **kwargs)
        return out if kwargs else (out, None)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask=None,
        is_causal: bool = False,
    ):
        """timm's ``forward_intermediates`` on the patched blocks (ToMe's sizes passed along).

        A block's output after tokens were removed has no image grid: ``output_fmt="NCHW"``
        (timm's default) is refused for such a block, ``"NLC"`` gives (B, n, C) with the
        block's n tokens (prefix tokens split off as in timm).

        Raises:
            PruningError: an attention mask, an unknown ``output_fmt``, or ``"NCHW"`` for a
                block whose output has fewer tokens than the grid.
        """
        if attn_mask is not None or is_causal:
            raise PruningError("pruned models take no attention mask")
        if output_fmt not in ("NCHW", "NLC"):
            raise PruningError(f"output_fmt={output_fmt!r}: use 'NCHW' or 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        reshape = output_fmt == "NCHW"
        counts = self.pomt_config["planned_tokens"]
        reduced = [i for i in take_indices if counts[i + 1] < counts[0]]
        if reshape and reduced:
            raise PruningError(
                f"block {reduced[0]} leaves {counts[reduced[0] + 1]} of {counts[0]} tokens, which have "
                "no image grid: pass output_fmt='NLC' for the intermediates of a pruned model"
            )
        B, _, height, width = x.shape
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self._patch_drop(x)
        x = self.norm_pre(x)
        # --- modified from timm: blocks pass ToMe's token sizes along.
        intermediates = []
        size = None
        for i, blk in enumerate(self.blocks[: max_index + 1] if stop_early else self.blocks):
            x, size = self._run_block(blk, x, size)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        # --- end of modification
        p = self.num_prefix_tokens
        prefix_tokens = [y[:, :p] for y in intermediates] if p else None
        intermediates = [y[:, p:] for y in intermediates]
        if reshape:
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            result = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(x)
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


@functools.cache
def patched_class(mixin: type, base: type) -> type:
    """``mixin`` on top of ``base``, created once per pair and remembering ``base``."""
    return type(f"Pomt{base.__name__}", (mixin, base), {"_pomt_base": base, "_pomt_mixin": mixin})


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
    for blk in getattr(model, "blocks", ()):
        blk.__class__ = original_class(blk)
        for name in ("pomt_plan", "pomt_tokens"):
            blk.__dict__.pop(name, None)
    model.__dict__.pop("pomt_config", None)


def plan_blocks(
    geometry: TokenGeometry, method: str, r, layer: int
) -> tuple[list[BlockPlan], list[int], int | None]:
    """Validate a method's setting and return each block's plan and the token counts.

    The method gives the schedule (:meth:`Method.schedule <pomt_cli.pruning.registry.Method.schedule>`)
    and may cap it (ToMe caps r in every block at ``(n - p) // 2`` of the block's n tokens,
    as the original); the plans and counts hold the capped r.

    Returns:
        ``(plans, counts, capped_from)``: one plan per block, ``num_blocks + 1`` counts
        (tokens entering each block, then tokens leaving the last), and the first block
        whose r the cap lowered (None if none was).

    Raises:
        PruningError: unknown method, bad r or layer; the message names the limit.
    """
    g = geometry
    p = g.num_prefix
    m = registry.get(method)
    r = registry.as_r(r)
    if m.takes_layer:
        layer = registry.as_int(layer, "layer")
    per_block = m.schedule(g, r, layer)
    for i, ri in enumerate(per_block):
        if ri < 0:
            raise PruningError(f"r={ri} at block {i} is negative: give r >= 0")
    requested, per_block = per_block, m.cap(per_block, g)
    capped_from = next((i for i, (a, b) in enumerate(zip(requested, per_block)) if a != b), None)
    counts = [g.num_tokens]
    for i, ri in enumerate(per_block):
        n = counts[-1]
        limit = n - p - 1
        if ri > limit:
            where = "" if n == g.num_tokens else f" left at block {i}"
            raise PruningError(
                f"r={ri} is too large: {g.name} has {n} tokens ({p} prefix){where}, "
                f"at most {limit} can be pruned at block {i}"
            )
        counts.append(n - ri)
    plans = [
        BlockPlan(method, ri, p, class_token=g.has_class_token, tokens=counts[i], sizes=m.merges,
                  sizes_needed=m.merges and any(per_block[:i]))
        for i, ri in enumerate(per_block)
    ]
    return plans, counts, capped_from
