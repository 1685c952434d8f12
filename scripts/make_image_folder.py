"""Write a synthetic ImageFolder tree of JPEGs: a stand-in for ImageNet's layout in benchmarks.

    python scripts/make_image_folder.py /tmp/fake_val --images 2000 --classes 1000

Images are random noise with a per-class tint, 500x375 like a typical ImageNet photo,
so decoding and resizing cost what real images cost; the labels carry no meaning, so
only the speed of `pomt estimate-accuracy` on them means anything.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(root: Path, i: int, classes: int, width: int, height: int, seed: int = 0) -> Path:
    """Write image ``i`` (class ``i % classes``); its pixels depend on ``seed`` and ``i`` alone."""
    rng = np.random.default_rng([seed, i])
    folder = root / f"class_{i % classes:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    tint = rng.integers(0, 128, 3, dtype=np.uint8)
    pixels = rng.integers(0, 128, (height, width, 3), dtype=np.uint8) + tint
    path = folder / f"img_{i:06d}.JPEG"
    Image.fromarray(pixels).save(path, quality=85)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    for i in range(args.images):
        write_image(args.root, i, args.classes, width, height, args.seed)
    print(f"wrote {args.images} images in {min(args.images, args.classes)} class folders under {args.root}")


if __name__ == "__main__":
    main()
