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

from pomt_cli.script_args import OneLineParser, number, refuse

#: The largest side of an image: a 10,000 x 10,000 image is 300 MB before compression.
MAX_SIDE = 10_000


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


def size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` as two whole numbers from 1 to ``MAX_SIDE``."""
    width, x, height = text.partition("x")
    if not (x and width.isdigit() and height.isdigit() and 1 <= int(width) <= MAX_SIDE
            and 1 <= int(height) <= MAX_SIDE):
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT with sides 1 to {MAX_SIDE}, e.g. 500x375")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--images", type=number(int, minimum=1), default=2000)
    parser.add_argument("--classes", type=number(int, minimum=1), default=1000)
    parser.add_argument("--size", type=size, default="500x375", help=f"WIDTHxHEIGHT, each 1 to {MAX_SIDE}")
    parser.add_argument("--seed", type=number(int, minimum=0), default=0)
    args = parser.parse_args(argv)
    width, height = args.size
    if args.root.exists() and not args.root.is_dir():
        refuse(f"{args.root} is a file, not a folder: give a folder to write the class folders in")
    try:
        for i in range(args.images):
            write_image(args.root, i, args.classes, width, height, args.seed)
    except OSError as exc:
        refuse(f"cannot write the images under {args.root} ({exc.strerror or exc}): choose a folder you can write")
    print(f"wrote {args.images} images in {min(args.images, args.classes)} class folders under {args.root}")


if __name__ == "__main__":
    main()
