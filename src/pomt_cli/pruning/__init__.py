"""The shared core: prune (POMT, Top-K) or merge (ToMe) tokens inside timm ViTs, in place.

>>> apply(model, "pomt", r=56, layer=3)   # prune 56 tokens once, in block 3
>>> apply(model, "tome", r=8)             # merge 8 tokens in every block
>>> apply(model, "topk", r=[8] * 12)      # prune 8 tokens in every block
>>> remove(model)                         # back to the original model

Methods are found by name in :mod:`pomt_cli.pruning.registry`; each is one module
(``none``, ``pomt``, ``tome``, ``topk``, registered in that order on import).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pomt_cli.errors import PruningError
from pomt_cli.pruning import none, pomt, tome, topk  # noqa: F401  (registers the methods, in order)
from pomt_cli.pruning import registry
from pomt_cli.pruning.geometry import TokenGeometry, forward_kept, geometry
from pomt_cli.pruning.ideal import forward_ideal
from pomt_cli.pruning.patch import attach, detach, plan_blocks
from pomt_cli.pruning.registry import Method, register, unregister

__all__ = [
    "Method",
    "PruningError",
    "TokenGeometry",
    "apply",
    "capped_from",
    "forward_ideal",
    "forward_kept",
    "geometry",
    "method_names",
    "planned_token_counts",
    "register",
    "remove",
    "removed_per_block",
    "token_counts",
    "unregister",
]

R = int | Sequence[int] | tuple[int, float]


def apply(model: nn.Module, method: str, r: R = 0, layer: int = 3) -> nn.Module:
    """Patch ``model`` in place to reduce tokens with ``method``; returns the model.

    Args:
        model: a timm VisionTransformer (vit_*, deit_* incl. distilled, *_dinov2, *_reg4_dinov2).
        method: a registered method's name (:func:`method_names`): ``"none"`` (undo any
            patch), ``"pomt"``, ``"tome"`` or ``"topk"``.
        r: POMT: tokens pruned once, in block ``layer``. ToMe: tokens merged per block, an
            int, a list with one entry per block, or ``(r, inflection)``. Top-K: tokens
            pruned per block, an int or a list with one entry per block. Integer scalars
            and arrays (NumPy, 0-d tensors) count as ints; bools and floats are refused.
        layer: the block where POMT prunes (0-based; ignored by the other methods).

    Applying again replaces the earlier patch. The patched model keeps its state_dict,
    trains (gradients reach every weight), pickles, copies, traces and exports;
    ``forward_intermediates`` gives the intermediates of pruned blocks with
    ``output_fmt="NLC"`` only.

    ToMe's r is capped in every block at half of the block's non-prefix tokens, as the
    original caps it; :func:`planned_token_counts` and :func:`removed_per_block` report
    the capped schedule and :func:`capped_from` the first block the cap lowered.

    Raises:
        PruningError: (a ``PomtError`` and a ``ValueError``) an unsupported model, an
            unknown method, r or layer not an int, a negative r, r too large (POMT, Top-K)
            or a layer out of range. The model is then left as it was.
    """
    g = geometry(model)
    m = registry.get(method)
    r = registry.as_r(r)
    if m.takes_layer:
        layer = registry.as_int(layer, "layer")
    plans, counts, capped_from = plan_blocks(g, method, r, layer)
    detach(model)
    if m.reduces:
        attach(model, plans)
        model.pomt_config = {
            "method": method, "r": r, "layer": layer, "planned_tokens": counts,
            "per_block": [plan.r for plan in plans], "capped_from": capped_from,
        }
    return model


def method_names() -> tuple[str, ...]:
    """The registered methods, in order: ``("none", "pomt", "tome", "topk")`` and any added."""
    return registry.names()


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model behaves as before; returns it.

    A model that is not patched (any module) is returned as it is.
    """
    detach(model)
    return model


def planned_token_counts(model: nn.Module) -> list[int]:
    """Tokens entering each block, then tokens leaving the last, as the patch plans them."""
    config = getattr(model, "pomt_config", None)
    if config is not None:
        return list(config["planned_tokens"])
    g = geometry(model)
    return [g.num_tokens] * (g.num_blocks + 1)


def removed_per_block(model: nn.Module) -> list[int]:
    """Tokens each block removes, as the patch plans them (ToMe's capped schedule)."""
    counts = planned_token_counts(model)
    return [a - b for a, b in zip(counts, counts[1:])]


def capped_from(model: nn.Module) -> int | None:
    """The first block whose ToMe r the per-block cap lowered (None: no cap, or not ToMe)."""
    config = getattr(model, "pomt_config", None)
    return None if config is None else config["capped_from"]


def token_counts(model: nn.Module) -> list[int]:
    """Tokens entering each block in the last forward pass, then tokens leaving the last block.

    For an unpatched model (or before the first forward pass) this is the planned count.
    """
    seen = [getattr(blk, "pomt_tokens", None) for blk in model.blocks]
    if any(s is None for s in seen):
        return planned_token_counts(model)
    return [s[0] for s in seen] + [seen[-1][1]]
