"""Token Merging (Bolya et al., ICLR 2023): bipartite soft matching and size-weighted merging.

Pure tensor functions, then :class:`Tome`, the method's declaration: its setting (r tokens
merged per block), the per-block cap, and the reduction it inserts into every block, which
also adds ``log(size)`` to the attention logits of every later block (proportional attention).

As in the original (facebookresearch/ToMe, ``bipartite_soft_matching``), the *whole* token
sequence alternates into set A (even positions) and set B (odd positions), prefix tokens
included, and r is capped in every block at ``(N - protected) // 2``.

The original protects the class token (position 0, in A: its row of the similarity is
-inf, so it is never merged away) and the distillation token (position 1, in B: its column
is -inf, so nothing merges into it). pomt generalises this to every prefix token, wherever
the alternation puts it: the A-side prefix tokens (positions 0, 2, 4, ... < p) are never
sources, the B-side ones (1, 3, ... < p) never destinations, and all p count as protected.
For class-token and distilled models this is the original exactly; for register models
(DINOv2 reg4: p = 5) the registers are protected too, where the original would merge them.

Output order, as the original's: the prefix tokens first in their order (the original keeps
the class token first by sorting A's unmerged tokens, and the distillation token second
explicitly), then A's unmerged tokens, then B's tokens. A's unmerged tokens are in position
order when the model has a class token (the original's sort), and in the matching's order
(most similar first) when it has none (the original does not sort then).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from pomt_cli.errors import PruningError
from pomt_cli.pruning.attention import fused, residual
from pomt_cli.pruning.registry import Method, as_int, as_r, register, spread


def schedule(r: int | Sequence[int] | tuple[int, float], num_blocks: int) -> list[int]:
    """Tokens requested to merge in each block (before the per-block cap of :func:`cap`).

    Args:
        r: an int (the same in every block), a list with one entry per block, or a tuple
            ``(r, inflection)`` as the original's ``parse_r``: a linear schedule from
            ``int(r * (1 - inflection))`` to ``2 r`` minus that, each entry truncated to an
            int; inflection -1 is the paper's decreasing schedule (2r down to 0), 0 is
            constant, +1 increasing (others outside [-1, 1] are refused). Its mean is r up
            to the truncation.
        num_blocks: depth of the model.
    """
    if isinstance(r, tuple):
        if len(r) != 2:
            raise PruningError(f"ToMe r as a tuple must be (r, inflection), got {r!r}")
        mean, inflection = as_int(r[0], "ToMe's r in (r, inflection)"), r[1]
        if isinstance(inflection, bool) or not isinstance(inflection, numbers.Real) or not math.isfinite(inflection):
            raise PruningError(f"ToMe's inflection in (r, inflection) must be a finite number, got {inflection!r}")
        inflection = float(inflection)
        if not -1.0 <= inflection <= 1.0:
            raise PruningError(
                f"ToMe's inflection in (r, inflection) must be within [-1, 1] (the original's range: "
                f"-1 decreasing, 0 constant, 1 increasing), got {inflection:g}"
            )
        if num_blocks == 1:
            return [mean]
        first = int(mean * (1.0 - inflection))
        last = 2 * mean - first
        step = (last - first) / (num_blocks - 1)
        return [int(first + step * i) for i in range(num_blocks)]
    r = as_r(r)
    if isinstance(r, int):
        return [r] * num_blocks
    values = list(r)
    if len(values) != num_blocks:
        raise PruningError(f"r has {len(values)} entries but the model has {num_blocks} blocks: give one per block")
    return values


def cap(requested: Sequence[int], num_tokens: int, num_prefix: int) -> list[int]:
    """The original's per-block cap: block i merges ``min(r_i, (n_i - p) // 2)`` of its n_i tokens.

    Args:
        requested: tokens requested per block (each >= 0).
        num_tokens: N, tokens entering the first block.
        num_prefix: p, the protected tokens.
    """
    merged, n = [], num_tokens
    for r in requested:
        merged.append(min(r, (n - num_prefix) // 2))
        n -= merged[-1]
    return merged


def bipartite_matching(
    metric: torch.Tensor, r: int, num_prefix: int, class_token: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair the r most similar tokens of set A with their best partner in set B.

    Tokens alternate into A (even positions) and B (odd positions), prefix tokens included;
    the ``ceil(p / 2)`` prefix tokens in A and the ``floor(p / 2)`` in B take no part. Each
    free A token's partner is its most cosine-similar free B token; the r free A tokens
    with the most similar partners merge into them.

    Args:
        metric: (B, N, D) similarity features (keys averaged over heads).
        r: pairs to merge, at most ``(N - p) // 2``.
        num_prefix: p.
        class_token: whether the model has a class token: A's unmerged tokens are then kept
            in position order, else in the matching's order (as the original).

    Returns:
        ``(merged, partner, unmerged)``: (B, r) indices into A's free tokens of the merged
        tokens, (B, r) indices into B's free tokens of their partners, (B, |A free| - r)
        indices into A's free tokens of the tokens kept.
    """
    in_a, in_b = (num_prefix + 1) // 2, num_prefix // 2
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True)
    similarity = m[:, 0::2][:, in_a:] @ m[:, 1::2][:, in_b:].transpose(-2, -1)  # (B, |A free|, |B free|)
    best, partner = similarity.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged, unmerged = order[:, :r], order[:, r:]
    if class_token:
        unmerged = unmerged.sort(dim=-1).values
    return merged, partner.gather(1, merged), unmerged


def merge(
    x: torch.Tensor,
    size: torch.Tensor,
    matching: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of each merged A token into its B partner.

    The size-weighted sums ``x * size`` and the sizes are added into the partners with
    ``scatter_add`` (ops that export to ONNX), then divided by the summed sizes.

    Args:
        x: (B, N, C) tokens.
        size: (B, N, 1) how many original tokens each token stands for.
        matching: the output of :func:`bipartite_matching`.
        num_prefix: p.

    Returns:
        ``(x, size)`` with N - r tokens: prefix, A's unmerged tokens, then B's free tokens.
    """
    merged, partner, unmerged = matching
    C = x.shape[-1]
    p = num_prefix
    in_a, in_b = (p + 1) // 2, p // 2
    # Carry the size as one more channel so one gather/scatter moves both.
    weighted = torch.cat([x * size, size], dim=-1)
    a, b = weighted[:, 0::2][:, in_a:], weighted[:, 1::2][:, in_b:]
    keep = a.gather(1, unmerged.unsqueeze(-1).expand(-1, -1, C + 1))
    src = a.gather(1, merged.unsqueeze(-1).expand(-1, -1, C + 1))
    b = b.scatter_add(1, partner.unsqueeze(-1).expand(-1, -1, C + 1), src)
    out = torch.cat([weighted[:, :p], keep, b], dim=1)
    new_size = out[..., C:]
    return out[..., :C] / new_size, new_size


@register
class Tome(Method):
    name = "tome"
    title = "ToMe"
    merges = True

    def schedule(self, g, r, layer):
        return schedule(r, g.num_blocks)

    def cap(self, requested, g):
        return cap(requested, g.num_tokens, g.num_prefix)

    def reduce(self, block, x, q, k, v, size, plan):
        mask = None if size is None else size.log().to(q.dtype).transpose(1, 2).unsqueeze(1)
        n_in = x.shape[1]
        x = residual(block, x, fused(block.attn, q, k, v, mask))
        if plan.r > 0:
            if size is None:
                size = x.new_ones(x.shape[0], n_in, 1)
            matching = bipartite_matching(k.mean(dim=1), plan.r, plan.num_prefix, plan.class_token)
            x, size = merge(x, size, matching, plan.num_prefix)
        return x, size

    def estimator_setting(self, g, removed, layer):
        return {"r": spread(removed, g.num_patches, g.num_blocks, halving=True)}

    def fewest_tokens(self, g):
        patches = g.num_patches
        for _ in range(g.num_blocks):
            patches -= patches // 2
        return g.num_prefix + patches
