"""Token Merging (Bolya et al., ICLR 2023): bipartite soft matching and size-weighted merging.

Pure tensor functions; :mod:`pomt_cli.pruning.patch` attaches them to timm blocks, which
also add ``log(size)`` to the attention logits of every later block (proportional attention).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def schedule(r: int | Sequence[int] | tuple[int, float], num_blocks: int) -> list[int]:
    """Tokens merged in each block.

    Args:
        r: an int (the same in every block), a list with one entry per block, or a tuple
            ``(r, inflection)``: a linear schedule whose mean is ``r``, decreasing for
            inflection < 0 and increasing for inflection > 0 (ToMe's convention).
        num_blocks: depth of the model.
    """
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"ToMe r as a tuple must be (r, inflection), got {r!r}")
        mean, inflection = int(r[0]), float(r[1])
        if num_blocks == 1:
            return [mean]
        first = int(mean * (1.0 - inflection))
        last = 2 * mean - first
        step = (last - first) / (num_blocks - 1)
        return [int(first + step * i) for i in range(num_blocks)]
    if isinstance(r, int):
        return [r] * num_blocks
    values = [int(v) for v in r]
    if len(values) != num_blocks:
        raise ValueError(f"r has {len(values)} entries but the model has {num_blocks} blocks: give one per block")
    return values


def bipartite_matching(
    metric: torch.Tensor, r: int, num_prefix: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair the r most similar tokens of set A with their best partner in set B.

    Non-prefix tokens alternate into A (even positions) and B (odd positions); each A
    token's partner is its most cosine-similar B token; the r A tokens with the most
    similar partners are merged into them. Prefix tokens never take part.

    Args:
        metric: (B, N, D) similarity features (keys averaged over heads).
        r: pairs to merge, at most (N - p) // 2.
        num_prefix: p.

    Returns:
        ``(merged, partner, unmerged)``: (B, r) indices into A of the merged tokens, (B, r)
        indices into B of their partners, (B, |A| - r) indices into A of the tokens kept,
        in ascending order.
    """
    m = metric[:, num_prefix:].float()
    m = m / m.norm(dim=-1, keepdim=True)
    similarity = m[:, 0::2] @ m[:, 1::2].transpose(-2, -1)  # (B, |A|, |B|)
    best, partner = similarity.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    # Unmerged A tokens keep their original order, so the next block's alternation stays spatial.
    merged, unmerged = order[:, :r], order[:, r:].sort(dim=-1).values
    return merged, partner.gather(1, merged), unmerged


def merge(
    x: torch.Tensor,
    size: torch.Tensor,
    matching: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of each merged A token into its B partner.

    Args:
        x: (B, N, C) tokens.
        size: (B, N, 1) how many original tokens each token stands for.
        matching: the output of :func:`bipartite_matching`.
        num_prefix: p.

    Returns:
        ``(x, size)`` with N - r tokens: prefix, unmerged A tokens, then B tokens.
    """
    merged, partner, unmerged = matching
    C = x.shape[-1]
    p = num_prefix
    # Carry the size as one more channel so one gather/scatter moves both.
    weighted = torch.cat([x * size, size], dim=-1)
    prefix, rest = weighted[:, :p], weighted[:, p:]
    a, b = rest[:, 0::2], rest[:, 1::2]
    keep = a.gather(1, unmerged.unsqueeze(-1).expand(-1, -1, C + 1))
    src = a.gather(1, merged.unsqueeze(-1).expand(-1, -1, C + 1))
    b = b.scatter_add(1, partner.unsqueeze(-1).expand(-1, -1, C + 1), src)
    out = torch.cat([prefix, keep, b], dim=1)
    new_size = out[..., C:]
    return out[..., :C] / new_size, new_size
