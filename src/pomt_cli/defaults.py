"""The defaults and limits of the settings that ``--help`` shows: the model, seeds, budgets, rounds.

Standard library only, so that the command line builds its options without importing
torch. Each value is defined here once; the library's modules import it and keep their
names for it (``pipelines.BUDGET_S``, ``selection.DEFAULT_ALPHA``, ``models.DEFAULT_MODEL``...).
"""

from __future__ import annotations

#: The paper's model: what ``--model`` means when it is left out.
DEFAULT_MODEL = "deit_small_patch16_224"
#: The help of every ``--model`` option (the default named once, where it wraps at 80 columns).
MODEL_HELP = f"timm model name, or digits-vit (bundled, trained). Default: {DEFAULT_MODEL}, the paper's."

#: The most timed calls of one measurement (``--min-samples`` takes at most this).
MAX_SAMPLES = 10_000

#: Seconds of timing per grid point at most (profile).
BUDGET_S = 1.0
#: ``pomt profile --quick``: seconds per point, untimed calls per point, passes. On an H200
#: at batch 64 float32 a full profile took 25-26 s so, against 112-119 s by default, and
#: listed 5-10 of the 15 steps that the default profiles list (docs/PERFORMANCE.md).
QUICK_BUDGET_S, QUICK_WARMUP, QUICK_PASSES = 0.1, 1, 2
#: Interleaved rounds of refine and bench, and their seconds of timing per setting and
#: round at most. Six rounds of half a second give the interval of a ratio from the rounds
#: (:mod:`pomt_cli.measure.ratio`) about half the width of three rounds of a second, in
#: the same time (scripts/stats_check.py, table 5).
ROUNDS = 6
ROUND_BUDGET_S = 0.5
#: Seconds per profile point in the demo (refine: twice as long per setting and round; bench: four times
#: as long per method and round).
DEMO_BUDGET_S = 0.25

#: compute-r's utility weight of latency (1 weighs only latency, 0 only accuracy).
DEFAULT_ALPHA = 0.5
#: Pruned candidates per batch size that ``pomt refine`` measures again by default.
REFINE_CANDIDATES = 3
