"""The ``pomt estimate-accuracy`` pipeline: accuracy against kept tokens, alone or under torchrun."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from pomt_cli.accuracy.distributed import processes
from pomt_cli.accuracy.evaluate import AccuracyRun, EstimateConfig, run_estimate, write_accuracy
from pomt_cli.formats.outputs import check_output_dir
from pomt_cli.pipelines.common import SILENT, Reporter, Settings

class AccuracySettings(Settings):
    """The settings of one accuracy profile (``pomt estimate-accuracy``): the estimate and where it runs."""

    estimate: EstimateConfig
    torch_device: str = Field("auto", description="auto, cpu, cuda, mps; under torchrun each rank its GPU")
    output_dir: Path = Path("runs")


@dataclass(frozen=True)
class AccuracyResult:
    """An accuracy profile and the files written (``profile``: Parquet, ``plot``: PNG)."""

    run: AccuracyRun
    world_size: int
    profile: Path
    plot: Path


def estimate_accuracy(settings: AccuracySettings, reporter: Reporter = SILENT) -> AccuracyResult | None:
    """Estimate accuracy against kept tokens on labelled images, alone or under torchrun.

    Returns None in every process of a torchrun group but the first, which writes the files.

    Raises:
        PomtError: bad settings, data or weights.
    """
    check_output_dir(settings.output_dir)
    config = settings.estimate
    if settings.command is not None and config.command is None:
        config = config.model_copy(update={"command": settings.command})
    with processes(settings.torch_device) as procs:
        heard = reporter if procs.is_main else SILENT
        run = run_estimate(config, procs, on_decode=heard.decoding, on_progress=heard.evaluating)
        if not procs.is_main:
            return None
        parquet, png = write_accuracy(run, settings.output_dir)
        return AccuracyResult(run=run, world_size=procs.world_size, profile=parquet, plot=png)
