"""scripts/bench_core.py --host-overhead: the op counts it reports come from real forwards."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import timm
import torch

from pomt_cli.pruning import remove

spec = importlib.util.spec_from_file_location(
    "bench_core", Path(__file__).resolve().parents[1] / "scripts" / "bench_core.py")
bench_core = importlib.util.module_from_spec(spec)
sys.modules["bench_core"] = bench_core  # dataclasses look their module up
spec.loader.exec_module(bench_core)


def test_top_level_ops_count_pomt_block_over_its_ideal():
    torch.manual_seed(0)
    model = timm.create_model(bench_core.TINY_MODEL, pretrained=False, **bench_core.TINY_KWARGS).eval()
    images = torch.randn(1, 3, 32, 32)
    ops = {}
    with torch.inference_mode():
        for variant in bench_core.variants(model, bench_core.TINY_POMT):
            ops[variant.name] = bench_core.top_level_ops(bench_core.prepare(model, images, variant))
    remove(model)
    # The ideal slices tokens (one more op per block after the first), POMT scores and prunes in block 3.
    assert ops["ideal(pomt)"] > ops["none"]
    assert ops["pomt(explicit)"] > ops["ideal(pomt)"]
    assert ops["pomt"] == ops["pomt(explicit)"]  # float32 on the CPU: the default is the explicit block
    assert ops["pomt(lean)"] > ops["pomt(explicit)"]
