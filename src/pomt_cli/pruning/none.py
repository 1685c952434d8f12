"""No reduction: the unpatched model, the baseline every method is compared with."""

from __future__ import annotations

from pomt_cli.pruning.attention import fused, residual
from pomt_cli.pruning.registry import Method, register


@register
class NoReduction(Method):
    name = "none"
    title = "no reduction"
    reduces = False
    bench_r = 0

    def schedule(self, g, r, layer):
        return [0] * g.num_blocks

    def reduce(self, block, x, q, k, v, size, plan):
        return residual(block, x, fused(block.attn, q, k, v)), size

    def label(self, r, layer):
        return self.name

    def slug(self, r, layer):
        return self.name
