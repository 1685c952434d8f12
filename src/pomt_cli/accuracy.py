"""Accuracy against kept tokens: the paper's random-token estimate, or the real methods.

For each kept-token count n of a grid, the model is evaluated on labelled images with n
tokens leaving its last block:

- ``random`` (the paper's estimate): the prefix tokens and n - p patch tokens chosen at
  random right after the position embedding enter every block. The choice depends only
  on (seed, image name, n): each image has one fixed random ranking of its patches, and
  the n - p best-ranked are kept, so the kept sets are nested as n falls.
- every token-reducing method of :mod:`pomt_cli.pruning.registry` by its name, with its
  own schedule for N - n removed tokens (``Method.estimator_setting``):
  ``pomt`` prunes them once, in block ``layer``; with several layers, one curve per layer
  (rows carry ``layer``, null for the estimators without one); ``topk`` / ``tome`` remove
  them over all blocks, spread as evenly as the method allows (:func:`spread`).

Images are decoded once; each batch is evaluated once per n. Under ``torchrun`` every
process evaluates its own share of the images and the hit counts are summed, so the
profile equals a single process's.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from torch import nn

from pomt_cli.data import LabelledImages, Listing, Preprocess, count_correct, list_images, load_images
from pomt_cli.devices import resolve_torch_device
from pomt_cli.errors import PomtError
from pomt_cli.models import check_num_classes, create_model, state_dict_sha256, vit_geometry, weights_source
from pomt_cli.options import Dtype, TokenRange, check_layers, token_grid
from pomt_cli.outputs import output_stem, write_set
from pomt_cli.plots import plot_accuracy
from pomt_cli.profiles import ProfileMeta, write_profile
from pomt_cli.pruning import apply, forward_kept, geometry, method_names, planned_token_counts, remove
from pomt_cli.pruning.geometry import TokenGeometry
from pomt_cli.pruning.registry import Method, spread  # noqa: F401  (spread: re-exported)
from pomt_cli.pruning.registry import get as get_method

#: The paper's estimate, which is no pruning method: random tokens kept from the start.
RANDOM = "random"


def estimators() -> tuple[str, ...]:
    """``random``, then every registered method that reduces tokens (``pomt``, ``tome``, ``topk``)."""
    return (RANDOM, *(m for m in method_names() if get_method(m).reduces))


def estimator_method(estimator: str) -> Method | None:
    """The pruning method behind an estimator (None for ``random``)."""
    return None if estimator == RANDOM else get_method(estimator)


def takes_layer(estimator: str) -> bool:
    """Whether the estimator's curves are per block ``layer`` (POMT's)."""
    method = estimator_method(estimator)
    return method is not None and method.takes_layer


def _check_name(estimator: str) -> str:
    if estimator not in estimators():
        raise ValueError(f"unknown estimator {estimator!r}: use one of {', '.join(estimators())}")
    return estimator


Estimator = Annotated[str, AfterValidator(_check_name)]

FRAME_SCHEMA = {
    "tokens": pl.Int64,
    "accuracy": pl.Float64,
    "top5": pl.Float64,
    "images": pl.Int64,
    "correct": pl.Int64,
    "correct_top5": pl.Int64,
    "block_tokens": pl.List(pl.Int64),
    "layer": pl.Int64,
}


def fewest_tokens(estimator: str, g: TokenGeometry) -> int:
    """The smallest n the estimator can reach on a model (p + 1, except for ToMe on shallow models)."""
    method = estimator_method(estimator)
    return g.num_prefix + 1 if method is None else method.fewest_tokens(g)


def reduction(estimator: str, g: TokenGeometry, n: int, layer: int) -> dict | None:
    """Keyword arguments of ``pomt_cli.pruning.apply`` that leave ``n`` tokens (None for ``random``)."""
    method = estimator_method(estimator)
    return None if method is None else method.estimator_setting(g, g.num_tokens - n, layer)


def accuracy_grid(spec: TokenRange | None, g: TokenGeometry, estimator: str) -> list[int]:
    """The kept-token counts n to evaluate: ``--tokens`` or every n the estimator can reach.

    Raises:
        PomtError: malformed spec, or a point the estimator cannot reach.
    """
    fewest = fewest_tokens(estimator, g)
    if spec is None:
        return list(range(g.num_tokens, fewest - 1, -1))
    grid = token_grid(spec, g.num_tokens, g.num_prefix)
    if grid[-1] < fewest:
        raise PomtError(
            f"--tokens {str(spec)!r}: ToMe merges at most half of the non-prefix tokens per block, so on "
            f"{g.name} ({g.num_blocks} blocks) it leaves at least {fewest} tokens; give STOP >= {fewest}"
        )
    return grid


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Sebastiano Vigna's SplitMix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def random_patch_order(names: list[str], seed: int, num_patches: int) -> torch.Tensor:
    """Each image's fixed random ranking of its patch tokens.

    Row i is a permutation of 0..P-1 that depends only on ``seed`` and ``names[i]``
    (SHA-256 of both, mixed with each patch index by SplitMix64), never on the batch, the
    process or the other images. Keeping the first n - p entries gives the random tokens
    at count n.

    Returns:
        (K, P) int64.
    """
    base = np.array(
        [int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little") for name in names],
        dtype=np.uint64,
    ).reshape(-1, 1)
    keys = _splitmix64(base ^ _splitmix64(np.arange(num_patches, dtype=np.uint64)))
    return torch.from_numpy(np.argsort(keys, axis=1, kind="stable").astype(np.int64))


@dataclass(frozen=True)
class EvalProgress:
    """Where the evaluation is: ``done`` of ``total`` forward passes (batches x grid points).

    ``running`` holds (n, top-1 percent so far) for each grid point, over this process's
    images evaluated so far.
    """

    done: int
    total: int
    images: int
    running: list[tuple[int, float]]


def estimate_hits(
    model: nn.Module,
    data: LabelledImages,
    grid: list[int],
    *,
    estimator: str = "random",
    layer: int = 3,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_progress: Callable[[EvalProgress], None] | None = None,
) -> tuple[torch.Tensor, list[list[int]]]:
    """Top-1 and top-5 hits of ``model`` on ``data`` at each kept-token count.

    The model must be on ``device`` in ``dtype`` and unpatched; it is left unpatched.

    Returns:
        ``(hits, block_tokens)``: (len(grid), 2) int64 hits on ``device``, and for each n
        the tokens entering each block, then leaving the last.
    """
    g = geometry(model)
    p, depth = g.num_prefix, g.num_blocks
    settings = [reduction(estimator, g, n, layer) for n in grid]
    order = random_patch_order(data.names, seed, g.num_patches).to(device) if estimator == RANDOM else None
    block_tokens: list[list[int]] = []
    for n, setting in zip(grid, settings):
        if setting is None:
            block_tokens.append([n] * (depth + 1))
        else:
            block_tokens.append(planned_token_counts(apply(model, estimator, **setting)))
            remove(model)
    hits = torch.zeros(len(grid), 2, dtype=torch.int64, device=device)
    total = data.num_batches(batch_size) * len(grid)
    try:
        with torch.inference_mode():
            for b, batch in enumerate(data.batches(batch_size, device, dtype)):
                for j, (n, setting) in enumerate(zip(grid, settings)):
                    if order is None:
                        logits = apply(model, estimator, **setting)(batch.images)
                    else:
                        keep = order[batch.start : batch.stop, : n - p].sort(dim=1).values
                        logits = forward_kept(model, batch.images, keep)
                    hits[j] += count_correct(logits, batch.labels)
                if on_progress is not None:
                    top1 = hits[:, 0].tolist()
                    running = [(n, 100.0 * h / batch.stop) for n, h in zip(grid, top1)]
                    on_progress(EvalProgress(done=(b + 1) * len(grid), total=total, images=batch.stop, running=running))
    finally:
        remove(model)
    return hits, block_tokens


@dataclass(frozen=True)
class Processes:
    """This process's place in a (possibly single-process) run."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolve_device(spec: str, local_rank: int, world_size: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = resolve_torch_device(spec)
    if device.type == "cuda" and world_size > 1:
        if local_rank >= torch.cuda.device_count():
            raise PomtError(f"process {local_rank} has no GPU: this machine has {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
    return device


@contextmanager
def processes(device: str = "auto") -> Iterator[Processes]:
    """This process's rank and device; under ``torchrun`` (``WORLD_SIZE`` > 1) a process group too.

    The group uses NCCL on CUDA and gloo otherwise, and is destroyed on exit.

    Args:
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``...; under torchrun each
            process takes the GPU of its local rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = _resolve_device(device, local_rank, world_size)
    if world_size == 1 or dist.is_initialized():
        yield Processes(rank=rank, world_size=world_size, device=torch_device)
        return
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    try:
        yield Processes(rank=rank, world_size=world_size, device=torch_device)
    finally:
        dist.destroy_process_group()


class EstimateConfig(BaseModel):
    """The settings of one accuracy estimate, typed (``pomt estimate-accuracy`` parses its options into them)."""

    model_config = ConfigDict(protected_namespaces=())

    model: str
    data: str
    pretrained: bool = False
    checkpoint: Path | None = None
    allow_random_weights: bool = False
    img_size: int | None = None
    limit: int | None = None
    tokens: TokenRange | None = Field(None, description="the kept-token grid (default: every n the estimator reaches)")
    estimator: Estimator = "random"
    layer: int = 3
    layers: list[int] | None = Field(None, description="POMT's blocks, one curve each (default: [layer])")
    seed: int = 0
    batch_size: int = Field(64, ge=1)
    dtype: Dtype = Dtype.float32
    workers: int | None = Field(None, ge=1)
    command: str | None = Field(None, description="the command line recorded in the profile (default: this process's)")


class SkippedImage(BaseModel):
    image: str
    reason: str


class AccuracyMeta(ProfileMeta):
    """Metadata of an accuracy profile (see docs/FORMATS.md)."""

    kind: Literal["accuracy"] = "accuracy"
    estimator: Estimator
    layer: int | None = Field(description="POMT's pruning block (the first of layers); None for the other estimators")
    layers: list[int] | None = Field(None, description="POMT's pruning blocks, one curve each; None for the others")
    seed: int
    weights: str = Field(description="pretrained, checkpoint, bundled or random")
    weights_file: str | None
    weights_sha256: str
    data: str = Field(description="the data folder (absolute) or 'digits'")
    num_images: int = Field(description="images evaluated (readable ones)")
    num_classes: int
    limit: int | None
    images_available: int
    skipped: list[SkippedImage]
    images_sha256: str = Field(description="SHA-256 of the evaluated image names, one per line, in order")
    images: list[str]
    preprocessing: dict
    batch_size: int
    device_type: str


@dataclass(frozen=True)
class AccuracyRun:
    """An accuracy profile and how long it took (timings stay out of the file).

    Attributes:
        frame: one row per n (columns of :data:`FRAME_SCHEMA`).
        meta: the metadata.
        decode_s: seconds decoding and transforming images (this process).
        evaluate_s: seconds evaluating the grid (this process, including the reduction).
        local_images: images this process evaluated.
    """

    frame: pl.DataFrame
    meta: AccuracyMeta
    decode_s: float
    evaluate_s: float
    local_images: int


def _gather(procs: Processes, obj: object) -> list:
    if procs.world_size == 1:
        return [obj]
    out: list = [None] * procs.world_size
    dist.all_gather_object(out, obj)
    return out


def _model_for(config: EstimateConfig) -> tuple[nn.Module, str]:
    """The model with its weights, and where they come from (a checkpoint brings its own head size)."""
    source = weights_source(config.model, pretrained=config.pretrained, checkpoint=config.checkpoint)
    if source == "random" and not config.allow_random_weights:
        raise PomtError(
            f"{config.model} would have random weights, which make accuracy meaningless: give --pretrained or "
            "--checkpoint PATH (or --allow-random-weights to measure anyway)"
        )
    torch.manual_seed(config.seed)  # random weights, when allowed, are the same in every process
    model = create_model(config.model, pretrained=config.pretrained, checkpoint=config.checkpoint,
                         img_size=config.img_size)
    return model, source


def config_layers(config: EstimateConfig) -> list[int | None]:
    """The curves to estimate: POMT's layers, or one curve without a layer."""
    if not takes_layer(config.estimator):
        return [None]
    return list(config.layers) if config.layers else [config.layer]


def _check_estimator(model: nn.Module, g: TokenGeometry, config: EstimateConfig, grid: list[int]) -> None:
    """Every grid point's setting is valid for the core (ValueError -> PomtError)."""
    if estimator_method(config.estimator) is None:
        return
    layers = config_layers(config)
    if takes_layer(config.estimator):
        check_layers(layers, g.num_blocks, config.model)
    try:
        for n, layer in ((n, layer) for layer in layers for n in grid):
            apply(model, config.estimator, **reduction(config.estimator, g, n, layer if layer is not None else 0))
    except ValueError as exc:
        raise PomtError(f"--estimator {config.estimator}: {exc}") from None
    finally:
        remove(model)


def run_estimate(
    config: EstimateConfig,
    procs: Processes,
    *,
    on_decode: Callable[[int, int], None] | None = None,
    on_progress: Callable[[EvalProgress], None] | None = None,
) -> AccuracyRun:
    """Build the model, decode this process's images, evaluate the grid and sum over processes.

    Every process returns the same frame and metadata.

    Raises:
        PomtError: bad options, data or weights.
    """
    dtype_name, dtype = config.dtype.value, config.dtype.torch
    listing: Listing = list_images(config.data, limit=config.limit)
    model, source = _model_for(config)
    check_num_classes(model, listing.num_classes, f"--data {config.data}")
    g = vit_geometry(model)
    grid = accuracy_grid(config.tokens, g, config.estimator)
    _check_estimator(model, g, config, grid)
    weights_sha = state_dict_sha256(model)
    model = model.to(device=procs.device, dtype=dtype)
    preprocess = Preprocess.from_model(model)

    began = time.perf_counter()
    positions = listing.shard(procs.rank, procs.world_size)
    data = load_images(listing, preprocess, positions=positions, workers=config.workers, on_progress=on_decode)
    decode_s = time.perf_counter() - began
    skipped_names = {name: reason for part in _gather(procs, data.skipped) for name, reason in part}
    used = [r.name for r in listing.records if r.name not in skipped_names]
    if not used:
        raise PomtError(f"none of the {len(listing.records)} images in --data {config.data} could be read")

    began = time.perf_counter()
    layers = config_layers(config)
    curves = []
    for i, layer in enumerate(layers):
        def progress(event: EvalProgress, i: int = i) -> None:
            if on_progress is not None:
                on_progress(EvalProgress(done=i * event.total + event.done, total=len(layers) * event.total,
                                         images=event.images, running=event.running))
        curves.append(estimate_hits(
            model, data, grid, estimator=config.estimator, layer=layer if layer is not None else config.layer,
            seed=config.seed, batch_size=config.batch_size, device=procs.device, dtype=dtype, on_progress=progress,
        ))
    hits = torch.cat([h for h, _ in curves])
    block_tokens = [per_n for _, per_curve in curves for per_n in per_curve]
    if procs.world_size > 1:
        dist.all_reduce(hits, op=dist.ReduceOp.SUM)
    top1, top5 = hits.cpu().unbind(dim=1)
    evaluate_s = time.perf_counter() - began

    images = len(used)
    frame = pl.DataFrame(
        {
            "tokens": grid * len(layers),
            "accuracy": [100.0 * h / images for h in top1.tolist()],
            "top5": [100.0 * h / images for h in top5.tolist()],
            "images": [images] * len(grid) * len(layers),
            "correct": top1.tolist(),
            "correct_top5": top5.tolist(),
            "block_tokens": block_tokens,
            "layer": [layer for layer in layers for _ in grid],
        },
        schema=FRAME_SCHEMA,
    )
    skipped = [SkippedImage(image=r.name, reason=skipped_names[r.name]) for r in listing.records if r.name in skipped_names]
    meta = AccuracyMeta(
        model=config.model, num_tokens=g.num_tokens, num_prefix=g.num_prefix, num_blocks=g.num_blocks,
        embed_dim=g.embed_dim, dtype=dtype_name, grid=grid, estimator=config.estimator,
        img_size=list(g.input_size[1:]), img_size_option=config.img_size,
        layer=layers[0], layers=layers if takes_layer(config.estimator) else None, seed=config.seed, weights=source,
        weights_file=str(Path(config.checkpoint).resolve()) if config.checkpoint else None,
        weights_sha256=weights_sha, data=listing.source, num_images=images, num_classes=listing.num_classes,
        limit=config.limit, images_available=listing.available, skipped=skipped,
        images_sha256=hashlib.sha256("\n".join(used).encode()).hexdigest(), images=used,
        preprocessing={k: list(v) if isinstance(v, tuple) else v for k, v in preprocess.data_config.items()},
        batch_size=config.batch_size, device_type=procs.device.type,
        **({"command": config.command} if config.command is not None else {}),
    )
    return AccuracyRun(frame=frame, meta=meta, decode_s=decode_s, evaluate_s=evaluate_s, local_images=len(data))


def accuracy_stem(meta: AccuracyMeta) -> str:
    """The file stem of an accuracy profile: model, dtype, estimator (and POMT's layer), data set."""
    estimator = meta.estimator
    if takes_layer(meta.estimator):
        layers = meta.layers or [meta.layer]
        estimator += f"-layer{layers[0]}" if len(layers) == 1 else "-layers" + "-".join(map(str, layers))
    data_name = Path(meta.data).name if meta.data != "digits" else "digits"
    return output_stem("accuracy", meta.model, dtype=meta.dtype, img_size=meta.img_size_option,
                       extra=(estimator, data_name))


def write_accuracy(run: AccuracyRun, output_dir: str | Path) -> tuple[Path, Path]:
    """Write the profile (Parquet) and its plot (PNG) as one set (both or neither); returns both paths."""
    paths = write_set(output_dir, accuracy_stem(run.meta), {
        "parquet": lambda tmp: write_profile(tmp, run.frame, run.meta),
        "png": lambda tmp: plot_accuracy(run.frame, tmp, title=describe(run.meta)),
    })
    return paths["parquet"], paths["png"]


def describe(meta: AccuracyMeta) -> str:
    """One line naming the model, estimator, data and image count."""
    estimator = f"{meta.estimator} estimator"
    if takes_layer(meta.estimator):
        layers = meta.layers or [meta.layer]
        estimator = f"{get_method(meta.estimator).title} at layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"
    data_name = "digits (held out)" if meta.data == "digits" else Path(meta.data).name
    return f"{meta.model}, {estimator}, {data_name}: {meta.num_images} images, {meta.dtype}"
