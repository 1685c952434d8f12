"""POMT's reduction as one Triton kernel: keep the best tokens in their order, append the mean of the rest.

Equal to :func:`pomt_cli.pruning.pomt.prune_keep_mean` (the same tokens, in the same
order; the mean within rounding), without its sorts, index tensors, two gathers, mean
and concatenation: on an H200 at batch 64 in float16 those took about 80 us of a
2.6 ms forward pass, most of POMT's distance from its ideal (docs/gpu/).

Each program takes one image and a block of channels. It ranks the image's scores
itself: a token's rank is the number of tokens with a higher score, or an equal score
and a lower index (the order of a stable descending sort), counted over blocks of
tokens; the tokens of rank below ``keep`` are kept. A running count over the blocks of
tokens places each kept token right after the kept tokens before it; the others are
summed in float32 for the mean. A NaN score ranks as +inf, so that the ranks stay a
permutation and exactly ``keep`` tokens are written.

This module imports Triton, and refuses to import (ImportError) with a Triton older than
3; :mod:`pomt_cli.pruning.pomt` imports it only when it is about to run the kernel
(CUDA, or Triton's interpreter on the host: ``TRITON_INTERPRET=1``).
"""

# No ``from __future__ import annotations``: Triton reads the ``tl.constexpr`` annotations
# as objects.
import contextlib
import importlib.util

import torch
import triton
import triton.language as tl

if importlib.util.find_spec("triton.backends") is None:
    raise ImportError(f"Triton {triton.__version__} is too old for the kernel: it needs Triton 3 (triton.backends)")

#: Tokens per block when ranking and copying (rows of a tile).
BLOCK_TOKENS = 64
#: Channels per program (columns of a tile): 6 programs per image for deit_small's 384.
BLOCK_CHANNELS = 64
#: Warps per program.
NUM_WARPS = 4


@triton.jit
def _scores_at(scores, tokens, ok):
    """The scores of ``tokens`` (0 where not ``ok``), a NaN read as +inf."""
    s = tl.load(scores + tokens, mask=ok, other=0.0)
    return tl.where(s != s, float("inf"), s)


# Arguments that change with the token count or r are not specialised, so that a profile
# sweeping n compiles the kernel once per model.
@triton.jit(do_not_specialize=["N", "KEEP", "stride_xb", "stride_sb", "stride_ob", "inv_dropped"])
def _keep_mean_kernel(x_ptr, s_ptr, out_ptr, stride_xb, stride_xn, stride_sb, stride_ob, stride_on,
                      N, P, KEEP, C, inv_dropped,
                      BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)  # an image's offset can pass 2**31 elements in a large batch
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    x_img = x_ptr + b * stride_xb
    out_img = out_ptr + b * stride_ob
    scores = s_ptr + b * stride_sb
    for t in range(P):  # the prefix tokens, unchanged
        row = tl.load(x_img + t * stride_xn + cols, mask=col_ok)
        tl.store(out_img + t * stride_on + cols, row, mask=col_ok)
    M = N - P
    placed = tl.zeros([1], dtype=tl.int32)
    dropped = tl.zeros([BLOCK_C], dtype=tl.float32)
    for first in range(0, M, BLOCK_I):
        mine = first + tl.arange(0, BLOCK_I)
        mine_ok = mine < M
        s_mine = _scores_at(scores, mine, mine_ok)
        rank = tl.zeros([BLOCK_I], dtype=tl.int32)
        for other_first in range(0, M, BLOCK_J):
            other = other_first + tl.arange(0, BLOCK_J)
            other_ok = other < M
            s_other = _scores_at(scores, other, other_ok)
            ahead = (s_other[None, :] > s_mine[:, None]) | (
                (s_other[None, :] == s_mine[:, None]) & (other[None, :] < mine[:, None]))
            rank += tl.sum((ahead & other_ok[None, :]).to(tl.int32), axis=1)
        kept = (rank < KEEP) & mine_ok
        kept_int = kept.to(tl.int32)
        where = placed + tl.cumsum(kept_int, axis=0) - 1  # the kept tokens before, and this one
        placed += tl.sum(kept_int, axis=0)
        rows = tl.load(x_img + (P + mine)[:, None] * stride_xn + cols[None, :],
                       mask=mine_ok[:, None] & col_ok[None, :], other=0.0)
        tl.store(out_img + (P + where)[:, None] * stride_on + cols[None, :], rows,
                 mask=kept[:, None] & col_ok[None, :])
        gone = mine_ok & (rank >= KEEP)
        dropped += tl.sum(tl.where(gone[:, None], rows.to(tl.float32), 0.0), axis=0)
    mean = (dropped * inv_dropped).to(out_ptr.dtype.element_ty)
    tl.store(out_img + (P + KEEP) * stride_on + cols, mean, mask=col_ok)


def keep_mean(x: torch.Tensor, scores: torch.Tensor, r: int, num_prefix: int) -> torch.Tensor:
    """Keep the prefix and the N - r - p - 1 best tokens in their order, append the mean of the others.

    Args:
        x: (B, N, C) tokens in float16, bfloat16 or float32.
        scores: (B, N - p) importance of the non-prefix tokens (read as float32).
        r: tokens to remove, 0 <= r <= N - p - 1.
        num_prefix: p.

    Returns:
        (B, N - r, C) in x's dtype: prefix tokens, kept tokens, then the mean of the
        r + 1 discarded ones.
    """
    B, N, C = x.shape
    p = num_prefix
    if not 0 <= r <= N - p - 1:
        raise ValueError(f"r={r} is out of range for {N} tokens with {p} prefix tokens (0..{N - p - 1})")
    if scores.shape != (B, N - p):
        raise ValueError(f"scores of shape {tuple(scores.shape)} for tokens of shape {tuple(x.shape)} and p={p}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    scores = scores.float()
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    out = torch.empty(B, N - r, C, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(C, BLOCK_CHANNELS), B)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # Triton launches on the current GPU
        _keep_mean_kernel[grid](x, scores, out, x.stride(0), x.stride(1), scores.stride(0), out.stride(0),
                                out.stride(1), N, p, N - r - p - 1, C, 1.0 / (r + 1),
                                BLOCK_I=BLOCK_TOKENS, BLOCK_J=BLOCK_TOKENS, BLOCK_C=BLOCK_CHANNELS,
                                num_warps=NUM_WARPS)
    return out
