"""The bundled default: a small timm ViT trained on scikit-learn's handwritten digits.

``digits-vit`` is a timm ``VisionTransformer`` (32x32 grey input, patch 4: 64 patch tokens
plus a class token) whose weights ship in ``pomt_cli/assets``. ``scripts/train_digits_vit.py``
trains it from a seed on the training split below; ``--data digits`` is the held-out split.
Its preprocessing (input size, interpolation, crop, mean, std) lives in its
``pretrained_cfg``, as for any timm model, so the data pipeline treats it like one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from timm.models.vision_transformer import VisionTransformer

from pomt_cli.errors import PomtError

NAME = "digits-vit"
DATA_NAME = "digits"
CHECKPOINT = Path(__file__).parent / "assets" / "digits_vit.safetensors"
CLASSES = tuple(str(d) for d in range(10))
TEST_EVERY = 4
"""Within each class, in scikit-learn's order, every 4th image (the 1st, 5th, ...) is held out."""

ARCHITECTURE = dict(
    img_size=32,
    patch_size=4,
    in_chans=1,
    num_classes=len(CLASSES),
    embed_dim=64,
    depth=4,
    num_heads=4,
    mlp_ratio=2.0,
    class_token=True,
    global_pool="token",
)
"""Keyword arguments of ``timm.models.vision_transformer.VisionTransformer``."""

PRETRAINED_CFG = dict(
    architecture=NAME,
    input_size=(1, 32, 32),
    interpolation="bicubic",
    crop_pct=1.0,
    crop_mode="center",
    mean=(0.310,),
    std=(0.349,),
    num_classes=len(CLASSES),
    first_conv="patch_embed.proj",
    classifier="head",
    license="apache-2.0",
)
"""timm's preprocessing vocabulary; mean and std are those of the training split's resized pixels
(``scripts/train_digits_vit.py`` checks them)."""


@dataclass(frozen=True)
class DigitsSplit:
    """One split of scikit-learn's digits.

    Attributes:
        pixels: (M, 8, 8) uint8 grey images, 0..255 (scikit-learn's 0..16 scaled).
        labels: (M,) int64 digit classes.
        indices: (M,) int64 positions in scikit-learn's ``load_digits()`` arrays.
    """

    pixels: np.ndarray
    labels: np.ndarray
    indices: np.ndarray


@functools.cache
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise PomtError("the digits data set needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return pixels, bunch.target.astype(np.int64)


def digits_split(split: Literal["train", "test"]) -> DigitsSplit:
    """The fixed train or held-out split (no random numbers: every 4th image of each class is held out)."""
    pixels, labels = _all_digits()
    test = np.zeros(len(labels), dtype=bool)
    for c in range(len(CLASSES)):
        test[np.flatnonzero(labels == c)[::TEST_EVERY]] = True
    chosen = np.flatnonzero(test if split == "test" else ~test)
    return DigitsSplit(pixels=pixels[chosen], labels=labels[chosen], indices=chosen.astype(np.int64))


def build_digits_vit() -> VisionTransformer:
    """The digits-vit architecture with timm's default (random) initialisation, in eval mode."""
    model = VisionTransformer(**ARCHITECTURE)
    model.pretrained_cfg = dict(PRETRAINED_CFG)
    model.default_cfg = model.pretrained_cfg
    return model.eval()
