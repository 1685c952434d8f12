"""The accuracy evaluation: hits per kept-token count, over the processes, into a profile."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pomt_cli import versions
from pomt_cli.accuracy.data import (ClassOrder, LabelledImages, Listing, Preprocess, check_classes, count_correct,
                                    list_images, load_images)
from pomt_cli.accuracy.distributed import Processes, gather
from pomt_cli.accuracy.estimators import accuracy_grid, random_patch_order, reduction
from pomt_cli.errors import PomtError
from pomt_cli.formats.accuracy import AccuracyMeta, DuplicateImage, Estimator, FRAME_SCHEMA, RANDOM, SkippedImage, accuracy_stem, estimator_method, takes_layer
from pomt_cli.formats.common import write_profile
from pomt_cli.formats.outputs import write_set
from pomt_cli.models import create_model, state_dict_sha256, vit_geometry, weights_source
from pomt_cli.options import Dtype, TokenRange, check_layers
from pomt_cli.plots import plot_accuracy
from pomt_cli.pruning import apply, forward_kept, geometry, planned_token_counts, remove
from pomt_cli.pruning.geometry import TokenGeometry
from pomt_cli.pruning.registry import get as get_method


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


class EstimateConfig(BaseModel):
    """The settings of one accuracy estimate, typed (``pomt estimate-accuracy`` parses its options into them)."""

    model_config = ConfigDict(protected_namespaces=(), extra="forbid")

    model: str
    data: str
    pretrained: bool = False
    checkpoint: Path | None = None
    allow_random_weights: bool = False
    img_size: int | None = None
    limit: int | None = None
    class_order: ClassOrder | None = Field(None, description="how class folders are numbered (None: both orders agree)")
    tokens: TokenRange | None = Field(None, description="the kept-token grid (default: every n the estimator reaches)")
    estimator: Estimator = "random"
    layer: int = 3
    layers: list[int] | None = Field(None, description="POMT's blocks, one curve each (default: [layer])")
    seed: int = 0
    batch_size: int = Field(64, ge=1)
    dtype: Dtype = Dtype.float32
    workers: int | None = Field(None, ge=1)
    command: str | None = Field(None, description="the command line recorded in the profile (default: this process's)")


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
    versions.require_dtype_on(procs.device, dtype)
    listing: Listing = list_images(config.data, limit=config.limit, class_order=config.class_order)
    model, source = _model_for(config)
    check_classes(model, listing, config.data)
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
    skipped_names = {name: reason for part in gather(procs, data.skipped) for name, reason in part}
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
        dist.all_reduce(procs.hold(hits), op=dist.ReduceOp.SUM)
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
        duplicates=[DuplicateImage(image=name, counted_as=kept) for name, kept in listing.duplicates],
        images_sha256=hashlib.sha256("\n".join(used).encode()).hexdigest(), images=used,
        preprocessing={k: list(v) if isinstance(v, tuple) else v for k, v in preprocess.data_config.items()},
        batch_size=config.batch_size, device_type=procs.device.type,
        **({"command": config.command} if config.command is not None else {}),
    )
    return AccuracyRun(frame=frame, meta=meta, decode_s=decode_s, evaluate_s=evaluate_s, local_images=len(data))


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
