"""Train the bundled ``digits-vit`` on scikit-learn's handwritten digits, from a seed.

The images go through the model's own evaluation transform (``pomt_cli.accuracy.data``), exactly
as ``pomt estimate-accuracy --data digits`` reads them; training adds random shifts of up
to 3 pixels. The run is deterministic on a given machine and torch build: the same seed
and thread count give the same weights, bit for bit.

    python scripts/train_digits_vit.py                      # writes src/pomt_cli/assets/digits_vit.safetensors
    python scripts/train_digits_vit.py --output /tmp/d.safetensors --epochs 5
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pomt_cli import digits
from pomt_cli.accuracy.data import ImageRecord, Preprocess
from pomt_cli.models import state_dict_sha256
from pomt_cli.formats.outputs import atomic_output

SHIFT = 3
"""Largest random shift in pixels (of the 32x32 input) during training."""


def split_tensors(preprocess: Preprocess, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, 1, 32, 32) uint8 images through the model's transform, and (M,) int64 labels."""
    part = digits.digits_split(split)
    images = torch.stack([preprocess.decode(ImageRecord(name="", label=0, pixels=px)) for px in part.pixels])
    return images, torch.from_numpy(part.labels)


def check_normalisation(preprocess: Preprocess, images: torch.Tensor) -> None:
    """The config's mean and std are those of the training pixels (to 3 decimals)."""
    x = images.float() / 255
    mean, std = round(x.mean().item(), 3), round(x.std().item(), 3)
    want = (preprocess.data_config["mean"][0], preprocess.data_config["std"][0])
    if (mean, std) != want:
        raise SystemExit(f"digits.PRETRAINED_CFG has mean/std {want} but the training pixels give {(mean, std)}")


def shifted(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each (1, H, W) image moved by up to SHIFT pixels in x and y, zero (background) filled."""
    b, _, h, w = images.shape
    padded = F.pad(images, (SHIFT, SHIFT, SHIFT, SHIFT))
    dy = torch.randint(0, 2 * SHIFT + 1, (b,), generator=generator).tolist()
    dx = torch.randint(0, 2 * SHIFT + 1, (b,), generator=generator).tolist()
    return torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(zip(dy, dx))])


def accuracy(model: torch.nn.Module, preprocess: Preprocess, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        predicted = model(preprocess.normalize(images)).argmax(dim=-1)
    return 100.0 * (predicted == labels).float().mean().item()


def train(seed: int, epochs: int, batch_size: int, lr: float, log=print) -> tuple[torch.nn.Module, float]:
    """Train digits-vit from ``seed``; returns the model (eval mode) and its held-out top-1 (%)."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    model = digits.build_digits_vit()
    preprocess = Preprocess.from_model(model)
    train_x, train_y = split_tensors(preprocess, "train")
    test_x, test_y = split_tensors(preprocess, "test")
    check_normalisation(preprocess, train_x)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train_y) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    began = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x = preprocess.normalize(shifted(train_x[idx], generator))
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            held_out = accuracy(model, preprocess, test_x, test_y)
            log(f"epoch {epoch + 1:3d}  loss {loss.item():.3f}  held-out top-1 {held_out:.2f}%  "
                f"{time.perf_counter() - began:.0f} s")
    return model.eval(), accuracy(model, preprocess, test_x, test_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the committed file used 2)")
    parser.add_argument("--output", type=Path, default=digits.CHECKPOINT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, held_out = train(args.seed, args.epochs, args.batch_size, args.lr)
    if held_out < 95.0:
        raise SystemExit(f"held-out top-1 {held_out:.2f}% is below 95%: not writing {args.output}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "model": digits.NAME,
        "seed": str(args.seed),
        "epochs": str(args.epochs),
        "batch_size": str(args.batch_size),
        "lr": str(args.lr),
        "threads": str(args.threads),
        "held_out_top1": f"{held_out:.2f}",
        "torch": torch.__version__,
        "script": "scripts/train_digits_vit.py",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.output) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    file_sha = hashlib.sha256(args.output.read_bytes()).hexdigest()
    print(f"held-out top-1 {held_out:.2f}%  wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")
    print(f"file sha256 {file_sha}  state-dict sha256 {state_dict_sha256(model)}")


if __name__ == "__main__":
    main()
