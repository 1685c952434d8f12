"""POMT's lean scoring (fused attention + log-probabilities) against the explicit softmax matrix."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import needs, tiny_vit

from pomt_cli import versions
from pomt_cli.pruning import apply, pomt
from pomt_cli.pruning.patch import _qkv

FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", {"init_values": 0.5}),
}


def block_qkv(name: str, layer: int = 1, batch: int = 5, dtype=torch.float32, img_size: int = 32):
    """q, k, v, scale and p of block ``layer`` of a tiny model of family ``name`` on random images."""
    arch, overrides = FAMILIES[name]
    model = tiny_vit(arch, img_size=img_size, **overrides).to(dtype)
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk in model.blocks[:layer]:
            t = blk(t)
        attn = model.blocks[layer].attn
        q, k, v = _qkv(attn, model.blocks[layer].norm1(t))
    return q, k, v, attn.scale, model.num_prefix_tokens


def exact_scores(q, k, v, scale, p):
    """The paper's scores from the full softmax matrix computed in float64 (float32 result)."""
    q, k, v = q.double(), k.double(), v.double()
    return pomt.importance(((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1), v, p)


def lean_scores(q, k, v, scale, p):
    _, lse = pomt.attention_lse(q, k, v, scale)
    return pomt.importance_lean(q, k, v, lse, scale, p)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_lean_scores_order_tokens_exactly_as_the_softmax_matrix_in_float32(name):
    q, k, v, scale, p = block_qkv(name, img_size=64)  # 64 patch tokens
    exact = exact_scores(q, k, v, scale, p)
    lean = lean_scores(q, k, v, scale, p)
    assert lean.dtype == torch.float32 and lean.shape == exact.shape
    torch.testing.assert_close(lean, exact, rtol=1e-5, atol=0)
    assert torch.equal(lean.argsort(dim=-1, stable=True), exact.argsort(dim=-1, stable=True))


@needs(versions.CPU_FLOAT16)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_lean_scores_stay_within_1e3_of_the_exact_ones_in_float16(name):
    """CUDA's product in float16 (forced here on the CPU): within 1e-3 of the exact scores."""
    q, k, v, scale, p = block_qkv(name, img_size=64)
    exact = exact_scores(q, k, v, scale, p)
    half = [t.half() for t in (q, k, v)]
    _, lse = pomt.attention_lse(*half, scale)
    lean = pomt.received_attention(*half[:2], lse, scale, p, product_dtype=torch.float16)
    lean = (lean / lean.amax(dim=-1, keepdim=True) + half[2].amax(dim=1).float().sum(-1).softmax(-1)[:, p:]).double()
    exact_of_half = exact_scores(*half, scale, p)
    assert ((lean - exact_of_half).abs() / exact_of_half).max() < 1e-3
    assert ((lean - exact).abs() / exact).max() < 2e-3  # the rest is float16 rounding of q, k, v


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.float16, marks=needs(versions.CPU_FLOAT16)), torch.bfloat16])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_on_the_cpu_half_precision_lean_scores_are_as_exact_as_the_inputs_allow(name, dtype):
    """The CPU's product runs in float32: a half-precision output would round log-probabilities
    near -log N to 2 (bfloat16) or 3 (float16) digits and reorder close tokens."""
    q, k, v, scale, p = block_qkv(name, img_size=64)
    half = [t.to(dtype) for t in (q, k, v)]
    lean = lean_scores(*half, scale, p).double()
    exact_of_half = exact_scores(*half, scale, p)
    assert ((lean - exact_of_half).abs() / exact_of_half).max() < 2e-5


def test_the_explicit_fallback_and_the_chunks_give_the_same_scores(monkeypatch):
    q, k, v, scale, p = block_qkv("deit_distilled", batch=7, img_size=64)
    expected = lean_scores(q, k, v, scale, p)
    out_fused, _ = pomt.attention_lse(q, k, v, scale)
    monkeypatch.setattr(pomt, "_lse_kernels", lambda *args: [])  # no fused kernel on this "device"
    monkeypatch.setattr(pomt, "_LSE_KERNEL", {})
    monkeypatch.setattr(pomt, "CHUNK_ELEMENTS", 3 * 64 * 64 * 3)  # three images per chunk
    out, lse = pomt.attention_lse(q, k, v, scale)
    assert pomt._LSE_KERNEL == {("cpu", torch.float32): None}
    torch.testing.assert_close(lse, ((q * scale) @ k.transpose(-2, -1)).logsumexp(-1))
    torch.testing.assert_close(out, out_fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pomt.importance_lean(q, k, v, lse, scale, p), expected, rtol=1e-5, atol=0)


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"),
                    reason=f"torch {torch.__version__} has no fused attention on the CPU that returns the log-sum-exp")
def test_a_kernel_with_a_wrong_log_sum_exp_is_not_used(monkeypatch):
    q, k, v, scale, p = block_qkv("vit")
    good = pomt._lse_kernels(q, k, v, scale)[0]
    wrong = lambda: (good()[0], good()[1] / 0.6931)  # a base-2 logarithm  # noqa: E731
    monkeypatch.setattr(pomt, "_lse_kernels", lambda *args: [wrong, good])
    monkeypatch.setattr(pomt, "_LSE_KERNEL", {})
    pomt.attention_lse(q, k, v, scale)
    assert pomt._LSE_KERNEL == {("cpu", torch.float32): 1}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_lean_block_keeps_the_same_tokens_and_outputs_as_the_explicit_one(name):
    arch, overrides = FAMILIES[name]
    model = apply(tiny_vit(arch, img_size=64, **overrides), "pomt", r=20, layer=1)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    outputs = {}
    with torch.no_grad():
        outputs["auto"] = model(x)  # in float32: explicit
        for scoring in ("lean", "explicit"):
            for blk in model.blocks:
                blk.pomt_plan = dataclasses.replace(blk.pomt_plan, scoring=scoring)
            outputs[scoring] = model(x)
    torch.testing.assert_close(outputs["lean"], outputs["explicit"], rtol=1e-5, atol=1e-6)
    assert torch.equal(outputs["auto"], outputs["explicit"])


@needs(versions.CPU_FLOAT16)
def test_the_log_sum_exp_keeps_float32_precision_in_float16_products():
    """Large logits (log-sum-exp near 20) lose about 1% to one float16 column; high + low parts keep it."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 3, 50, 16, generator=g) * 3).half()
    k = (torch.randn(2, 3, 50, 16, generator=g) * 3).half()
    scale = 16**-0.5
    logits = (q.double() * scale) @ k.double().transpose(-2, -1)
    lse = logits.logsumexp(dim=-1)
    assert lse.mean() > 15
    exact = logits.softmax(dim=-1).amax(dim=1)[:, 1:, 1:].sum(dim=1)
    lean = pomt.received_attention(q, k, lse.float(), scale, 1, product_dtype=torch.float16).double()
    assert ((lean - exact).abs() / exact).max() < 2e-3
    assert ((lean - exact).abs() / exact).median() < 2e-4


@needs(versions.ONNX_EXPORT)
@needs(versions.COMPILE)
def test_exported_and_compiled_graphs_take_the_explicit_path_and_match_eager():
    arch, overrides = FAMILIES["deit_distilled"]
    model = apply(tiny_vit(arch, img_size=64, **overrides), "pomt", r=20, layer=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,), strict=False).module()(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x)  # fullgraph: no graph break
    torch.testing.assert_close(exported, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-6)
    assert not pomt.tracing()
