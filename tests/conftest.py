"""Shared fixtures: tiny timm ViTs built with pretrained=False, and a CLI runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def tiny_vit(name: str = "vit_tiny_patch16_224", **overrides) -> torch.nn.Module:
    """A small, randomly initialised timm model of the family ``name`` (eval mode, float32).

    The defaults give 32x32 inputs with patch 8 (16 patch tokens), 3 blocks, width 48.
    Any keyword overrides them (e.g. ``reg_tokens=4``, ``init_values=1e-5``).
    """
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.fixture
def make_vit():
    return tiny_vit


def run_pomt(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m pomt_cli ARGS`` in a subprocess; returns the completed process (text mode)."""
    return subprocess.run(
        [sys.executable, "-m", "pomt_cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def pomt():
    return run_pomt


def run_in_process(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``pomt ARGS`` in this process through the CLI's ``main``; (exit code, stdout, stderr)."""
    from pomt_cli.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
