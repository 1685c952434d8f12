"""The ``pomt bench`` pipeline: the model unpruned and with each method, timed in interleaved rounds; the report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from pydantic import Field

from pomt_cli.accuracy.data import ClassOrder, load_labelled
from pomt_cli.bench import (
    BASELINE,
    BenchPlan,
    BenchTiming,
    Prediction,
    accuracy_of_methods,
    fit_settings,
    reference_runtime,
    runtimes_frame,
    time_runtimes,
)
from pomt_cli.defaults import ROUND_BUDGET_S, ROUNDS
from pomt_cli.devices.clocks import ClockRestoreError, locked_clocks
from pomt_cli.devices.torch_device import device_name, set_cpu_threads
from pomt_cli.errors import PomtError
from pomt_cli.formats.bench import BenchMeta, MethodSetting, write_bench
from pomt_cli.formats.outputs import check_output_dir, output_stem
from pomt_cli.formats.report import Choice, Report, read_report
from pomt_cli.measure.runtimes import Runtime
from pomt_cli.models import DEFAULT_MODEL, create_model, state_dict_sha256, vit_geometry, weights_source
from pomt_cli.options import SEED_MAX, Dtype
from pomt_cli.pipelines.common import (
    DEFAULT_LAYER,
    SILENT,
    Reporter,
    RuntimeSettings,
    preset_and_device,
    raise_unrestored,
    recorded_command,
    unrestored_state,
)
from pomt_cli.pruning import method_names, pomt
from pomt_cli.pruning.geometry import TokenGeometry
from pomt_cli.pruning.registry import get as get_method

class BenchSettings(RuntimeSettings):
    """The settings of ``pomt bench``: the methods, their settings, the timing and the data.

    ``runtimes`` times several runtimes side by side in the same rounds; when empty,
    ``runtime`` alone runs.
    """

    runtimes: list[Runtime] = Field(default_factory=list, description="runtimes side by side (empty: runtime)")

    model: str = DEFAULT_MODEL
    methods: list[str] = Field(default_factory=list, description="default: every method, POMT when r is given")
    r: int | None = Field(None, description="POMT's R for every batch size")
    r_from: Path | None = Field(None, description="a compute-r report giving R (and the layer) per batch size")
    layer: int | None = None
    method_r: dict[str, int] = Field(default_factory=dict, description="r of methods that take one of their own")
    batch_sizes: list[int] | None = Field(None, min_length=1)
    device: str | None = None
    torch_device: str | None = None
    dtype: Dtype = Dtype.float32
    pretrained: bool = False
    checkpoint: Path | None = None
    allow_random_weights: bool = False
    img_size: int | None = None
    data: str | None = None
    limit: int | None = None
    class_order: ClassOrder | None = None
    eval_batch_size: int = Field(64, ge=1)
    cuda_graphs: bool = False
    rel_precision: float = Field(0.01, gt=0, lt=1)
    budget_s: float = Field(ROUND_BUDGET_S, gt=0, description="seconds per method and round")
    rounds: int = Field(ROUNDS, ge=1)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    threads: int | None = Field(None, ge=1)
    lock_clocks: bool = True
    output_dir: Path = Path("runs")

    def benched_runtimes(self) -> list[Runtime]:
        """The runtimes timed, in the order given.

        Raises:
            PomtError: a runtime named twice.
        """
        runtimes = list(self.runtimes) or [self.runtime]
        twice = next((r for i, r in enumerate(runtimes) if r in runtimes[:i]), None)
        if twice is not None:
            raise PomtError(f"--runtime names {twice.value} twice: give each runtime once")
        return runtimes


@dataclass(frozen=True)
class BenchResult:
    """A bench report and the files written (``csv`` and ``parquet``)."""

    frame: pl.DataFrame
    meta: BenchMeta
    plan: BenchPlan
    choices: dict[int, Choice]
    skipped: list[tuple[str, str]]
    r_from: Path | None
    csv: Path
    parquet: Path
    report_runtime: str | None = None
    #: ``(name, counted_as)`` of the images that folder links showed twice (counted once).
    duplicates: tuple[tuple[str, str], ...] = ()
    #: The device the report's latency profile was measured on (its ``device_name``), where
    #: it is not this bench's: the predictions are that device's.
    report_device: str | None = None


def _from_report() -> list[str]:
    """The methods whose r comes from -r or --r-from (POMT's), with the layer from --layer or the report."""
    return [m for m in method_names() if get_method(m).bench_r is None]


def _r_per_batch(r: int | None, r_from: Path | None, report: Report | None, batch_sizes: list[int] | None,
                 runtimes: Sequence[Runtime] = (Runtime.eager,), compile_backend: str = "inductor"
                 ) -> tuple[dict[int, int] | None, list[int] | None, str | None]:
    """POMT's r for each batch size (from r or ``report``, read from ``r_from``), and the batch sizes to run.

    Raises:
        PomtError: a report whose latency was measured on none of ``runtimes`` (its steps
            belong to that runtime's kernels), or compiled by another backend than
            ``compile_backend``; a report that lacks a batch size asked for.
    """
    if report is None:
        return (None if r is None else {b: r for b in batch_sizes or [1]}), batch_sizes, None
    names = [Runtime(runtime).value for runtime in runtimes]
    if report.runtime not in names:
        given = ",".join(names)
        add = f"bench with --runtime {report.runtime}" if len(names) == 1 else f"add {report.runtime} to --runtime"
        raise PomtError(
            f"--r-from {r_from} chose R from a latency profile measured on {report.runtime}, but this bench runs "
            f"--runtime {given}: {add}, or profile with --runtime {names[0]} and run compute-r again")
    profiled = (report.latency.runtime_info or {}).get("compile_backend")
    if report.runtime == Runtime.compile.value and profiled and profiled != compile_backend:
        raise PomtError(
            f"--r-from {r_from} chose R from a latency profile compiled with backend {profiled}, but this bench "
            f"compiles with {compile_backend}: add --compile-backend {profiled}, or profile with --compile-backend "
            f"{compile_backend} and run compute-r again")
    chosen = {c.batch_size: c.R for c in report.choices}
    if batch_sizes is None:
        batch_sizes = sorted(chosen)
    missing = [b for b in batch_sizes if b not in chosen]
    if missing:
        raise PomtError(
            f"--r-from {r_from} gives R for batch size(s) {', '.join(map(str, sorted(chosen)))}, not for "
            f"{', '.join(map(str, missing))}: profile those batch sizes and run compute-r again, or give -r"
        )
    return chosen, batch_sizes, str(Path(r_from).resolve())


def _check_report_fits(r_from: Path, report: Report, geometry: TokenGeometry, dtype: str) -> None:
    """Refuse a report whose R cannot mean the same here: another token geometry or dtype.

    R counts tokens of the profiled model (N = ``report.num_tokens``): on a model built for
    another input size it keeps another n. The predicted ratio belongs to the latency
    profile's dtype, whose kernels differ from another dtype's.

    Raises:
        PomtError: the report's N or p differs from the model's, or its latency dtype from ``dtype``.
    """
    if (report.num_tokens, report.num_prefix) != (geometry.num_tokens, geometry.num_prefix):
        raise PomtError(
            f"--r-from {r_from} chose R for {report.model} with {report.num_tokens} tokens ({report.num_prefix} "
            f"prefix), but the model benched here has {geometry.num_tokens} ({geometry.num_prefix} prefix): give "
            "the --img-size its profiles were measured at, or profile this size and run compute-r again")
    if report.latency.dtype != dtype:
        raise PomtError(
            f"--r-from {r_from} chose R from a latency profile in {report.latency.dtype}, but this bench runs "
            f"--dtype {dtype}: bench with --dtype {report.latency.dtype}, or profile in {dtype} and run compute-r "
            "again (-r R --layer L benches a setting without predictions)")


def _layers_and_choices(r_from: Path | None, report: Report | None, layer: int | None, sizes: list[int],
                        num_blocks: int, model: str) -> tuple[dict[int, int], dict[int, Choice]]:
    """POMT's layer per batch size (the report's choice, else ``layer``, else 3), and the report's choices.

    Raises:
        PomtError: ``layer`` contradicts the layers a report chose, or a layer the model lacks.
    """
    choices = {}
    if report is not None:
        choices = {b: c for b in sizes if (c := report.choice_for(b)) is not None}
    layers = {}
    for b in sizes:
        chosen = choices[b].layer if b in choices else None
        if chosen is not None and layer is not None and layer != chosen:
            raise PomtError(f"--layer {layer} contradicts --r-from {r_from}, which chose layer {chosen} at batch {b}: "
                            "leave out --layer to bench the report's choice")
        layers[b] = chosen if chosen is not None else (layer if layer is not None else DEFAULT_LAYER)
        if not 0 <= layers[b] < num_blocks:
            source = f"--r-from {r_from} chose layer {chosen} at batch {b}" if chosen is not None else (
                f"--layer {layers[b]} is out of range")
            raise PomtError(f"{source}, but {model} has {num_blocks} blocks (layer 0..{num_blocks - 1}): "
                            + ("run compute-r with profiles of this model" if chosen is not None else
                               "give a layer in that range"))
    return layers, choices


def _predictions(settings: dict[int, list[MethodSetting]], choices: dict[int, Choice],
                 num_tokens: int) -> dict[tuple[int, str], Prediction]:
    """What the report predicts: the chosen POMT setting's ratio to the unpruned model (and the
    profile's ms), and the unpruned model's profile ms where it was measured (no ratio: the reference)."""
    predicted = {}
    for b, choice in choices.items():
        for s in settings[b]:
            if s.method in _from_report() and choice.ratio is not None:
                predicted[(b, s.label)] = Prediction(
                    profile_ms=choice.latency_ms, ratio=choice.ratio, low=choice.latency_ratio_low,
                    high=choice.latency_ratio_high, workload=choice.workload)
            elif s.method == BASELINE and choice.reference_ms is not None and choice.reference_tokens == num_tokens:
                predicted[(b, s.label)] = Prediction(profile_ms=choice.reference_ms, workload=choice.workload)
    return predicted


def bench(settings: BenchSettings, reporter: Reporter = SILENT) -> BenchResult:
    """Time (and evaluate) the model unpruned and with each method, in interleaved rounds; write the report.

    Raises:
        PomtError: bad settings, a report of another model, a setting the model cannot take.
    """
    s = settings
    names, from_report = method_names(), _from_report()
    given_r = s.r is not None or s.r_from is not None
    defaults = [m for m in names if m not in from_report or given_r]
    methods = list(dict.fromkeys([BASELINE, *(s.methods or defaults)]))
    unknown = [m for m in methods if m not in names]
    if unknown:
        raise PomtError(f"unknown --method {unknown[0]!r}: use one of {', '.join(names)}")
    runtimes = s.benched_runtimes()
    s.check_runtime_options(runtimes)
    if s.r is not None and s.r_from is not None:
        raise PomtError("give either -r or --r-from, not both")
    report = read_report(s.r_from, model=s.model) if s.r_from is not None else None
    r_by_batch, sizes, report_path = _r_per_batch(s.r, s.r_from, report, s.batch_sizes, runtimes,
                                                  s.backend)
    sizes = sizes or [1]
    needing = [m for m in methods if m in from_report]
    if needing and r_by_batch is None:
        raise PomtError(f"--method {needing[0]} needs -r R or --r-from REPORT (from `pomt compute-r`)")
    if r_by_batch is not None:
        methods += [m for m in from_report if m not in methods]
    preset, tdev = preset_and_device(s.device, s.torch_device)
    infos = {r.value: s.checked_runtime(tdev, s.dtype.torch, s.cuda_graphs, r) for r in runtimes}
    reference = reference_runtime(runtimes)
    if s.cuda_graphs and tdev.type != "cuda":
        raise PomtError(f"--cuda-graphs needs a CUDA device, but the torch device is {tdev}: leave it out")
    source = weights_source(s.model, pretrained=s.pretrained, checkpoint=s.checkpoint)
    if s.data is not None and source == "random" and not s.allow_random_weights:
        raise PomtError(f"{s.model} would have random weights, which make accuracy meaningless: give --pretrained or "
                        "--checkpoint PATH, leave out --data, or pass --allow-random-weights")
    check_output_dir(s.output_dir)
    if s.threads is not None:
        set_cpu_threads(s.threads)
    net = create_model(s.model, pretrained=s.pretrained, checkpoint=s.checkpoint, img_size=s.img_size)
    weights_sha = state_dict_sha256(net)
    g = vit_geometry(net)
    if report is not None:
        _check_report_fits(s.r_from, report, g, s.dtype.value)
    layers, choices = _layers_and_choices(s.r_from, report, s.layer, sizes, g.num_blocks, s.model)
    report_runtime = report.runtime if report is not None else None

    # POMT's r may differ per batch size: one setting per distinct r.
    planned: dict[int, list[MethodSetting]] = {}
    for b in sizes:
        chosen = []
        for m in methods:
            if m in from_report and b in choices and r_by_batch[b] == 0:
                continue  # the report's answer is the unpruned model: the baseline carries its prediction
            elif m in from_report:
                chosen.append(MethodSetting(method=m, r=r_by_batch[b], layer=layers[b]))
            else:
                chosen.append(MethodSetting(method=m, r=s.method_r.get(m, get_method(m).bench_r)))
        planned[b] = fit_settings(net, chosen)  # checked; ToMe's per-block cap shows in the labels
    plan = BenchPlan(settings=planned, predictions=_predictions(planned, choices, g.num_tokens))
    listing = labelled = None
    if s.data is not None:
        listing, labelled = load_labelled(s.data, net, limit=s.limit, class_order=s.class_order)

    net = net.to(device=tdev, dtype=s.dtype.torch)
    timing = BenchTiming(dtype=s.dtype.torch, cuda_graphs=s.cuda_graphs, rel_precision=s.rel_precision,
                         budget_s=s.budget_s, rounds=s.rounds, seed=s.seed, runtime=runtimes[0],
                         runtime_options=s.runtime_options(s.cuda_graphs))
    unrestored = None
    try:
        with locked_clocks(preset, torch_device=tdev, enabled=s.lock_clocks) as clocks:
            timed = time_runtimes(net, plan.settings, timing, runtimes, device=tdev, on_progress=reporter.timing)
    except ClockRestoreError as exc:  # the timing finished: the report is written, then this raised
        unrestored, clocks = exc, unrestored_state(clocks)
    accuracy = None
    if labelled is not None:
        distinct = plan.distinct()
        reporter.scoring(0, len(distinct))
        done = iter(range(1, len(distinct) + 1))
        accuracy = accuracy_of_methods(net, distinct, labelled, batch_size=s.eval_batch_size, device=tdev,
                                       dtype=s.dtype.torch,
                                       on_done=lambda _: reporter.scoring(next(done), len(distinct)))
    frame = runtimes_frame(plan.settings, timed, runtimes, accuracy, plan.predictions,
                           predicted_runtime=Runtime(report_runtime) if report_runtime else None)
    meta = BenchMeta(
        model=s.model, num_tokens=g.num_tokens, num_prefix=g.num_prefix, img_size=list(g.input_size[1:]),
        img_size_option=s.img_size, num_blocks=g.num_blocks, dtype=s.dtype.value, batch_sizes=sizes, methods=methods,
        settings={str(b): group for b, group in plan.settings.items()}, r_from=report_path, weights=source,
        weights_file=str(Path(s.checkpoint).resolve()) if s.checkpoint else None, weights_sha256=weights_sha,
        data=listing.source if listing else None, num_images=len(labelled) if labelled else None, limit=s.limit,
        skipped_images=len(labelled.skipped) if labelled else None, device_preset=preset.name,
        device_display_name=preset.display_name, device_name=device_name(tdev), torch_device=str(tdev),
        clocks=clocks, timing_mode="cuda_graphs" if s.cuda_graphs else "eager", rel_precision=s.rel_precision,
        budget_s=s.budget_s, rounds=s.rounds, seed=s.seed, num_threads=torch.get_num_threads(),
        runtime=reference.value, runtime_info=infos[reference.value], runtimes=[r.value for r in runtimes],
        runtimes_info=infos, pomt_received=pomt.received_path(tdev, s.dtype.torch) if "pomt" in methods else None,
        **recorded_command(s.command),
    )
    stem = output_stem("bench", s.model, device=preset.name, batch_size=sizes, dtype=s.dtype.value,
                       img_size=s.img_size,
                       extra=(*plan.slugs(), *s.runtime_slug(runtimes), *(["cudagraphs"] if s.cuda_graphs else [])))
    csv, parquet = write_bench(frame, meta, s.output_dir, stem)
    raise_unrestored(unrestored, "the bench report is written", parquet)
    elsewhere = None
    if report is not None and report.latency.device_name and report.latency.device_name != meta.device_name:
        elsewhere = report.latency.device_name
    return BenchResult(frame=frame, meta=meta, plan=plan, choices=choices,
                       skipped=list(labelled.skipped) if labelled else [], r_from=s.r_from, csv=csv, parquet=parquet,
                       report_runtime=report_runtime, report_device=elsewhere,
                       duplicates=listing.duplicates if listing else ())
