"""The method registry: the built-in methods by name, and a fifth method added from a test alone."""

from __future__ import annotations

import pydantic
import pytest
import torch

from conftest import tiny_vit
from pomt_cli.accuracy.estimators import reduction
from pomt_cli.formats.accuracy import estimators
from pomt_cli.bench import BenchTiming, MethodSetting, bench_frame, fit_settings, time_methods
from pomt_cli.errors import PomtError
from pomt_cli.pruning import (
    Method, apply, forward_ideal, geometry, method_names, planned_token_counts, register, remove, token_counts,
    unregister,
)
from pomt_cli.pruning.attention import fused, residual


class DropLast(Method):
    """Drop the last r tokens of every block after its attention (r an int or one per block)."""

    name = "droplast"
    title = "Drop-last"

    def schedule(self, g, r, layer):
        if isinstance(r, int):
            return [r] * g.num_blocks
        if len(r) != g.num_blocks:
            raise ValueError(f"droplast takes one r per block, got {len(r)} for {g.num_blocks} blocks")
        return list(r)

    def reduce(self, block, x, q, k, v, size, plan):
        x = residual(block, x, fused(block.attn, q, k, v))
        return x[:, : x.shape[1] - plan.r], size


@pytest.fixture
def droplast():
    register(DropLast)
    try:
        yield
    finally:
        unregister("droplast")
    assert "droplast" not in method_names()


def test_the_registry_lists_the_four_methods_in_order():
    assert method_names() == ("none", "pomt", "tome", "topk")
    assert estimators() == ("random", "pomt", "tome", "topk")


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'droplast': use one of none, pomt, tome, topk"):
        apply(tiny_vit(), "droplast", r=1)
    with pytest.raises(pydantic.ValidationError, match="unknown method 'droplast'"):
        MethodSetting(method="droplast", r=1)


def test_a_method_cannot_be_registered_twice(droplast):
    with pytest.raises(ValueError, match="'droplast' is registered already"):
        register(DropLast)


def test_a_method_without_its_reduction_cannot_be_registered():
    class NoReduce(Method):
        name = "noreduce"
        title = "No reduction written"

        def schedule(self, g, r, layer):
            return [r] * g.num_blocks

    with pytest.raises(TypeError, match="reduce"):
        register(NoReduce)
    assert "noreduce" not in method_names()


def test_a_fifth_method_works_through_apply(droplast):
    assert method_names() == ("none", "pomt", "tome", "topk", "droplast")
    model = tiny_vit()  # 17 tokens, 3 blocks
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
        counts = [17, 15, 13, 11]
        # Dropping the last tokens is what the ideal forward does by slicing: the same logits.
        expected = forward_ideal(model, images, counts)
        got = apply(model, "droplast", r=2)(images)
        assert token_counts(model) == planned_token_counts(model) == counts
        torch.testing.assert_close(got, expected)
        assert not torch.allclose(got, before)
        apply(model, "droplast", r=[0, 3, 1])
        assert planned_token_counts(model) == [17, 17, 14, 13]
        got = model(images)
        remove(model)
        torch.testing.assert_close(got, forward_ideal(model, images, [17, 17, 14, 13]))
        torch.testing.assert_close(model(images), before)
    with pytest.raises(ValueError, match="droplast takes one r per block, got 2 for 3 blocks"):
        apply(model, "droplast", r=[1, 1])
    with pytest.raises(ValueError, match=r"r=6 is too large: .* has 5 tokens \(1 prefix\) left at block 2"):
        apply(model, "droplast", r=6)


def test_a_fifth_method_works_through_bench_and_the_estimators(droplast):
    model = tiny_vit()
    settings = [MethodSetting(method="none"), MethodSetting(method="droplast", r=[1, 2, 3])]
    assert [s.label for s in settings] == ["none", "droplast r=[1,2,3]"]
    assert [s.slug for s in settings] == ["none", "droplast-r1x2x3"]
    fitted = fit_settings(model, settings)
    assert fitted[1].per_block == [1, 2, 3] and fitted[1].capped_from is None
    with pytest.raises(PomtError, match="droplast r=9: r=9 is too large"):
        fit_settings(model, [MethodSetting(method="droplast", r=9)])
    plan = {2: fitted}
    timing = BenchTiming(budget_s=0.05, min_samples=3, warmup=1, rounds=1)
    timed = time_methods(model, plan, timing, device=torch.device("cpu"))
    frame = bench_frame(plan, timed, None)
    assert frame["method"].to_list() == ["none", "droplast"]
    assert frame["tokens_out"].to_list() == [17, 11]
    assert "droplast" in estimators()
    assert reduction("droplast", geometry(model), 12, layer=0) == {"r": [2, 2, 1]}
    assert not hasattr(model, "pomt_config")
