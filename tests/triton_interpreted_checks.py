"""Checks of POMT's Triton kernels (received attention, the reduction), run by Triton's interpreter.

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

from pomt_cli.pruning import apply, pomt, triton_prune, triton_received

assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1 (test_pomt_kernel.py does)"


@pytest.fixture(autouse=True)
def no_recorded_check(monkeypatch):
    monkeypatch.setattr(pomt, "RECEIVED_KERNEL", {})
    monkeypatch.setattr(pomt, "PRUNE_KERNEL", {})


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
        assert pomt.PRUNE_KERNEL == {("cpu", torch.float16): "triton"}
        assert torch.equal(pomt_model(name, "kernel")(x), by_kernel)  # what auto takes in float16
        by_product = pomt_model(name, "lean")(x)
        explicit = pomt_model(name, "explicit")(x)
    torch.testing.assert_close(by_kernel, by_product, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(by_kernel, explicit, rtol=1e-2, atol=1e-2)


def keep_mean_written_out(x, scores, r, p):
    """The reduction one image and one token at a time: a stable descending order of the scores
    (equal scores: the lower index first), the best N - r - p - 1 in position order, the mean of the rest."""
    B, N, C = x.shape
    keep = N - r - p - 1
    out = []
    for b in range(B):
        order = sorted(range(N - p), key=lambda i: (-float(scores[b, i]), i))
        kept, gone = sorted(order[:keep]), order[keep:]
        rows = [x[b, t] for t in range(p)] + [x[b, p + i] for i in kept]
        rows.append(torch.stack([x[b, p + i].double() for i in gone]).mean(dim=0).to(x.dtype))
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("N", "C", "p", "r"), [(82, 40, 1, 20), (83, 100, 2, 0), (70, 64, 5, 64), (197, 72, 1, 56)])
def test_the_reduction_kernel_keeps_the_best_tokens_in_order_and_averages_the_rest(dtype, N, C, p, r):
    # 82 and 83 tokens: two blocks of 64 and a partial one; 100 channels: a partial block of
    # channels; r = N - p - 1 keeps none; ties between equal scores go to the lower index.
    g = torch.Generator().manual_seed(N + r)
    x = torch.randn(3, N, C, generator=g).to(dtype)
    scores = torch.randn(3, N - p, generator=g)
    scores[:, 10:30] = 0.25
    scores[1] = 0.0  # one image of equal scores throughout
    got = triton_prune.keep_mean(x, scores, r, p)
    expected = keep_mean_written_out(x, scores, r, p)
    assert got.dtype == dtype and got.shape == (3, N - r, C)
    assert torch.equal(got[:, :-1], expected[:, :-1])
    torch.testing.assert_close(got[:, -1], expected[:, -1], rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
    assert torch.equal(got, pomt.prune_keep_mean(x, scores, r, p))  # the dispatch takes the kernel here
    assert pomt.PRUNE_KERNEL == {("cpu", dtype): "triton"}
    by_operations = pomt.prune_keep_mean(x, scores, r, p, kernel=False)
    assert torch.equal(got[:, :-1], by_operations[:, :-1])


def test_the_reduction_kernel_reads_any_strides_and_writes_exactly_keep_tokens_for_nan_scores():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(70, 2, 48, generator=g).half().transpose(0, 1)  # (2, 70, 48), tokens 96 elements apart
    scores = torch.randn(70, 2, generator=g).t()[:, 1:]  # (2, 69) with a stride of 2 between tokens
    scores[0, 5] = scores[1, 7] = float("nan")
    got = triton_prune.keep_mean(x, scores, 30, 1)
    nan_as_inf = torch.nan_to_num(scores, nan=float("inf"))
    assert torch.equal(got[:, :-1], keep_mean_written_out(x, nan_as_inf, 30, 1)[:, :-1])
    rows = {tuple(row.tolist()) for row in x.reshape(-1, 48)}
    assert all(tuple(row.tolist()) in rows for row in got[:, :-1].reshape(-1, 48))  # every kept row is a token


@pytest.mark.parametrize("r", [-1, 69])
def test_the_reduction_kernel_refuses_an_r_out_of_range(r):
    with pytest.raises(ValueError, match=f"r={r} is out of range for 70 tokens with 1 prefix tokens"):
        triton_prune.keep_mean(torch.zeros(1, 70, 8), torch.zeros(1, 69), r, 1)


def test_a_pomt_model_reduces_by_the_kernel_as_by_the_operations():
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    model = apply(tiny_vit(img_size=64), "pomt", r=20, layer=1)
    with torch.no_grad():
        by_kernel = model(x)
        assert pomt.PRUNE_KERNEL == {("cpu", torch.float32): "triton"}
        for blk in model.blocks:
            blk.pomt_plan = dataclasses.replace(blk.pomt_plan, prune_kernel=False)
        by_operations = model(x)
    torch.testing.assert_close(by_kernel, by_operations, rtol=1e-5, atol=1e-5)


def test_with_gradients_the_reduction_runs_as_operations():
    model = apply(tiny_vit(img_size=64), "pomt", r=20, layer=1)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert pomt.PRUNE_KERNEL == {}
    assert model.blocks[0].attn.qkv.weight.grad is not None
