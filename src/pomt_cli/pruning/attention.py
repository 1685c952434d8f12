"""timm's attention sub-layer in pieces, for the methods that reduce tokens right after it.

A method's :meth:`~pomt_cli.pruning.registry.Method.reduce` gets the queries, keys and
values of :func:`qkv` and finishes the sub-layer with :func:`residual`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import nn


def tracing() -> bool:
    """Whether the model is being traced, exported (ONNX, torch.export) or compiled rather than run.

    Graph capture needs plain functional ops, so the lean block then takes the explicit path.
    """
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)  # torch.compiler: torch >= 2.3
    return any(getattr(compiler, name, lambda: False)() for name in ("is_compiling", "is_exporting"))


def qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys, values (B, H, N, D) as timm's Attention computes them."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def project(attn: Attention, o: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) attention output -> (B, N, C), as timm's Attention finishes."""
    B, H, N, D = o.shape
    o = o.transpose(1, 2).reshape(B, N, H * D)
    norm = getattr(attn, "norm", None)  # scale_norm; absent in early timm 1.0 releases
    return attn.proj_drop(attn.proj(o if norm is None else norm(o)))


def fused(attn: Attention, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention output (B, H, N, D) with PyTorch's fused kernel, ``mask`` added to the logits."""
    p = attn.attn_drop.p if attn.training else 0.0
    if mask is not None and tracing():
        # Exporters decompose SDPA with a mask into a layout that the following reshape
        # cannot view (torch 2.14); the same attention written out exports cleanly.
        a = ((q * attn.scale) @ k.transpose(-2, -1) + mask).softmax(dim=-1)
        return attn.attn_drop(a) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


def residual(block: nn.Module, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``x`` plus the attention output ``o`` (B, H, N, D), as timm's ``Block.forward`` adds it."""
    return x + block.drop_path1(block.ls1(project(block.attn, o)))
