"""The pipelines: profile, estimate_accuracy, compute_r, refine, bench and demo; typed settings in, typed results out.

Each pipeline is the one place that sequences the layers below it (models, measurement,
accuracy, selection, file formats) for one command. It takes a pydantic settings object,
returns a result that names every file it wrote, reports progress through a
:class:`Reporter` and never prints. A settings object checks what it can alone when it is
made (a misspelled field, a batch size of 0: pydantic's ``ValidationError``, a
``ValueError``); what needs the model, the files or the device raises
:class:`~pomt_cli.errors.PomtError` when the pipeline runs.

One module per pipeline, named for what it makes (the function is the command's verb):
:mod:`.latency` (``profile``), :mod:`.accuracy` (``estimate_accuracy``), :mod:`.choice`
(``compute_r``), :mod:`.refinement` (``refine``), :mod:`.benchmark` (``bench``) and
:mod:`.demonstration` (``demo``, which calls the others); :mod:`.common` holds what they
share. Every name is imported from here.
"""

from pomt_cli.defaults import BUDGET_S, ROUND_BUDGET_S, ROUNDS
from pomt_cli.pipelines.accuracy import AccuracyResult, AccuracySettings, estimate_accuracy
from pomt_cli.pipelines.benchmark import BenchResult, BenchSettings, bench
from pomt_cli.pipelines.choice import ComputeRResult, ComputeRSettings, compute_r
from pomt_cli.pipelines.common import DEFAULT_LAYER, Reporter
from pomt_cli.pipelines.demonstration import (
    DEMO_BATCH_SIZES,
    DEMO_BUDGET_S,
    DEMO_LAYERS,
    DEMO_TOKENS,
    DemoResult,
    DemoSettings,
    demo,
)
from pomt_cli.pipelines.latency import CHECKPOINT_EVERY_S, ProfileResult, ProfileSettings, profile
from pomt_cli.pipelines.refinement import RefineResult, RefineSettings, refine

__all__ = [
    "BUDGET_S", "CHECKPOINT_EVERY_S", "DEFAULT_LAYER", "DEMO_BATCH_SIZES", "DEMO_BUDGET_S", "DEMO_LAYERS",
    "DEMO_TOKENS", "ROUNDS", "ROUND_BUDGET_S", "AccuracyResult", "AccuracySettings", "BenchResult", "BenchSettings", "ComputeRResult",
    "ComputeRSettings", "DemoResult", "DemoSettings", "ProfileResult", "ProfileSettings", "RefineResult",
    "RefineSettings", "Reporter", "bench", "compute_r", "demo", "estimate_accuracy", "profile", "refine",
]
