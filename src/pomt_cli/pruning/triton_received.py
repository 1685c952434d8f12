"""POMT's received attention as one Triton kernel: no B x H x N x N tensor is ever written.

For each image and block of key tokens, the kernel walks over blocks of queries; for
each, it takes the logits of every head (one tensor-core product per head, accumulated
in float32), keeps their running maximum less the query's log-sum-exp, and adds the
exponential of that maximum, summed over the block's queries, to the keys' totals. The
maximum over heads of a probability is the exponential of the maximum over heads of its
logarithm, so this equals ``softmax(scale * q @ k^T).amax(dim=1)[:, p:, p:].sum(dim=1)``.

This module imports Triton, and refuses to import (ImportError) with a Triton older than
3; :mod:`pomt_cli.pruning.pomt` imports it only when it is about
to run the kernel (CUDA, or Triton's interpreter on the host: ``TRITON_INTERPRET=1``,
which is how the tests run it on machines without a GPU).
"""

# No ``from __future__ import annotations``: Triton reads the ``tl.constexpr`` annotations
# as objects.
import contextlib
import importlib.util

import torch
import triton
import triton.language as tl

if importlib.util.find_spec("triton.backends") is None:
    # Triton 2 (torch 2.1's) has no triton.backends: pomt.py records this and uses its product.
    raise ImportError(f"Triton {triton.__version__} is too old for the kernel: it needs Triton 3 (triton.backends)")

#: Queries per block of the kernel (a tensor-core tile; 196 patch tokens of a 224-pixel
#: ViT make four blocks of 64).
BLOCK_QUERIES = 64
#: Keys per program, largest first: the largest that still gives every multiprocessor a
#: program is taken (small batches get narrower blocks, so that more of the GPU works).
BLOCK_KEYS = (64, 32, 16)
#: Warps per program. With 8, ptxas spills no register at any width on sm_80, sm_87 and
#: sm_90 (the tests check this; with 4, sm_80 spills at width 32 and sm_90 needs 168
#: registers a thread at width 64, against 112).
NUM_WARPS = 8


def block_keys(batch: int, keys: int, processors: int) -> int:
    """Keys per program for ``batch`` images of ``keys`` scored tokens on ``processors`` SMs."""
    for width in BLOCK_KEYS:
        if batch * triton.cdiv(keys, width) >= processors:
            return width
    return BLOCK_KEYS[-1]


_PROCESSORS: dict[int, int] = {}


def processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: Triton's interpreter)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROCESSORS:
        _PROCESSORS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _PROCESSORS[index]


# Arguments that change with the token count are not specialised, so that a profile
# sweeping n compiles the kernel once per model, not once per divisibility pattern. The
# strides of q and k are (3 H D between tokens of timm's fused projection, N times that
# between images): their divisibility by 16 lets Triton vectorise the loads.
@triton.jit(do_not_specialize=["N", "stride_lb", "stride_lh", "stride_ob"])
def _received_kernel(q_ptr, k_ptr, lse_ptr, out_ptr,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_lb, stride_lh, stride_ob,
                     H, N, P, scale,
                     D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)  # an image's offset can pass 2**31 elements in a large batch
    keys = P + tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < N
    dim_ok = dims < D
    total = tl.zeros([BLOCK_J], dtype=tl.float32)
    for first in range(P, N, BLOCK_I):
        queries = first + tl.arange(0, BLOCK_I)
        query_ok = queries < N
        best = tl.full([BLOCK_I, BLOCK_J], float("-inf"), tl.float32)
        for h in range(H):
            q = tl.load(q_ptr + b * stride_qb + h * stride_qh + queries[:, None] * stride_qn + dims[None, :],
                        mask=query_ok[:, None] & dim_ok[None, :], other=0.0)
            k = tl.load(k_ptr + b * stride_kb + h * stride_kh + keys[:, None] * stride_kn + dims[None, :],
                        mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
            lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + queries, mask=query_ok, other=0.0)
            best = tl.maximum(best, tl.dot(q, tl.trans(k), out_dtype=tl.float32) * scale - lse[:, None])
        # Queries past N are masked here; keys past N only fill columns that are not stored.
        probability = tl.where(query_ok[:, None], tl.exp(best), 0.0)
        total += tl.sum(probability, axis=0)
    tl.store(out_ptr + b * stride_ob + (keys - P), total, mask=key_ok)


def received_attention(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float,
                       num_prefix: int, keys_per_program: int | None = None) -> torch.Tensor:
    """Attention received by each non-prefix token, max over heads, summed over non-prefix queries.

    Args:
        q, k: (B, H, N, D) queries and keys in float16 or bfloat16 (views such as those of
            timm's fused qkv projection are read in place).
        lse: (B, H, N) float32 log-sum-exp of each query's logits.
        scale: the logit scale.
        num_prefix: p.
        keys_per_program: 16, 32 or 64 (None: :func:`block_keys` for this GPU).

    Returns:
        (B, N - p) float32.
    """
    B, H, N, D = q.shape
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    lse = lse.float()
    lse = lse if lse.stride(-1) == 1 else lse.contiguous()
    out = torch.empty(B, N - num_prefix, dtype=torch.float32, device=q.device)
    width = keys_per_program or block_keys(B, N - num_prefix, processors(q.device))
    grid = (triton.cdiv(N - num_prefix, width), B)  # the blocks of one image run side by side
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():  # Triton launches on the current GPU
        _received_kernel[grid](q, k, lse, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                               k.stride(2), lse.stride(0), lse.stride(1), out.stride(0), H, N, num_prefix,
                               float(scale), D=D, BLOCK_I=BLOCK_QUERIES, BLOCK_J=width,
                               BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=NUM_WARPS)
    return out
