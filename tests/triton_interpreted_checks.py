"""Checks of the Triton kernel of POMT's received attention, run by Triton's interpreter.

Not collected on its own (the name lacks ``test_``): ``test_pomt_kernel.py`` runs this file
with pytest in a child process under ``TRITON_INTERPRET=1``, which must be set before
Triton is first imported, so that the kernel's program instances run one by one on CPU
tensors. On a GPU the same kernel is compiled; here its indexing, masking and arithmetic
are checked.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from conftest import tiny_vit
from test_pomt_scores import FAMILIES, block_qkv, exact_scores

from pomt_cli.pruning import apply, pomt, triton_received

assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1 (test_pomt_kernel.py does)"


@pytest.fixture(autouse=True)
def no_recorded_check(monkeypatch):
    monkeypatch.setattr(pomt, "RECEIVED_KERNEL", {})


def exact_received(q, k, scale, p):
    probabilities = ((q.double() * scale) @ k.double().transpose(-2, -1)).softmax(dim=-1)
    return probabilities.amax(dim=1)[:, p:, p:].sum(dim=1)


def exact_lse(q, k, scale):
    return ((q.double() * scale) @ k.double().transpose(-2, -1)).logsumexp(dim=-1).float()


# float16 only: Triton's interpreter (3.8) misreads bfloat16 products (errors of 1e10 in a
# plain 16 x 16 tl.dot), so bfloat16 rests on the block's first-call check on the GPU.
@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_kernel_gives_the_received_attention_of_the_softmax_matrix(name):
    # 72-pixel images, patch 8: 81 patch tokens, so two blocks of queries and of keys, the second partial.
    q, k, _, scale, p = block_qkv(name, img_size=72, batch=3)
    q, k = q.half(), k.half()
    got = triton_received.received_attention(q, k, exact_lse(q, k, scale), scale, p)
    expected = exact_received(q, k, scale, p)
    assert got.dtype == torch.float32 and got.shape == (3, 81)
    assert ((got.double() - expected).abs() / expected).max() < 1e-4  # float32 sums of exact products


@pytest.mark.parametrize("width", [16, 32])
def test_narrower_blocks_of_keys_give_the_same_result(width):
    q, k, _, scale, p = block_qkv("deit_distilled", img_size=72, batch=2)  # 81 keys: 6 or 3 blocks, the last partial
    q, k = q.half(), k.half()
    lse = exact_lse(q, k, scale)
    wide = triton_received.received_attention(q, k, lse, scale, p, keys_per_program=64)
    narrow = triton_received.received_attention(q, k, lse, scale, p, keys_per_program=width)
    torch.testing.assert_close(narrow, wide, rtol=1e-6, atol=0)


def test_the_kernel_masks_a_head_size_that_is_not_a_power_of_two_and_reads_any_strides():
    g = torch.Generator().manual_seed(1)
    qk = torch.randn(2, 70, 2, 3, 24, generator=g).half().permute(2, 0, 3, 1, 4)  # (2, B, H, N, D) views
    q, k = qk.unbind(0)
    scale = 24**-0.5
    lse = exact_lse(q, k, scale)
    got = triton_received.received_attention(q, k, lse.transpose(1, 2).contiguous().transpose(1, 2), scale, 1)
    expected = exact_received(q, k, scale, 1)
    assert ((got.double() - expected).abs() / expected).max() < 1e-4


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_lean_scores_by_the_kernel_stay_within_1e3_of_the_exact_ones_in_float16(name):
    q, k, v, scale, p = block_qkv(name, img_size=64)
    half = [t.half() for t in (q, k, v)]
    _, lse = pomt.attention_lse(*half, scale)
    scores = pomt.importance_lean(*half, lse, scale, p).double()
    assert pomt.RECEIVED_KERNEL == {("cpu", torch.float16): "triton"}
    exact_of_half = exact_scores(*half, scale, p)
    assert ((scores - exact_of_half).abs() / exact_of_half).max() < 1e-3
    by_product = pomt.importance_lean(*half, lse, scale, p, kernel=False).double()
    assert not torch.equal(scores, by_product)  # the product path really is another computation


def pomt_model(name: str, scoring: str):
    arch, overrides = FAMILIES[name]
    model = apply(tiny_vit(arch, img_size=64, **overrides), "pomt", r=20, layer=1).half()
    for blk in model.blocks:
        blk.pomt_plan = dataclasses.replace(blk.pomt_plan, scoring=scoring)
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_default_block_in_float16_uses_the_kernel_and_matches_the_other_two(name):
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5)).half()
    with torch.no_grad():
        by_kernel = pomt_model(name, "auto")(x)
        assert pomt.RECEIVED_KERNEL == {("cpu", torch.float16): "triton"}
        assert torch.equal(pomt_model(name, "kernel")(x), by_kernel)  # what auto takes in float16
        by_product = pomt_model(name, "lean")(x)
        explicit = pomt_model(name, "explicit")(x)
    torch.testing.assert_close(by_kernel, by_product, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(by_kernel, explicit, rtol=1e-2, atol=1e-2)
