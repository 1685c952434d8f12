"""The workload of a latency profile (proxy or POMT model) and profile_latency over the grid."""

from __future__ import annotations

from dataclasses import replace

import polars as pl
import torch
from torch import nn

from pomt_cli.errors import PomtError
from pomt_cli.measure.grid import GridProgress, LatencySettings, ProgressFn, run_grid, sort_profile, with_layer
from pomt_cli.measure.runtimes import KeptTokens, Prepared, Runtime, prepare, weights_digest
from pomt_cli.measure.timing import Measurement, Task, is_out_of_memory, measure, release_memory
from pomt_cli.models import vit_geometry
from pomt_cli.options import Dtype, check_layers
from pomt_cli.pruning import apply, remove


def kept_patches(num_patches: int, kept: int, seed: int) -> torch.Tensor:
    """(kept,) sorted random indices into the patch tokens, the same for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_patches, generator=generator)[:kept].sort().values


def profile_latency(
    model: nn.Module,
    settings: LatencySettings,
    *,
    device: torch.device,
    previous: pl.DataFrame | None = None,
    progress: ProgressFn | None = None,
) -> pl.DataFrame:
    """The latency profile of ``model`` on ``device``: one row per (layer, batch size, n).

    The model is moved to ``device`` and ``settings.dtype``. Points already in
    ``previous`` are not measured again. With the ``pomt`` workload each layer of
    ``settings.layers`` is one curve, measured in turn by the same engine (about one proxy
    profile each); progress events then count over all layers and carry the whole
    profile so far. The model is left unpatched.

    Each point's workload runs in ``settings.runtime`` (:func:`pomt_cli.measure.runtimes.prepare`):
    with compile or onnxruntime it is made ready once per point (an ``export`` or
    ``compile`` progress event first) and kept for the later visits.

    Returns:
        A frame of :data:`FILE_SCHEMA` (``layer`` null for the proxy), sorted by
        :func:`sort_profile`.

    Raises:
        PomtError: the model is not a supported ViT, the grid does not fit it, a layer is
            out of range, the model itself does not fit in the device's memory, or CUDA
            graphs without CUDA.
    """
    layers: list[int | None] = [None]
    if settings.workload == "pomt":
        g = vit_geometry(model)
        if not settings.layers:
            raise PomtError("the pomt workload needs at least one layer: give --layer L[,L...]")
        check_layers(settings.layers, g.num_blocks, g.name)
        layers = list(settings.layers)
    if previous is not None and "layer" not in previous.columns:
        previous = with_layer(previous, None)
    finished: list[pl.DataFrame] = []
    digest = None
    if settings.runtime is Runtime.onnxruntime:
        digest = weights_digest(model.to(dtype=Dtype(settings.dtype).torch))
    per_layer = len(settings.points()) * settings.passes
    offset = 0
    for i, layer in enumerate(layers):
        earlier = None
        if previous is not None:
            earlier = previous.filter(pl.col("layer").is_null() if layer is None else pl.col("layer") == layer)
        callback = None
        if progress is not None:
            def callback(event: GridProgress, layer=layer, i=i, done_before=list(finished)) -> None:
                frame = None
                if event.frame is not None:
                    frame = sort_profile(pl.concat([*done_before, with_layer(event.frame, layer)]))
                left = per_layer * (len(layers) - i - 1)
                progress(GridProgress(event.phase, event.batch_size, event.tokens, offset + event.done,
                                      offset + event.total + left, event.measurement, frame, layer))
        frame = _profile_curve(model, settings, device=device, previous=earlier, progress=callback, layer=layer,
                               weights=digest)
        finished.append(with_layer(frame, layer))
        offset += per_layer if earlier is None else max(0, per_layer - earlier.height * settings.passes)
    return sort_profile(pl.concat(finished))


def check_workload(model: nn.Module, settings: LatencySettings, *, device: torch.device) -> None:
    """Refuse, before anything is measured or written, a workload that ``settings.runtime`` cannot run.

    The most pruned point of the first curve (the smallest n, the first layer) is made
    ready once at the first batch size: compile captures it as one graph (with the
    ``eager`` backend: capture without code generation), onnxruntime exports and checks it
    into the cache, where the profile finds it again. Eager needs no check. The model is
    left unpatched.

    Raises:
        PomtError: the workload does not compile as one graph, or does not export.
    """
    if settings.runtime is Runtime.eager:
        return
    g = vit_geometry(model)
    dtype = Dtype(settings.dtype).torch
    model = model.eval().to(device=device, dtype=dtype)
    batch_size, tokens = settings.batch_sizes[0], min(settings.grid)
    generator = torch.Generator().manual_seed(settings.seed)
    x = torch.randn(batch_size, *g.input_size, generator=generator).to(device=device, dtype=dtype)
    options = settings.runtime_options()
    if settings.runtime is Runtime.compile:
        options = replace(options, compile_backend="eager", compile_warmup=1)
    try:
        if settings.workload == "pomt" and settings.layers:
            layer, r = settings.layers[0], g.num_tokens - tokens
            module = remove(model) if r == 0 else apply(model, "pomt", r=r, layer=layer)
            label = "none" if r == 0 else f"pomt r={r} @{layer}"
        else:
            keep = kept_patches(g.num_patches, tokens - g.num_prefix, settings.seed * 100_003 + tokens).to(device)
            module, label = KeptTokens(model, keep), f"proxy n={tokens}"
        weights = weights_digest(model) if settings.runtime is Runtime.onnxruntime else None
        prepare(module, x, settings.runtime, label=label, weights=weights, options=options)
    finally:
        remove(model)


def _profile_curve(
    model: nn.Module,
    settings: LatencySettings,
    *,
    device: torch.device,
    previous: pl.DataFrame | None,
    progress: ProgressFn | None,
    layer: int | None,
    weights: str | None = None,
) -> pl.DataFrame:
    """One curve: the proxy (``layer`` None) or POMT pruning N - n tokens in block ``layer``.

    ``weights`` is the model's :func:`~pomt_cli.measure.runtimes.weights_digest` (it keys
    the ONNX cache).
    """
    g = vit_geometry(model)
    if settings.cuda_graphs and device.type != "cuda":
        raise PomtError(f"CUDA graphs need a CUDA device, but the torch device is {device}: leave out --cuda-graphs")
    bad = [n for n in settings.grid if not g.num_prefix < n <= g.num_tokens]
    if bad:
        raise PomtError(f"token counts {bad[:5]} do not fit {g.describe()}: use n in {g.num_prefix + 1}..{g.num_tokens}")
    dtype = Dtype(settings.dtype).torch
    try:
        model = model.eval().to(device=device, dtype=dtype)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise PomtError(f"{g.name} does not fit in the memory of {device}") from None
        raise
    images: dict[int, torch.Tensor] = {}
    runtime = settings.runtime
    options = settings.runtime_options()
    # Compiled and exported workloads do not change with later patches: one per point.
    ready: dict[tuple[int, int], Prepared] = {}
    seen = {"done": 0, "total": len(settings.points()) * settings.passes}

    def heard(event: GridProgress) -> None:
        seen.update(done=event.done, total=event.total)
        progress(event)

    def prepare_point(model: nn.Module, x: torch.Tensor, tokens: int, keep: torch.Tensor,
                       batch_size: int) -> Prepared:
        if layer is None:
            module, label = KeptTokens(model, keep), f"proxy n={tokens}"
        else:
            # R = 0 is the unpruned model itself, as it would be deployed.
            r = g.num_tokens - tokens
            module = remove(model) if r == 0 else apply(model, "pomt", r=r, layer=layer)
            label = "none" if r == 0 else f"pomt r={r} @{layer}"
        if runtime is Runtime.eager:
            return prepare(module, x, runtime)
        if progress is not None:
            phase = "export" if runtime is Runtime.onnxruntime else "compile"
            progress(GridProgress(phase, batch_size, tokens, seen["done"], seen["total"], layer=layer))
        prepared = prepare(module, x, runtime, label=label, weights=weights, options=options)
        ready[(batch_size, tokens)] = prepared
        return prepared

    def measure_point(batch_size: int, tokens: int, prior: list[float]) -> Measurement:
        try:
            if batch_size not in images:
                generator = torch.Generator().manual_seed(settings.seed)
                cpu = torch.randn(batch_size, *g.input_size, generator=generator)
                images[batch_size] = cpu.to(device=device, dtype=dtype)
            keep = kept_patches(g.num_patches, tokens - g.num_prefix, settings.seed * 100_003 + tokens).to(device)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            failed = True
        else:
            failed = False
        task = Task("proxy" if layer is None else f"pomt @{layer}", g.name, batch_size, tokens, settings.dtype)
        if failed:
            release_memory(device)
            mode = "cuda_graph" if settings.cuda_graphs else "eager"
            return Measurement.out_of_memory("inputs do not fit", mode=mode, rel_precision=settings.rel_precision,
                                             task=task)
        x = images[batch_size]
        prepared = ready.get((batch_size, tokens))
        if prepared is None:
            prepared = prepare_point(model, x, tokens, keep, batch_size)
        with torch.inference_mode():
            return measure(
                prepared.fn,
                device=device,
                rel_precision=settings.rel_precision,
                budget_s=settings.budget_s / settings.passes,
                min_samples=-(-settings.min_samples // settings.passes),
                # Caches for this shape were warmed on the first visit; one call re-primes them.
                warmup=settings.warmup if not prior else min(1, settings.warmup),
                cuda_graphs=settings.cuda_graphs,
                prior_ms=prior,
                task=task,
            )

    # The first calls of a process are slow (allocator, kernel selection, caches, clock
    # ramp-up): one untimed-for-the-record measurement per batch size absorbs them, so
    # that the first grid points visited are not their victims.
    for batch_size in settings.batch_sizes:
        if previous is None or previous.filter(pl.col("batch_size") == batch_size).height < len(settings.grid):
            measure_point(batch_size, max(settings.grid), [])

    try:
        return run_grid(
            settings.points(),
            measure_point,
            seed=settings.seed,
            passes=settings.passes,
            spike_tol=settings.spike_tol,
            remeasure_rounds=settings.remeasure_rounds,
            previous=previous,
            progress=None if progress is None else heard,
            point_budget_s=settings.budget_s,
        )
    finally:
        remove(model)
