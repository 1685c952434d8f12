"""Labelled images for accuracy: image folders, the bundled digits set, timm eval transforms.

Every image is decoded and put through the model's timm evaluation transform once, up to
and excluding the conversion to float: the result is a uint8 tensor kept in memory. The
rest of timm's transform (``ToTensor``'s division by 255 and ``Normalize``) runs per batch
on the device, with the same arithmetic, so the model sees exactly what timm's own
``create_transform(**resolve_data_config(model=model))`` would give it.

>>> listing = list_images("/datasets/imagenet/val", limit=1024)
>>> data = load_images(listing, Preprocess.from_model(model))
>>> counts = evaluate(model, data, batch_size=64, device="cuda")
>>> counts.top1_percent
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel
from timm.data import create_transform, resolve_data_config
from timm.utils.misc import natural_key
from torch import nn

from pomt_cli import digits
from pomt_cli.errors import PomtError
from pomt_cli.models import check_num_classes
from pomt_cli.pruning.geometry import geometry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""The files an image folder is made of (torchvision's ImageFolder list); others are ignored."""

DIGITS = digits.DATA_NAME


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One labelled image before decoding.

    Attributes:
        name: its identity: the path relative to the data folder (``n01440764/x.JPEG``),
            or ``digits/test/00012`` for the digits set (the scikit-learn index).
        label: the class index.
        path: the file, for image folders.
        pixels: the (8, 8) uint8 grey image, for the digits set.
    """

    name: str
    label: int
    path: Path | None = None
    pixels: np.ndarray | None = None

    def open(self) -> Image.Image:
        """The image as PIL gives it (not yet converted or loaded for a file)."""
        if self.pixels is not None:
            return Image.fromarray(self.pixels, mode="L")
        return Image.open(self.path)


@dataclass(frozen=True)
class Listing:
    """The images of a labelled data set that a run uses, in class order.

    Attributes:
        source: the data folder (absolute) or ``digits``.
        classes: class names; the class index is the position (see :func:`class_folders`).
        records: the images used (all of them, or a ``limit`` subset).
        available: images in the data set before ``limit``.
        limit: the subset size asked for, if any.
        duplicates: ``(name, counted_as)`` of each image file that folder links showed
            again under another name: it is counted once, as ``counted_as``.
    """

    source: str
    classes: list[str]
    records: list[ImageRecord]
    available: int
    limit: int | None = None
    duplicates: tuple[tuple[str, str], ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shard(self, rank: int, world_size: int) -> list[int]:
        """Positions of the records that process ``rank`` of ``world_size`` evaluates.

        Process r takes positions r, r + W, r + 2W, ...: every image belongs to exactly
        one process, and the processes' shares differ by at most one image.
        """
        return list(range(rank, len(self.records), world_size))


def _file_key(name: str) -> bytes:
    """A fixed pseudo-random order of images within a class, independent of any seed."""
    return hashlib.sha256(name.encode()).digest()


def balanced_subset(records: Sequence[ImageRecord], num_classes: int, limit: int) -> list[ImageRecord]:
    """``limit`` records spread over the classes as evenly as their sizes allow.

    Classes take turns (in class order) to add their next image, in the order of the
    SHA-256 of the image names, until ``limit`` images are chosen; a class that runs out
    drops out of the turns. The subset depends only on the image names and ``limit``,
    and is returned in class order, then name order.
    """
    by_class: list[list[ImageRecord]] = [[] for _ in range(num_classes)]
    for record in records:
        by_class[record.label].append(record)
    queues = [sorted(members, key=lambda r: _file_key(r.name)) for members in by_class]
    taken = [0] * num_classes
    chosen = 0
    while chosen < limit:
        progressed = False
        for c, queue in enumerate(queues):
            if chosen == limit:
                break
            if taken[c] < len(queue):
                taken[c] += 1
                chosen += 1
                progressed = True
        if not progressed:
            break
    subset = [r for c, queue in enumerate(queues) for r in queue[: taken[c]]]
    return sorted(subset, key=lambda r: (r.label, r.name))


ClassOrder = Literal["name", "natural"]
"""How class folders are numbered: ``name`` sorts their names as strings (torchvision's
ImageFolder), ``natural`` by timm's own ``natural_key`` (digits as numbers, case ignored: the
order of timm's folder reader, so ``c2`` comes before ``c10``)."""


def class_folders(root: Path, order: ClassOrder | None = None) -> list[str]:
    """The class folders of ``root`` (hidden ones left out) in class-index order.

    Raises:
        PomtError: ``order`` is None and the two orders number the folders differently
            (the model's training decided, and only the user knows which it was).
    """
    names = [e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
    by_name, natural = sorted(names), sorted(names, key=natural_key)
    if order is None and by_name != natural:
        first = next(i for i, (a, b) in enumerate(zip(by_name, natural)) if a != b)
        raise PomtError(
            f"--data {root}: its class folders number differently sorted by name ({by_name[first]} is class "
            f"{first}, as torchvision's ImageFolder counts) and naturally ({natural[first]} is class {first}, "
            "as timm's train.py counts): give --class-order name or natural, as the model was trained")
    return natural if order == "natural" else by_name


def _walk_class(root: Path, name: str, label: int) -> Iterator[tuple[ImageRecord, bool, str]]:
    """The image files of class folder ``root/name`` as torchvision's ``make_dataset`` finds
    them (recursively, folders and files sorted by name, by extension), each with whether
    its path passes through a folder link, and its real path.

    Folder links are followed, except to a folder above on the way there, or to ``root``
    or one of its ancestors: a link loop ends at once and never leads into another class.
    """
    top = root / name
    real_root = Path(os.path.realpath(root))
    # Per folder: whether a link leads to it, and the real folders above it on the way.
    linked, above = {str(top): top.is_symlink()}, {str(top): ()}
    folders = []
    for folder, subfolders, files in os.walk(top, followlinks=True):
        real = os.path.realpath(folder)
        if real in above[folder] or real_root.is_relative_to(real):
            subfolders[:] = []
            continue
        for sub in subfolders:
            path = os.path.join(folder, sub)
            linked[path], above[path] = linked[folder] or os.path.islink(path), (*above[folder], real)
        folders.append((folder, files, real))
    for folder, files, real in sorted(folders):
        for file in sorted(files):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                path = Path(folder, file)
                real_file = os.path.realpath(path) if path.is_symlink() else os.path.join(real, file)
                record = ImageRecord(name=path.relative_to(root).as_posix(), label=label, path=path)
                yield record, linked[folder], real_file


def _list_folder(root: Path, order: ClassOrder | None = None
                 ) -> tuple[list[str], list[ImageRecord], tuple[tuple[str, str], ...]]:
    if not root.exists():
        raise PomtError(f"--data {root} does not exist: give an image folder (one subfolder per class) or 'digits'")
    if not root.is_dir():
        raise PomtError(f"--data {root} is a file: give a folder with one subfolder per class")
    classes = class_folders(root, order)
    if not classes:
        raise PomtError(f"--data {root} has no class folders: put each class's images in a subfolder")
    found = [
        item for label, name in enumerate(classes) for item in _walk_class(root, name, label)
        # Hidden files and folders inside a class (.ipynb_checkpoints, macOS's ._ files) are not images of the set.
        if not any(part.startswith(".") for part in item[0].name.split("/")[1:])
    ]
    # A file that folder links show more than once counts once: where no link leads to it, else first.
    chosen: dict[str, tuple[ImageRecord, bool]] = {}
    for record, linked, real in found:
        if real not in chosen or (chosen[real][1] and not linked):
            chosen[real] = (record, linked)
    kept = {id(record) for record, _ in chosen.values()}
    duplicates = tuple((record.name, chosen[real][0].name) for record, _, real in found if id(record) not in kept)
    return classes, [record for record, _, _ in found if id(record) in kept], duplicates


def _list_digits() -> tuple[list[str], list[ImageRecord], tuple[tuple[str, str], ...]]:
    split = digits.digits_split("test")
    records = [
        ImageRecord(name=f"digits/test/{int(i):05d}", label=int(y), pixels=px)
        for px, y, i in zip(split.pixels, split.labels, split.indices)
    ]
    return list(digits.CLASSES), sorted(records, key=lambda r: (r.label, r.name)), ()


def describe_duplicates(duplicates: Sequence[tuple[str, str]], shown: int = 3) -> str | None:
    """One line on the images that folder links showed twice (None where there were none)."""
    if not duplicates:
        return None
    listed = "; ".join(f"{name} (the file of {kept})" for name, kept in duplicates[:shown])
    more = f" and {len(duplicates) - shown} more" if len(duplicates) > shown else ""
    return (f"counted once {len(duplicates)} image(s) that folder links showed a second time, leaving out "
            f"{listed}{more}")


def check_classes(model, listing: Listing, spec: str | Path) -> None:
    """:func:`~pomt_cli.models.check_num_classes` for ``listing``, with a hint when ``spec`` is
    one folder too high (ImageNet's root, say, whose ``train`` and ``val`` hold the class folders).

    Raises:
        PomtError: the model's head does not have one output per class folder.
    """
    try:
        check_num_classes(model, listing.num_classes, f"--data {spec}")
    except PomtError as exc:
        # Every image two folders deep or more: the "classes" are folders of class folders.
        if not listing.records or any(r.name.count("/") < 2 for r in listing.records):
            raise
        shown = ", ".join(listing.classes[:3]) + (", ..." if listing.num_classes > 3 else "")
        # Accuracy is estimated on held-out images: a validation split is the likelier meaning.
        meant = next((c for c in listing.classes if c.lower() in ("val", "validation")), listing.classes[0])
        raise PomtError(f"{exc} (its folders {shown} hold folders of images: did you mean --data "
                        f"{Path(spec) / meant}?)") from None


def list_images(spec: str | Path, limit: int | None = None, class_order: ClassOrder | None = None) -> Listing:
    """The labelled images of ``spec``: an ImageFolder tree, or ``digits`` (the held-out digits).

    Args:
        spec: a folder with one subfolder per class (:func:`class_folders` gives the class
            indices; files are found recursively, by extension; hidden folders are left
            out), or ``"digits"``.
        limit: take a deterministic, class-balanced subset of this many images.
        class_order: how the class folders are numbered (:data:`ClassOrder`); None where
            both orders agree, as they do for ImageNet's synset folders.

    Raises:
        PomtError: empty ``spec``, missing or empty folder, no class folders, class
            folders that the two orders number differently without ``class_order``, limit
            below 1 or above the number of images.
    """
    if not str(spec).strip():  # Path("") is the working folder
        raise PomtError(f"--data is empty: give an image folder (one subfolder per class) or '{DIGITS}'")
    if str(spec) == DIGITS:
        source, (classes, records, duplicates) = DIGITS, _list_digits()
    else:
        root = Path(spec).expanduser().resolve()
        source, (classes, records, duplicates) = str(root), _list_folder(root, class_order)
    if not records:
        raise PomtError(
            f"--data {spec} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} files in its class folders)"
        )
    if limit is not None:
        if limit < 1:
            raise PomtError(f"--limit {limit} must be at least 1")
        if limit > len(records):
            raise PomtError(f"--limit {limit} exceeds the {len(records)} images in --data {spec}: give a smaller limit")
        chosen = balanced_subset(records, len(classes), limit)
    else:
        chosen = records
    return Listing(source=source, classes=classes, records=chosen, available=len(records), limit=limit,
                   duplicates=duplicates)


@dataclass(frozen=True)
class Preprocess:
    """A model's timm evaluation transform, split at the conversion to float.

    Attributes:
        data_config: timm's data config (``input_size``, ``interpolation``, ``crop_pct``,
            ``crop_mode``, ``mean``, ``std``).
        mode: the PIL mode images are converted to first (``RGB``, or ``L`` for one channel).
        to_uint8: PIL image -> (C, H, W) uint8 tensor: timm's resize and crop.
    """

    data_config: dict
    mode: str
    to_uint8: Callable[[Image.Image], torch.Tensor] = field(repr=False)

    @classmethod
    def from_config(cls, data_config: dict) -> Preprocess:
        """From a timm data config (as ``timm.data.resolve_data_config`` returns)."""
        channels = int(data_config["input_size"][0])
        if channels not in (1, 3):
            raise PomtError(f"models with {channels} input channels are not supported: images are read as RGB or grey")
        for key in ("mean", "std"):
            if len(data_config[key]) != channels:
                raise PomtError(f"the model's config gives {key} {tuple(data_config[key])} for {channels} channel(s)")
        transform = create_transform(
            input_size=tuple(data_config["input_size"]),
            interpolation=data_config["interpolation"],
            crop_pct=data_config["crop_pct"],
            crop_mode=data_config["crop_mode"],
            mean=tuple(data_config["mean"]),
            std=tuple(data_config["std"]),
            is_training=False,
            use_prefetcher=True,  # timm's own split: no float conversion, no normalisation
        )
        return cls(data_config=dict(data_config), mode="RGB" if channels == 3 else "L", to_uint8=transform)

    @classmethod
    def from_model(cls, model: nn.Module) -> Preprocess:
        """The transform of the model's pretrained config, at the input size the model was built for."""
        config = resolve_data_config(model=model)
        config["input_size"] = geometry(model).input_size
        return cls.from_config(config)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.data_config["input_size"])

    def decode(self, record: ImageRecord) -> torch.Tensor:
        """(C, H, W) uint8: the image read, converted, resized and cropped.

        Raises:
            OSError, ValueError, SyntaxError, Image.DecompressionBombError: unreadable image.
        """
        with record.open() as image:
            image = image.convert(self.mode)
        return torch.as_tensor(np.asarray(self.to_uint8(image), dtype=np.uint8))

    def normalize(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, C, H, W) uint8 -> (B, C, H, W) ``dtype``: timm's ``ToTensor`` then ``Normalize``, on ``images``' device."""
        mean = torch.tensor(self.data_config["mean"], device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.data_config["std"], device=images.device).view(-1, 1, 1)
        x = images.float().div_(255)
        return x.sub_(mean).div_(std).to(dtype)


@dataclass(frozen=True)
class Batch:
    """Images ``start:stop`` of a :class:`LabelledImages`, normalised on the device.

    Attributes:
        images: (B, C, H, W) in the requested dtype.
        labels: (B,) int64.
    """

    images: torch.Tensor
    labels: torch.Tensor
    start: int
    stop: int


@dataclass
class LabelledImages:
    """Decoded images of one process, ready to be evaluated many times.

    Attributes:
        images: (K, C, H, W) uint8, the model's transform up to the float conversion.
        labels: (K,) int64 class indices.
        names: the K image identities (``ImageRecord.name``).
        skipped: ``(name, reason)`` of the images that could not be read.
        preprocess: the transform that made them (normalises each batch).
        num_classes: classes of the data set.
    """

    images: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    skipped: list[tuple[str, str]]
    preprocess: Preprocess
    num_classes: int

    def __len__(self) -> int:
        return len(self.names)

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def batches(
        self, batch_size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Iterator[Batch]:
        """The images in order, ``batch_size`` at a time, copied to ``device`` and normalised there.

        On CUDA the uint8 tensor is pinned once and each batch is copied without
        blocking the host, so the next batch is queued while the GPU computes.
        """
        device = torch.device(device)
        source, labels = self.images, self.labels
        if device.type == "cuda":
            source, labels = source.pin_memory(), labels.pin_memory()
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            x = source[start:stop].to(device, non_blocking=True)
            y = labels[start:stop].to(device, non_blocking=True)
            yield Batch(images=self.preprocess.normalize(x, dtype), labels=y, start=start, stop=stop)


def _decode_or_reason(preprocess: Preprocess, record: ImageRecord) -> torch.Tensor | str:
    try:
        return preprocess.decode(record)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else 'unreadable'}"


def default_workers() -> int:
    """Decoding threads: the usable cores, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def load_images(
    listing: Listing,
    preprocess: Preprocess,
    *,
    positions: Sequence[int] | None = None,
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> LabelledImages:
    """Decode and transform the images of ``listing`` once.

    Args:
        listing: the data set.
        preprocess: the model's transform.
        positions: which records to decode (a process's shard); all by default.
        workers: decoding threads (PIL releases the GIL while decoding and resizing).
        on_progress: called as ``on_progress(done, total)`` after each image.

    Returns:
        The readable images in listing order; unreadable ones are in ``skipped``.
    """
    chosen = [listing.records[i] for i in (range(len(listing.records)) if positions is None else positions)]
    c, h, w = preprocess.input_size
    images = torch.empty((len(chosen), c, h, w), dtype=torch.uint8)
    labels: list[int] = []
    names: list[str] = []
    skipped: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        results = pool.map(lambda r: _decode_or_reason(preprocess, r), chosen)
        for done, (record, result) in enumerate(zip(chosen, results), start=1):
            if isinstance(result, str):
                skipped.append((record.name, result))
            elif tuple(result.shape) != (c, h, w):
                skipped.append((record.name, f"transform gave shape {tuple(result.shape)}, expected {(c, h, w)}"))
            else:
                images[len(names)] = result
                labels.append(record.label)
                names.append(record.name)
            if on_progress is not None:
                on_progress(done, len(chosen))
    return LabelledImages(
        images=images[: len(names)].clone() if skipped else images,
        labels=torch.tensor(labels, dtype=torch.int64),
        names=names,
        skipped=skipped,
        preprocess=preprocess,
        num_classes=listing.num_classes,
    )


class TopCounts(BaseModel):
    """Correct predictions among ``images``: top-1 and top-5 (top-k with k = min(5, classes))."""

    images: int = 0
    top1: int = 0
    top5: int = 0

    @property
    def top1_percent(self) -> float:
        return 100.0 * self.top1 / self.images if self.images else float("nan")

    @property
    def top5_percent(self) -> float:
        return 100.0 * self.top5 / self.images if self.images else float("nan")


def count_correct(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> torch.Tensor:
    """(2,) int64 on the logits' device: top-1 and top-k hits.

    Args:
        logits: (B, classes).
        labels: (B,) int64.
        k: the second count's k (capped at the number of classes).
    """
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    hits = top == labels.unsqueeze(-1)
    return torch.stack([hits[:, 0].sum(), hits.any(dim=-1).sum()])


def evaluate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    data: LabelledImages,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TopCounts:
    """Top-1 and top-5 hits of ``forward`` (a model or any (B, C, H, W) -> (B, classes) callable).

    The model must already be on ``device`` in ``dtype``. Counts stay on the device until
    the end, so the host never waits for the GPU between batches.
    """
    hits = torch.zeros(2, dtype=torch.int64, device=device)
    with torch.inference_mode():
        for batch in data.batches(batch_size, device, dtype):
            hits += count_correct(forward(batch.images), batch.labels)
    top1, top5 = hits.tolist()
    return TopCounts(images=len(data), top1=top1, top5=top5)


def load_labelled(
    spec: str | Path,
    model: nn.Module,
    *,
    limit: int | None = None,
    class_order: ClassOrder | None = None,
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[Listing, LabelledImages]:
    """List, check and decode a labelled data set for ``model`` in one call (single process).

    Raises:
        PomtError: bad data set, or the model's head does not match its classes.
    """
    listing = list_images(spec, limit=limit, class_order=class_order)
    check_classes(model, listing, spec)
    data = load_images(listing, Preprocess.from_model(model), workers=workers, on_progress=on_progress)
    if not len(data):
        raise PomtError(f"none of the {len(listing.records)} images in --data {spec} could be read")
    return listing, data
