"""POMT ("Pruning One More Token is Enough"): one-shot pruning in a single block.

Pure tensor functions, then :class:`Pomt`, the method's declaration: its setting (r
tokens pruned once, in block ``layer``) and the reduction it inserts into that block.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pomt_cli.errors import PruningError
from pomt_cli.pruning.attention import residual, tracing
from pomt_cli.pruning.registry import Method, register

#: Elements of the log-probability matrix computed at once by :func:`received_attention`
#: (2**23: 16 MiB in float16, 32 MiB in float32, so one chunk stays in a large GPU's L2).
CHUNK_ELEMENTS = 1 << 23

#: For each (device type, dtype): the index into :func:`_lse_kernels` of the fused kernel
#: that returned a correct log-sum-exp, or None when none did (the explicit fallback).
_LSE_KERNEL: dict[tuple[str, torch.dtype], int | None] = {}

#: For each (device type, dtype) where the Triton kernel of received attention was tried:
#: "triton" when its first call agreed with an explicit computation, otherwise why it is
#: not used (the chunked product of :func:`received_attention` is used instead).
RECEIVED_KERNEL: dict[tuple[str, torch.dtype], str] = {}

#: For each (device type, dtype) where the Triton kernel of the reduction
#: (:mod:`triton_prune`) was tried: "triton" when its first call agreed with
#: :func:`prune_keep_mean`'s tensor operations, otherwise why it is not used.
PRUNE_KERNEL: dict[tuple[str, torch.dtype], str] = {}

_HALF = (torch.float16, torch.bfloat16)


def importance(attn: torch.Tensor, v: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Importance of each non-prefix token: attention received + value magnitude.

    Each image is normalised by itself, so a token's score never depends on the other
    images of the batch.

    Args:
        attn: (B, H, N, N) softmax attention, queries on dim -2, keys on dim -1.
        v: (B, H, N, D) values.
        num_prefix: p, prefix tokens at the front.

    Returns:
        (B, N - p) float32 scores, higher is more important.
    """
    p = num_prefix
    # Attention received: max over heads, non-prefix queries and keys, sum over queries.
    received = attn.amax(dim=1)[:, p:, p:].sum(dim=1, dtype=torch.float32)
    received = received / received.amax(dim=-1, keepdim=True)
    # Value magnitude: max over heads, sum over features, softmax over all N tokens.
    magnitude = v.amax(dim=1).float().sum(dim=-1).softmax(dim=-1)[:, p:]
    return received + magnitude


def _lse_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> list:
    """PyTorch's fused attention kernels that also return each query's log-sum-exp, best first."""
    aten = torch.ops.aten
    if q.device.type == "cpu":
        return [lambda: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)]
    if q.device.type != "cuda":
        return []
    kernels = []
    if q.dtype in (torch.float16, torch.bfloat16):
        kernels += [
            lambda: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)[:2],
            lambda: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2],
        ]
    kernels.append(lambda: aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False,
                                                                         scale=scale)[:2])
    return kernels


def _as_lse(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The kernel's log-sum-exp as (B, H, N) float32 (kernels pad or add a trailing dimension)."""
    B, H, N, _ = q.shape
    if lse.dim() == 4 and lse.shape[-1] == 1:
        lse = lse[..., 0]
    if lse.dim() == 3 and lse.shape[:2] == (B, H) and lse.shape[-1] >= N:
        lse = lse[..., :N]
    if lse.shape != (B, H, N):
        raise RuntimeError(f"log-sum-exp of shape {tuple(lse.shape)} for queries of shape {tuple(q.shape)}")
    return lse.float()


def _explicit_lse(q: torch.Tensor, k: torch.Tensor, scale: float, rows: slice = slice(None)) -> torch.Tensor:
    return ((q[:, :, rows] * scale) @ k.transpose(-2, -1)).float().logsumexp(dim=-1)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and the log-sum-exp of every query's logits, without an N x N matrix where possible.

    Uses PyTorch's fused attention kernels that return the log-sum-exp (cuDNN, flash or
    memory-efficient attention on CUDA, flash attention on the CPU). The first kernel
    whose log-sum-exp agrees with an explicit computation on the first call is kept for
    the device and dtype. Elsewhere (other devices, and under :func:`tracing`) the
    logits are computed explicitly.

    Args:
        q, k, v: (B, H, N, D).
        scale: the logit scale.

    Returns:
        ``(out, lse)``: (B, H, N, D) in the input dtype, and (B, H, N) float32 with
        ``lse[b, h, i] = log(sum_j exp(scale * q_i . k_j))``.
    """
    key = (q.device.type, q.dtype)
    if not tracing() and _LSE_KERNEL.get(key, 0) is not None:
        kernels = _lse_kernels(q, k, v, scale)
        chosen = _LSE_KERNEL.get(key)
        if chosen is not None:
            out, lse = kernels[chosen]()
            return out, _as_lse(lse, q)
        capturing = q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        for i, kernel in enumerate([] if capturing else kernels):  # the check below cannot run in a capture
            try:
                out, lse = kernel()
                lse = _as_lse(lse, q)
                # The first call checks the kernel's convention on one image's first query.
                expected = _explicit_lse(q[:1], k[:1], scale, slice(0, 1))[..., 0]
                if torch.allclose(lse[:1, :, 0], expected, rtol=1e-3, atol=1e-2):
                    _LSE_KERNEL[key] = i
                    return out, lse
            except (RuntimeError, AttributeError, TypeError):
                continue
        if not capturing:
            _LSE_KERNEL[key] = None
    return F.scaled_dot_product_attention(q, k, v, scale=scale), _explicit_lse(q, k, scale)


def _interpreted(t: torch.Tensor) -> bool:
    """Whether ``t`` is on the host with Triton's interpreter on (``TRITON_INTERPRET=1``)."""
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernel_runs_here(q: torch.Tensor) -> bool:
    """Whether the Triton kernel may run on ``q``: float16/bfloat16 on CUDA (or on the host under
    Triton's interpreter, ``TRITON_INTERPRET=1``), outside traced and compiled graphs."""
    if q.dtype not in _HALF or tracing():
        return False
    return q.device.type == "cuda" or _interpreted(q)


def _checked_kernel(states: dict[tuple[str, torch.dtype], str], key: tuple[str, torch.dtype],
                    module: str, run: Callable, check: Callable[[torch.Tensor], str | None]) -> torch.Tensor | None:
    """One of POMT's optional Triton kernels: its result, or None where it is missing, off or wrong.

    ``states[key]`` records the outcome for a device type and dtype: ``"triton"`` once the
    kernel's first result passed ``check`` (which returns None, or why it is wrong), else
    ``"off: WHY"``: a missing or too old Triton, a kernel that fails to compile or a wrong
    result turns the kernel off for that device and dtype. During a CUDA-graph capture an
    unchecked kernel is not tried (its check cannot run there).

    Args:
        states: :data:`RECEIVED_KERNEL` or :data:`PRUNE_KERNEL`.
        key: (device type, dtype).
        module: the kernel's module, imported here only (it imports Triton).
        run: called with the module, returns the kernel's result.
        check: called with the first result.
    """
    state = states.get(key)
    if state is not None and state != "triton":
        return None
    if state is None and key[0] == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    try:
        result = run(importlib.import_module(module))
    except Exception as exc:  # noqa: BLE001 - an optional accelerator: any failure means "use the operations"
        if state == "triton":
            raise
        message = str(exc).strip()
        states[key] = f"off: {type(exc).__name__}: {message.splitlines()[0][:160] if message else ''}"
        return None
    if state is None:
        why = check(result)
        if why is not None:
            states[key] = f"off: {why}"
            return None
        states[key] = "triton"
    return result


def _received_by_kernel(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float,
                        num_prefix: int) -> torch.Tensor | None:
    """:func:`received_attention` by the Triton kernel, or None where it is missing or wrong.

    The first call for a device and dtype checks the kernel against the explicit softmax
    of one image in float64 (within 1e-3 relative) and records the outcome in
    :data:`RECEIVED_KERNEL` (:func:`_checked_kernel`).
    """

    def check(received: torch.Tensor) -> str | None:
        # In float64, so that a float32 product in TF32 (torch.set_float32_matmul_precision)
        # cannot fail a correct kernel.
        p = num_prefix
        probabilities = ((q[:1].double() * scale) @ k[:1].double().transpose(-2, -1)).softmax(dim=-1)
        expected = probabilities.amax(dim=1)[:, p:, p:].sum(dim=1)
        error = float(((received[:1].double() - expected).abs() / expected.abs().clamp_min(1e-12)).max())
        return None if error <= 1e-3 else f"its first result was {error:.1e} away from the explicit softmax"

    return _checked_kernel(RECEIVED_KERNEL, (q.device.type, q.dtype), "pomt_cli.pruning.triton_received",
                           lambda kernel: kernel.received_attention(q, k, lse, scale, num_prefix), check)


def received_path(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """How POMT's lean block computed the attention received on ``device`` in ``dtype``, in this process.

    Returns:
        ``"triton kernel"``, ``"chunked product (Triton kernel off: WHY)"``, or None where
        the kernel was not tried (float32, a device without it, or no lean block ran).
    """
    state = RECEIVED_KERNEL.get((torch.device(device).type, dtype))
    if state is None:
        return None
    return "triton kernel" if state == "triton" else f"chunked product (Triton kernel {state})"


def received_attention(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, num_prefix: int, *, kernel: bool = True,
    product_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Attention received by each non-prefix token: max over heads, summed over non-prefix queries.

    In float16 and bfloat16 on CUDA, one Triton kernel computes it (:mod:`triton_received`)
    where Triton is installed and the kernel passed its first-call check
    (:func:`_received_by_kernel`); ``kernel=False`` forces the matrix product below.

    Otherwise it is equal to ``softmax(scale * q @ k^T).amax(dim=1)[:, p:, p:].sum(dim=1)``,
    computed without the softmax: the maximum over heads of a probability is the
    exponential of the maximum of its logarithm, ``scale * q_i . k_j - lse[h, i]``, which
    one matrix product gives when ``-lse`` rides along as extra columns of the queries
    (split in a high and a low part, so that it keeps float32 precision in float16). Only
    the non-prefix rows and columns are computed (padded to a multiple of 8 for aligned
    tensor-core products), a chunk of images at a time (at most :data:`CHUNK_ELEMENTS`).

    The product's output holds log-probabilities near ``-log N``, where float16 keeps about
    3 significant digits and bfloat16 2. On the CPU, where a half-precision product is not
    faster, it is computed in float32 (scores within 1e-5 of the exact ones of the same
    q, k); on CUDA in the input dtype (within 1e-3 in float16, see the tests).

    Args:
        q, k: (B, H, N, D) queries and keys.
        lse: (B, H, N) float32 log-sum-exp of each query's logits (:func:`attention_lse`).
        scale: the logit scale.
        num_prefix: p.
        kernel: whether the Triton kernel may be used.
        product_dtype: the dtype of the product (default: float32 on the CPU, else q's).

    Returns:
        (B, N - p) float32.
    """
    if kernel and _kernel_runs_here(q):
        received = _received_by_kernel(q, k, lse, scale, num_prefix)
        if received is not None:
            return received
    B, H, N, D = q.shape
    p = num_prefix
    M = N - p
    rows = -(-M // 8) * 8
    width = -(-(D + 2) // 8) * 8
    if product_dtype is None:
        product_dtype = torch.float32 if q.device.type == "cpu" else q.dtype
    neg = -lse[:, :, p:]
    hi = neg.to(product_dtype)
    queries = q.new_zeros(B, H, rows, width, dtype=product_dtype)
    torch.mul(q[:, :, p:], scale, out=queries[:, :, :M, :D])
    queries[:, :, :M, D] = hi
    queries[:, :, :M, D + 1] = (neg - hi.float()).to(product_dtype)
    keys = k.new_zeros(B, H, rows, width, dtype=product_dtype)
    keys[:, :, :M, :D] = k[:, :, p:]
    keys[:, :, :M, D:D + 2] = 1
    keys = keys.transpose(-2, -1)
    step = max(1, CHUNK_ELEMENTS // (H * rows * rows))

    def chunk(b0: int, b1: int) -> torch.Tensor:
        logp = (queries[b0:b1] @ keys[b0:b1]).amax(dim=1)[:, :M, :M]
        return logp.float().exp().sum(dim=1)

    if step >= B:
        return chunk(0, B)
    return torch.cat([chunk(b, min(B, b + step)) for b in range(0, B, step)])


def importance_lean(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor, scale: float, num_prefix: int,
    *, kernel: bool = True
) -> torch.Tensor:
    """:func:`importance` from queries, keys and values, without the attention matrix.

    Args:
        q, k, v: (B, H, N, D).
        lse: (B, H, N) float32 log-sum-exp of each query's logits (:func:`attention_lse`).
        scale: the logit scale.
        num_prefix: p.
        kernel: whether :func:`received_attention` may use the Triton kernel.

    Returns:
        (B, N - p) float32 scores, equal to ``importance(softmax(scale * q @ k^T), v, p)``.
    """
    received = received_attention(q, k, lse, scale, num_prefix, kernel=kernel)
    received = received / received.amax(dim=-1, keepdim=True)
    magnitude = v.amax(dim=1).float().sum(dim=-1).softmax(dim=-1)[:, num_prefix:]
    return received + magnitude


def _prune_kernel_runs_here(x: torch.Tensor, scores: torch.Tensor) -> bool:
    """Whether the Triton kernel of the reduction may run: CUDA (or the interpreter), outside traced
    and compiled graphs, and without gradients (the kernel has no backward)."""
    if not (x.is_cuda or _interpreted(x)):  # first, and cheap: the CPU's path pays for this line only
        return False
    if x.dtype not in (*_HALF, torch.float32) or tracing():
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or scores.requires_grad))


def _pruned_by_kernel(x: torch.Tensor, scores: torch.Tensor, r: int, num_prefix: int) -> torch.Tensor | None:
    """:func:`prune_keep_mean` by the Triton kernel, or None where it is missing or wrong.

    The first call for a device and dtype checks the kernel against the tensor operations:
    the same tokens in the same order, and a mean within 4 units of the dtype's precision
    of the largest token value; the outcome is recorded in :data:`PRUNE_KERNEL`
    (:func:`_checked_kernel`). Tokens that are not all finite leave the check, and the
    kernel, to a later call (NaN never equals itself).
    """
    key = (x.device.type, x.dtype)
    if key not in PRUNE_KERNEL and not bool(torch.isfinite(x).all()):
        return None

    def check(out: torch.Tensor) -> str | None:
        expected = _keep_mean_by_operations(x, scores, r, num_prefix)
        if not torch.equal(out[:, :-1], expected[:, :-1]):
            return "its first result kept other tokens than the tensor operations"
        error = float((out[:, -1].float() - expected[:, -1].float()).abs().max())
        bound = 4 * torch.finfo(x.dtype).eps * float(x.abs().amax().float().clamp_min(1e-30))
        return None if error <= bound else f"its first mean was {error:.1e} away from the tensor operations'"

    return _checked_kernel(PRUNE_KERNEL, key, "pomt_cli.pruning.triton_prune",
                           lambda kernel: kernel.keep_mean(x, scores, r, num_prefix), check)


def prune_path(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """How POMT's reduction ran on ``device`` in ``dtype``, in this process.

    Returns:
        ``"triton kernel"``, ``"tensor operations (Triton kernel off: WHY)"``, or None
        where the kernel was not tried (the CPU, or no POMT block ran).
    """
    state = PRUNE_KERNEL.get((torch.device(device).type, dtype))
    if state is None:
        return None
    return "triton kernel" if state == "triton" else f"tensor operations (Triton kernel {state})"


def _keep_mean_by_operations(x: torch.Tensor, scores: torch.Tensor, r: int, num_prefix: int) -> torch.Tensor:
    B, N, C = x.shape
    p = num_prefix
    keep = N - r - p - 1
    if torch.onnx.is_in_onnx_export():
        # ONNX has no stable sort (an export fails on aten.sort.stable, even with stable=False);
        # its TopK, which an exported sort becomes, breaks ties by the lower index: the same rule.
        order = scores.argsort(dim=-1, descending=True)
    else:
        order = scores.argsort(dim=-1, descending=True, stable=True)
    kept_idx = order[:, :keep].sort(dim=-1).values + p
    dropped_idx = order[:, keep:] + p
    prefix_idx = torch.arange(p, device=x.device).expand(B, p)
    index = torch.cat([prefix_idx, kept_idx], dim=1)
    kept = x.gather(1, index.unsqueeze(-1).expand(-1, -1, C))
    dropped = x.gather(1, dropped_idx.unsqueeze(-1).expand(-1, -1, C)).mean(dim=1, keepdim=True)
    return torch.cat([kept, dropped], dim=1)


def prune_keep_mean(
    x: torch.Tensor, scores: torch.Tensor, r: int, num_prefix: int, *, kernel: bool = True
) -> torch.Tensor:
    """Keep the prefix and the N - r - p - 1 best tokens, append the mean of the others.

    Kept tokens stay in their original order. Of tokens with equal scores, the one with
    the lower index is the better (the order of a stable descending sort).

    On CUDA (float16, bfloat16, float32, without gradients), one Triton kernel does it
    (:mod:`triton_prune`) where Triton is installed and the kernel passed its first-call
    check (:func:`_pruned_by_kernel`); elsewhere, and with ``kernel=False``, tensor
    operations: two sorts, two gathers, a mean and a concatenation.

    Args:
        x: (B, N, C) tokens.
        scores: (B, N - p) importance of the non-prefix tokens.
        r: tokens to remove, 0 <= r <= N - p - 1.
        num_prefix: p.
        kernel: whether the Triton kernel may be used.

    Returns:
        (B, N - r, C): prefix tokens, kept tokens, then the mean of the r + 1 discarded ones.
    """
    if kernel and _prune_kernel_runs_here(x, scores):
        out = _pruned_by_kernel(x, scores, r, num_prefix)
        if out is not None:
            return out
    return _keep_mean_by_operations(x, scores, r, num_prefix)


@register
class Pomt(Method):
    name = "pomt"
    title = "POMT"
    takes_layer = True
    bench_r = None

    def schedule(self, g, r, layer):
        if not isinstance(r, int):
            raise PruningError(f"POMT prunes once: r must be an int, got {r!r}")
        if r < 0:
            raise PruningError(f"r={r} is negative: give r >= 0")
        depth = g.num_blocks
        if not 0 <= layer < depth:
            raise PruningError(f"layer={layer} is out of range: {g.name} has {depth} blocks (layer 0..{depth - 1})")
        return [r if i == layer else 0 for i in range(depth)]

    def reduce(self, block, x, q, k, v, size, plan):
        attn, p = block.attn, plan.num_prefix
        lean = plan.scoring in ("kernel", "lean") or (plan.scoring == "auto" and q.dtype in _HALF)
        if not lean or (attn.training and attn.attn_drop.p > 0) or tracing():
            a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = residual(block, x, attn.attn_drop(a) @ v)
            scores = importance(a, v, p)
        else:
            o, lse = attention_lse(q, k, v, attn.scale)
            x = residual(block, x, o)
            scores = importance_lean(q, k, v, lse, attn.scale, p, kernel=plan.scoring != "lean")
        return prune_keep_mean(x, scores, plan.r, p, kernel=plan.prune_kernel), size

    def estimator_setting(self, g, removed, layer):
        return {"r": removed, "layer": layer}
