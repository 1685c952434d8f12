"""The pruning core on tiny timm models: exactness, token counts, batch invariance, definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit

from pomt_cli.pruning import (
    apply,
    capped_from,
    forward_ideal,
    forward_kept,
    geometry,
    planned_token_counts,
    remove,
    removed_per_block,
    token_counts,
)
from pomt_cli.pruning import tome
from pomt_cli.pruning.pomt import prune_keep_mean
from pomt_cli.pruning.topk import class_attention
from pomt_cli.pruning.patch import original_class

# (timm family, overrides) -> prefix tokens p: class; class + distillation; class + 4 registers.
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "dinov2": ("vit_small_patch14_dinov2", {"init_values": 0.5}),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", {"init_values": 0.5}),
}
PREFIX = {"vit": 1, "deit_distilled": 2, "dinov2": 1, "dinov2_reg4": 5}
SETTINGS = {"pomt": dict(r=5, layer=1), "tome": dict(r=3), "topk": dict(r=2)}


def family(name: str, **extra) -> torch.nn.Module:
    arch, overrides = FAMILIES[name]
    return tiny_vit(arch, **{**overrides, **extra})


def images(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", FAMILIES)
def test_geometry_counts_prefix_tokens(name):
    g = geometry(family(name))
    assert (g.num_prefix, g.num_tokens, g.num_blocks) == (PREFIX[name], PREFIX[name] + 16, 3)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method", ["none", "pomt", "tome", "topk"])
def test_r_zero_is_the_unpatched_model(name, method):
    model = family(name)
    x = images()
    with torch.no_grad():
        expected = model(x)
        apply(model, method, r=0, layer=1)
        actual = model(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    assert token_counts(model) == [PREFIX[name] + 16] * 4


@pytest.mark.parametrize("name", ["vit", "deit_distilled", "dinov2_reg4"])
def test_token_counts_follow_each_method(name):
    p = PREFIX[name]
    n = p + 16
    model = family(name)
    x = images(2)
    expected = {
        "pomt": [n, n, n - 5, n - 5],  # pruned once, in block 1
        "tome": [n, n - 3, n - 6, n - 9],
        "topk": [n, n - 2, n - 4, n - 6],
    }
    for method, setting in SETTINGS.items():
        with torch.no_grad():
            apply(model, method, **setting)
            model(x)
        assert token_counts(model) == expected[method], method
        assert planned_token_counts(model) == expected[method], method
    apply(model, "tome", r=[1, 4, 0])
    with torch.no_grad():
        model(x)
    assert token_counts(model) == [n, n - 1, n - 5, n - 5]


@pytest.mark.parametrize("name", ["vit", "deit_distilled", "dinov2_reg4"])
@pytest.mark.parametrize("method", ["pomt", "tome", "topk"])
def test_batch_invariance(name, method):
    model = apply(family(name), method, **SETTINGS[method])
    x = images(5, seed=3)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def _reference_forward(model, x, method: str, r: int, layer: int = 1) -> torch.Tensor:
    """POMT and Top-K written out from their definitions with explicit attention everywhere."""
    p = model.num_prefix_tokens
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for i, blk in enumerate(model.blocks):
        a_mod = blk.attn
        B, N, C = t.shape
        h = blk.norm1(t)
        qkv = a_mod.qkv(h).reshape(B, N, 3, a_mod.num_heads, a_mod.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(q @ k.transpose(-2, -1) / a_mod.head_dim**0.5, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        t = t + blk.ls1(a_mod.proj(out))
        rows = []
        for b in range(B):
            if method == "pomt" and i == layer:
                received = attn[b].max(dim=0).values[p:, p:].sum(dim=0)
                received = received / received.max()
                magnitude = torch.softmax(v[b].max(dim=0).values.sum(dim=-1), dim=0)[p:]
                score = received + magnitude
                ranked = torch.argsort(score, descending=True)
                keep = sorted((ranked[: N - r - p - 1] + p).tolist())
                drop = (ranked[N - r - p - 1 :] + p).tolist()
                rows.append(torch.cat([t[b, :p], t[b, keep], t[b, drop].mean(0, keepdim=True)]))
            elif method == "topk":
                score = attn[b, :, 0, p:].mean(dim=0)
                keep = sorted((torch.argsort(score, descending=True)[: N - r - p] + p).tolist())
                rows.append(torch.cat([t[b, :p], t[b, keep]]))
            else:
                rows.append(t[b])
        t = torch.stack(rows)
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.forward_head(model.norm(t))


@pytest.mark.parametrize("name", ["vit", "deit_distilled", "dinov2_reg4"])
@pytest.mark.parametrize("method,r", [("pomt", 5), ("pomt", 15 - 1), ("topk", 2)])
def test_pomt_and_topk_match_their_definitions(name, method, r):
    model = family(name)
    x = images(3, seed=7)
    if method == "pomt" and r == 14:
        r = PREFIX[name] + 16 - PREFIX[name] - 1  # the largest r: only the mean token remains
    with torch.no_grad():
        expected = _reference_forward(model, x, method, r)
        apply(model, method, r=r, layer=1)
        actual = model(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_pomt_normalises_each_image_by_itself():
    """Scaling one image's attention must not change another image's scores."""
    from pomt_cli.pruning.pomt import importance

    torch.manual_seed(0)
    attn = torch.rand(2, 3, 9, 9).softmax(-1)
    v = torch.randn(2, 3, 9, 4)
    base = importance(attn, v, 1)
    attn2 = attn.clone()
    attn2[1] = (attn2[1] * 5).softmax(-1)
    torch.testing.assert_close(importance(attn2, v, 1)[0], base[0])


def test_tome_sizes_sum_to_the_original_count_and_prefix_is_never_merged():
    model = apply(family("dinov2_reg4"), "tome", r=[4, 3, 2])
    p, n = 5, 21
    x = model.norm_pre(model._pos_embed(model.patch_embed(images(3))))
    size = None
    with torch.no_grad():
        for blk in model.blocks:
            y, size = blk.forward_tokens(x, size)
            # prefix tokens take part in attention but are never merged: size stays 1
            assert torch.equal(size[:, :p], torch.ones_like(size[:, :p]))
            assert y.shape[1] == x.shape[1] - blk.pomt_plan.r
            x = y
    torch.testing.assert_close(size.sum(dim=1).squeeze(-1), torch.full((3,), float(n)))
    assert x.shape[1] == n - 9


def test_tome_merge_is_a_size_weighted_average():
    torch.manual_seed(0)
    p, C = 1, 4
    x = torch.randn(1, 7, C)
    size = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 5.0]).view(1, 7, 1)
    # A = tokens 0 (the class token, protected), 2, 4, 6; B = tokens 1, 3, 5.
    merged = torch.tensor([[0]])  # A's first free token: token 2
    partner = torch.tensor([[1]])  # into B's second token: token 3
    unmerged = torch.tensor([[1, 2]])  # tokens 4, 6
    out, new_size = tome.merge(x, size, (merged, partner, unmerged), p)
    assert out.shape == (1, 6, C) and new_size.sum() == size.sum()
    # prefix, A's unmerged (4, 6), B (1, 3 + 2, 5)
    assert new_size.flatten().tolist() == [1.0, 1.0, 5.0, 2.0, 4.0, 1.0]
    torch.testing.assert_close(out[0, 4], (x[0, 2] * 1 + x[0, 3] * 3) / 4)
    torch.testing.assert_close(out[0, [0, 1, 2, 3, 5]], x[0, [0, 4, 6, 1, 5]])


def test_tome_merge_uses_only_ops_that_export():
    """Size-weighted sums added with scatter_add, then a division: no scatter_reduce, whose "mean" does not export to ONNX."""

    class Merge(torch.nn.Module):
        def forward(self, x, size, merged, partner, unmerged):
            return tome.merge(x, size, (merged, partner, unmerged), 1)

    x, size = torch.randn(2, 7, 4), torch.ones(2, 7, 1)
    indices = (torch.tensor([[0], [2]]), torch.tensor([[1], [0]]), torch.tensor([[1, 2], [0, 1]]))
    graph = torch.export.export(Merge(), (x, size, *indices)).graph
    ops = {str(node.target) for node in graph.nodes if node.op == "call_function"}
    assert any("scatter_add" in op for op in ops) and not any("scatter_reduce" in op for op in ops)


def test_tome_matching_pairs_the_most_similar_tokens():
    metric = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.1], [1.0, 0.1]]])
    merged, partner, unmerged = tome.bipartite_matching(metric, 1, num_prefix=1)
    # The whole sequence alternates: A = tokens 0 (class, protected), 2, 4; B = tokens 1, 3.
    # Token 2 [0,1] ~ token 3 [0,1.1] (cos 1) beats token 4 [1,0.1] ~ token 1 [1,0].
    assert merged.tolist() == [[0]] and partner.tolist() == [[1]] and unmerged.tolist() == [[1]]
    # Two prefix tokens (class + distillation): token 1 leaves B, token 4 can only go to 3.
    merged, partner, unmerged = tome.bipartite_matching(metric, 1, num_prefix=2)
    assert merged.tolist() == [[0]] and partner.tolist() == [[0]] and unmerged.tolist() == [[1]]


def test_tome_schedule_with_inflection_keeps_the_mean():
    assert tome.schedule(8, 4) == [8, 8, 8, 8]
    assert tome.schedule((8, -0.5), 5) == [12, 10, 8, 6, 4]
    assert tome.schedule((8, 0.5), 5) == [4, 6, 8, 10, 12]
    with pytest.raises(ValueError, match="one per block"):
        tome.schedule([1, 2], 3)


def test_remove_restores_the_original_model():
    model = family("deit_distilled")
    classes = (type(model), type(model.blocks[0]))
    x = images()
    with torch.no_grad():
        expected = model(x)
        for method, setting in SETTINGS.items():
            apply(model, method, **setting)
            assert not torch.allclose(model(x), expected)
        remove(model)
        actual = model(x)
    assert (type(model), type(model.blocks[0])) == classes
    assert original_class(model) is classes[0]
    assert not hasattr(model.blocks[1], "pomt_plan")
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["pomt", "tome", "topk"])
def test_bfloat16_runs_on_cpu(method):
    model = apply(family("dinov2_reg4").to(torch.bfloat16), method, **SETTINGS[method])
    with torch.no_grad():
        y = model(images(2).to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    with torch.no_grad():
        reference = remove(family("dinov2_reg4")).float()
        apply(reference, method, **SETTINGS[method])
        y32 = reference(images(2))
    assert F.cosine_similarity(y.float(), y32).min() > 0.95


def test_errors_name_the_limit():
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"r=16 is too large: vit_tiny_patch16_224 has 17 tokens \(1 prefix\), at most 15 can be pruned at block 2"):
        apply(model, "pomt", r=16, layer=2)
    with pytest.raises(ValueError, match="layer=3 is out of range: .* 3 blocks"):
        apply(model, "pomt", r=2, layer=3)
    with pytest.raises(ValueError, match="r=-1 at block 0 is negative"):
        apply(model, "tome", r=-1)
    with pytest.raises(ValueError, match=r"inflection in \(r, inflection\) must be within \[-1, 1\].*got 2$"):
        apply(model, "tome", r=(1, 2.0))  # beyond the original's range, where its schedule goes negative
    with pytest.raises(ValueError, match=r"must be within \[-1, 1\].*got -1.5"):
        apply(model, "tome", r=(4, -1.5))
    with pytest.raises(ValueError, match="r=-1 is negative"):
        apply(model, "pomt", r=-1)  # the default layer 3 is out of range here: r is checked first
    with pytest.raises(ValueError, match="unknown method 'merge'"):
        apply(model, "merge", r=1)
    with pytest.raises(ValueError, match="has 7 tokens \\(1 prefix\\) left at block 2, at most 5 can be pruned at block 2"):
        apply(model, "topk", r=[5, 5, 7])
    with pytest.raises(ValueError, match="not supported"):
        apply(torch.nn.Linear(3, 3), "pomt", r=1)
    with pytest.raises(ValueError, match="no class token"):
        apply(tiny_vit(class_token=False, global_pool="avg"), "topk", r=1)
    assert type(model).__name__ == "VisionTransformer"  # a failed apply leaves the model alone


def test_ideal_and_kept_forwards_match_the_model_at_full_count():
    model = family("deit_distilled")
    x = images(2)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(forward_ideal(model, x, [18] * 4), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(forward_kept(model, x, torch.arange(16)), expected, rtol=1e-5, atol=1e-6)
        assert forward_kept(model, x, torch.tensor([[0, 5], [3, 1]])).shape == expected.shape




# ToMe against a reference written from the original (facebookresearch/ToMe: merge.py's
# bipartite_soft_matching + merge_wavg, patch/timm.py, utils.parse_r), one image at a time.
# Models large enough for r = 8 and r = 16: 64 patch tokens, 4 blocks.
TOME_FAMILIES = {
    "deit": ("deit_tiny_patch16_224", {}),  # p = 1
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),  # p = 2
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", {"init_values": 0.5}),  # p = 5
    "no_class_token": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),  # p = 0
}


def tome_model(name: str) -> torch.nn.Module:
    arch, overrides = TOME_FAMILIES[name]
    return tiny_vit(arch, img_size=64, depth=4, **overrides)


def _parse_r(r, depth: int) -> list[int]:
    """The original's parse_r: a linear schedule from int(r (1 - inflection)) to 2 r minus that."""
    r, inflection = r if isinstance(r, tuple) else (r, 0.0)
    first = int(r * (1.0 - inflection))
    step = (2 * r - first - first) / (depth - 1)
    return [int(first + step * i) for i in range(depth)]


def _tome_reference(model, x, r) -> tuple[torch.Tensor, list[int]]:
    """ToMe on each image alone, with explicit attention; the logits and the tokens entering each block.

    The whole sequence alternates into A (even positions) and B (odd positions). Every prefix
    token is protected: an A-side one by -inf on its row (it never merges into B), a B-side
    one by -inf on its column (nothing merges into it). r is capped at (tokens - p) // 2.
    A's unmerged tokens (the protected ones rank last) are sorted by position when there is a
    class token; the result is the prefix tokens, A's other unmerged tokens, then B's others.
    """
    p = model.num_prefix_tokens
    has_class_token = model.cls_token is not None
    schedule = _parse_r(r, len(model.blocks))
    outputs = []
    for img in x:
        t = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))[0]
        size = None
        counts = []
        for blk, r_block in zip(model.blocks, schedule):
            a_mod = blk.attn
            N, C = t.shape
            counts.append(N)
            h = blk.norm1(t)
            q, k, v = a_mod.qkv(h).reshape(N, 3, a_mod.num_heads, a_mod.head_dim).permute(1, 2, 0, 3)
            logits = q @ k.transpose(-2, -1) * a_mod.scale
            if size is not None:
                logits = logits + size.log()  # proportional attention
            t = t + blk.ls1(a_mod.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(N, C)))
            r_block = min(r_block, (N - p) // 2)
            if size is None:
                size = torch.ones(N)
            if r_block > 0:
                metric = F.normalize(k.mean(0), dim=-1)
                A, B = list(range(0, N, 2)), list(range(1, N, 2))
                best, partner = [], []
                for i in A:
                    cos = [float("-inf") if i < p or j < p else float(metric[i] @ metric[j]) for j in B]
                    best.append(max(cos))
                    partner.append(B[cos.index(max(cos))])
                ranked = [A[j] for j in torch.tensor(best).argsort(descending=True).tolist()]
                merged, unmerged = ranked[:r_block], ranked[r_block:]
                if has_class_token:
                    unmerged = sorted(unmerged)
                total = {j: t[j] * size[j] for j in B}
                weight = {j: size[j] for j in B}
                for i in merged:
                    total[partner[A.index(i)]] = total[partner[A.index(i)]] + t[i] * size[i]
                    weight[partner[A.index(i)]] = weight[partner[A.index(i)]] + size[i]
                merged_t = {**{i: t[i] for i in unmerged}, **{j: total[j] / weight[j] for j in B}}
                merged_size = {**{i: size[i] for i in unmerged}, **{j: weight[j] for j in B}}
                order = list(range(p)) + [i for i in unmerged if i >= p] + [j for j in B if j >= p]
                t = torch.stack([merged_t[i] for i in order])
                size = torch.stack([merged_size[i] for i in order])
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        counts.append(t.shape[0])
        outputs.append(model.forward_head(model.norm(t[None])))
    return torch.cat(outputs), counts


@pytest.mark.parametrize("name", TOME_FAMILIES)
@pytest.mark.parametrize("r", [8, 16, (8, -1.0), (6, 0.5)])
@pytest.mark.parametrize("batch", [1, 4])
def test_tome_matches_the_original(name, r, batch):
    model = tome_model(name)
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected, counts = _tome_reference(model, x, r)
        actual = apply(model, "tome", r=r)(x)
    assert planned_token_counts(model) == counts and token_counts(model) == counts
    assert (actual - expected).norm() <= 1e-5 * expected.norm()


def test_tome_caps_r_per_block_like_the_original():
    model = tome_model("deit")  # 65 tokens, 4 blocks
    apply(model, "tome", r=16)
    assert planned_token_counts(model) == [65, 49, 33, 17, 9]
    assert removed_per_block(model) == [16, 16, 16, 8] and capped_from(model) == 3
    apply(model, "tome", r=8)
    assert capped_from(model) is None
    apply(model, "tome", r=100)  # the original takes any r and merges half of the free tokens
    assert planned_token_counts(model) == [65, 33, 17, 9, 5] and capped_from(model) == 0


def test_tome_schedule_is_the_originals_parse_r():
    for r in [0, 1, 7, 8, 13, 16]:
        for inflection in [-1.0, -0.7, -0.5, -0.3, 0.0, 0.25, 0.5, 1.0]:
            for depth in [2, 4, 12, 24]:
                assert tome.schedule((r, inflection), depth) == _parse_r((r, inflection), depth)


def test_pomt_keeps_the_prefix_then_the_best_tokens_in_their_order_then_the_mean_of_the_rest():
    x = torch.tensor([[[0.0], [10.0], [20.0], [30.0], [40.0], [50.0]]])  # token i holds 10 i; token 0 is the prefix
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.8, 0.2]])  # tokens 1..5: the best three are 2, 4, 3
    out = prune_keep_mean(x, scores, r=1, num_prefix=1)
    # N - r - p - 1 = 3 kept in position order (20, 30, 40), then the mean of tokens 5 and 1: (50 + 10) / 2.
    assert out[0, :, 0].tolist() == [0.0, 20.0, 30.0, 40.0, 30.0]


def test_pomt_keeps_the_lower_index_among_equal_scores():
    x = torch.arange(8.0).reshape(1, 8, 1)  # token i holds i; token 0 is the prefix
    scores = torch.tensor([[0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 0.5]])  # tokens 1..7: 3 first, then 1, 2, 4, ...
    out = prune_keep_mean(x, scores, r=3, num_prefix=1)
    # 8 - 3 - 1 - 1 = 3 kept: token 3, then the equal tokens of lowest index, 1 and 2; the mean of 4..7.
    assert out[0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 5.5]


def test_topk_scores_are_the_class_tokens_attention_probabilities_averaged_over_heads():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    # Written out: the softmax of the class token's logits in each head, then the mean over heads.
    probabilities = ((q * 0.5) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]  # (B, H, N)
    expected = probabilities.mean(dim=1)[:, 2:]
    assert torch.allclose(class_attention(q, k, 0.5, num_prefix=2), expected, atol=1e-6)
