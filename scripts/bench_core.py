"""Benchmark of the pruning core: each method against the unpatched model and its ideal.

The ideal of a method is the unpatched model's own sub-layers run at the token counts the
method produces (tokens dropped by slicing, so choosing and merging tokens cost nothing).
``pomt(lean)`` and ``pomt(explicit)`` force POMT's two ways of scoring (log-probabilities
from fused attention, or the full softmax matrix as the paper's code); ``pomt`` is the
default, which picks one by device and dtype. Variants are timed with pomt's
timing engine in interleaved rounds within one process (a fresh shuffled order each
round, samples pooled over rounds), so ratios compare like with like. Prints a table per
(batch size, dtype, timing mode).

    python scripts/bench_core.py --model deit_small_patch16_224 --batch-size 1,4,64,256 \
        --dtype float16,float32 --device cuda --cuda-graphs both

``--tome-before FILE`` adds a variant ``tome(before)``: ToMe with the matching and merging
functions of another version of ``pomt_cli/pruning/tome.py`` (e.g. one checked out with
``git show REV:src/pomt_cli/pruning/tome.py > FILE``), timed in the same rounds as ``tome``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import random
import types
from collections.abc import Callable

import timm
import torch
from rich.console import Console
from rich.table import Table

from pomt_cli.devices.torch_device import device_name
from pomt_cli.pruning import apply, forward_ideal, patch, planned_token_counts, remove, tome
from pomt_cli.measure.timing import Measurement, Task, measure, release_memory

DEFAULT_SETTINGS = {"pomt": {"r": 56, "layer": 3}, "tome": {"r": 8}, "topk": {"r": 8}}

#: The ToMe module the patched blocks call (swapped for ``tome(before)`` while it is timed).
CURRENT_TOME = tome


def load_tome(path: str) -> types.SimpleNamespace:
    """Another version's ``bipartite_matching`` and ``merge``, adapted to today's call."""
    spec = importlib.util.spec_from_file_location("tome_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.bipartite_matching.__code__
    params = code.co_varnames[: code.co_argcount]

    def matching(metric, r, num_prefix, class_token=True):
        if "class_token" in params:
            return module.bipartite_matching(metric, r, num_prefix, class_token)
        return module.bipartite_matching(metric, r, num_prefix)

    return types.SimpleNamespace(bipartite_matching=matching, merge=module.merge)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One timed forward pass: a method with its setting, or the ideal of its token counts."""

    name: str
    method: str  # none, pomt, tome, topk, ideal
    setting: dict
    counts: list[int]
    scoring: str | None = None  # POMT's scoring forced to "lean" or "explicit"; None: the default
    tome_module: types.SimpleNamespace | None = None  # another version of tome.py (tome(before))


def variants(model: torch.nn.Module, settings: dict[str, dict],
             tome_before: types.SimpleNamespace | None = None) -> list[Variant]:
    """none, then each method followed by its ideal (and POMT's explicit block after POMT,
    ToMe's other version after ToMe)."""
    out = [Variant("none", "none", {}, [])]
    for method, setting in settings.items():
        counts = planned_token_counts(apply(model, method, **setting))
        remove(model)
        out.append(Variant(method, method, setting, counts))
        if method == "pomt":
            out += [Variant(f"pomt({s})", method, setting, counts, scoring=s) for s in ("lean", "explicit")]
        if method == "tome" and tome_before is not None:
            out.append(Variant("tome(before)", method, setting, counts, tome_module=tome_before))
        out.append(Variant(f"ideal({method})", "ideal", setting, counts))
    return out


def prepare(model: torch.nn.Module, images: torch.Tensor, variant: Variant) -> Callable[[], torch.Tensor]:
    """Patch ``model`` for ``variant``; a zero-argument callable that runs one forward pass."""
    remove(model)
    if variant.method == "ideal":
        return lambda: forward_ideal(model, images, variant.counts)
    apply(model, variant.method, **variant.setting)
    if variant.tome_module is not None:
        patch.tome = variant.tome_module  # time_variants puts CURRENT_TOME back
    if variant.scoring is not None:
        for blk in model.blocks:
            blk.pomt_plan = dataclasses.replace(blk.pomt_plan, scoring=variant.scoring)
    return lambda: model(images)


def time_variants(model_name: str, batch: int, dtype: torch.dtype, device: str, *, cuda_graphs: bool = False,
                  rounds: int = 3, budget_s: float = 0.2, settings: dict[str, dict] | None = None,
                  model_kwargs: dict | None = None, seed: int = 0,
                  tome_before: types.SimpleNamespace | None = None) -> dict[str, Measurement]:
    """Each variant's time at one batch size and dtype, in ``rounds`` interleaved rounds (samples pooled)."""
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, **(model_kwargs or {})).eval().to(device=device,
                                                                                              dtype=dtype)
    c, h, w = model.patch_embed.proj.in_channels, *model.patch_embed.img_size
    table = variants(model, settings or DEFAULT_SETTINGS, tome_before)
    parts: dict[str, list[Measurement]] = {v.name: [] for v in table}
    rng = random.Random(seed)
    try:
        images = torch.randn(batch, c, h, w, device=device, dtype=dtype)
        with torch.inference_mode():
            for _ in range(rounds):
                order = list(table)
                rng.shuffle(order)
                for variant in order:
                    try:
                        fn = prepare(model, images, variant)
                        task = Task(variant.name, model_name, batch, dtype=str(dtype).removeprefix("torch."))
                        parts[variant.name].append(measure(fn, device=device, budget_s=budget_s,
                                                           rel_precision=0.005, min_samples=10,
                                                           cuda_graphs=cuda_graphs, task=task))
                    finally:
                        patch.tome = CURRENT_TOME
    finally:
        remove(model)
        del model
        release_memory(torch.device(device))
    return {name: Measurement.pool(ms) for name, ms in parts.items()}


def ratios(ms: dict[str, Measurement]) -> dict[str, dict[str, float | None]]:
    """Per variant: median ms, change against none, and the ratio to its ideal (None where absent)."""
    base = ms["none"].median_ms
    out = {}
    for name, m in ms.items():
        method = name.split("(")[0]
        ideal = ms.get(f"ideal({method})") if not name.startswith("ideal") else None
        value = m.median_ms
        out[name] = {
            "ms": value,
            "p10_ms": m.p10_ms,
            "p90_ms": m.p90_ms,
            "samples": m.samples,
            "status": m.status,
            "vs_none": value / base if value and base else None,
            "vs_ideal": value / ideal.median_ms if value and ideal and ideal.median_ms else None,
        }
    return out


def render(title: str, rows: dict[str, dict[str, float | None]]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("variant", "ms", "vs none", "vs its ideal"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for name, row in rows.items():
        table.add_row(
            name,
            f"{row['ms']:.3f}" if row["ms"] else row["status"],
            f"{row['vs_none'] - 1:+.1%}" if row["vs_none"] else "",
            f"{row['vs_ideal']:.3f}x" if row["vs_ideal"] else "",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch-size", default="1,4,64,256")
    parser.add_argument("--dtype", default="float16,float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cuda-graphs", choices=("no", "yes", "both"), default="no")
    parser.add_argument("--pomt-r", type=int, default=56)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--tome-r", type=int, default=8)
    parser.add_argument("--topk-r", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; samples are pooled")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per variant per round")
    parser.add_argument("--methods", default="pomt,tome,topk", help="methods to time, comma-separated")
    parser.add_argument("--tome-before", metavar="FILE", help="also time ToMe with this version of tome.py")
    args = parser.parse_args()
    settings = {
        "pomt": {"r": args.pomt_r, "layer": args.layer},
        "tome": {"r": args.tome_r},
        "topk": {"r": args.topk_r},
    }
    settings = {m: settings[m] for m in args.methods.split(",")}
    tome_before = load_tome(args.tome_before) if args.tome_before else None
    console = Console(highlight=False)
    console.print(
        f"{args.model}, random weights, {device_name(torch.device(args.device))}, torch {torch.__version__}, "
        f"timm {timm.__version__}, {dt.date.today().isoformat()}; {args.rounds} interleaved rounds, samples pooled"
    )
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.cuda_graphs]
    for graphs in modes:
        for dtype_name in args.dtype.split(","):
            for batch in (int(b) for b in args.batch_size.split(",")):
                ms = time_variants(args.model, batch, getattr(torch, dtype_name), args.device, cuda_graphs=graphs,
                                   rounds=args.rounds, budget_s=args.min_time, settings=settings,
                                   tome_before=tome_before)
                mode = "CUDA graphs" if graphs else "eager"
                console.print(render(f"batch {batch}, {dtype_name}, {mode}", ratios(ms)))


if __name__ == "__main__":
    main()
