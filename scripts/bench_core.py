"""Benchmark of the pruning core: each method against the unpatched model and its ideal.

The ideal of a method is the unpatched model's own sub-layers run at the token counts the
method produces (tokens dropped by slicing, so choosing and merging tokens cost nothing).
Variants are timed in interleaved rounds within one process, so ratios compare like with
like. Prints a table per (batch size, dtype).

    python scripts/bench_core.py --model deit_small_patch16_224 --batch-size 1,4,64,256 \
        --dtype float16,float32 --device cuda

``--tome-before FILE`` adds a variant ``tome(before)``: ToMe with the matching and merging
functions of another version of ``pomt_cli/pruning/tome.py`` (e.g. one checked out with
``git show REV:src/pomt_cli/pruning/tome.py > FILE``), timed in the same rounds as ``tome``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import platform
import statistics
import types

import timm
import torch
from rich.console import Console
from rich.table import Table
from torch.utils import benchmark

from pomt_cli.pruning import apply, forward_ideal, patch, planned_token_counts, remove, tome

#: The ToMe module the patched blocks call (swapped for ``tome(before)``).
CURRENT_TOME = tome


def load_tome(path: str) -> types.SimpleNamespace:
    """Another version's ``bipartite_matching`` and ``merge``, adapted to today's call."""
    spec = importlib.util.spec_from_file_location("tome_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = module.bipartite_matching.__code__.co_varnames[: module.bipartite_matching.__code__.co_argcount]

    def matching(metric, r, num_prefix, class_token=True):
        if "class_token" in params:
            return module.bipartite_matching(metric, r, num_prefix, class_token)
        return module.bipartite_matching(metric, r, num_prefix)

    return types.SimpleNamespace(bipartite_matching=matching, merge=module.merge)


def variants(model: torch.nn.Module, settings: dict[str, dict],
             tome_before: types.SimpleNamespace | None) -> dict[str, tuple[str, dict, list[int]]]:
    """name -> (method, setting, planned counts) for each method, with its ideal."""
    out: dict[str, tuple[str, dict, list[int]]] = {"none": ("none", {}, [])}
    for method, setting in settings.items():
        counts = planned_token_counts(apply(model, method, **setting))
        remove(model)
        out[method] = (method, setting, counts)
        if method == "tome" and tome_before is not None:
            out["tome(before)"] = ("tome-before", setting, counts)
        out[f"ideal({method})"] = ("ideal", setting, counts)
    return out


def timed(model, images, method: str, setting: dict, counts: list[int], tome_before=None):
    """A zero-argument callable that runs one forward pass of the variant."""
    if method == "ideal":
        return lambda: forward_ideal(model, images, counts)
    if method == "tome-before":
        apply(model, "tome", **setting)
        patch.tome = tome_before  # restored after the variant is timed
        return lambda: model(images)
    apply(model, method, **setting)
    return lambda: model(images)


def run(model_name: str, batch: int, dtype: torch.dtype, device: str, rounds: int, min_time: float,
        settings: dict[str, dict], tome_before: types.SimpleNamespace | None = None) -> dict[str, float]:
    model = timm.create_model(model_name, pretrained=False).eval().to(device=device, dtype=dtype)
    c, h, w = model.pretrained_cfg["input_size"]
    images = torch.randn(batch, c, h, w, device=device, dtype=dtype)
    samples: dict[str, list[float]] = {}
    table = variants(model, settings, tome_before)
    with torch.inference_mode():
        for _ in range(rounds):
            for name, (method, setting, counts) in table.items():
                fn = timed(model, images, method, setting, counts, tome_before)
                try:
                    for _ in range(3):
                        fn()  # warm-up
                    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time)
                finally:
                    patch.tome = CURRENT_TOME
                    remove(model)
                samples.setdefault(name, []).append(m.median * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch-size", default="1,4,64,256")
    parser.add_argument("--dtype", default="float16,float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pomt-r", type=int, default=56)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--tome-r", type=int, default=8)
    parser.add_argument("--topk-r", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
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
    console = Console()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    console.print(
        f"{args.model}, random weights, device {args.device} ({device_name}), torch {torch.__version__}, "
        f"timm {timm.__version__}, {dt.date.today().isoformat()}; median of {args.rounds} interleaved rounds"
    )
    for dtype_name in args.dtype.split(","):
        dtype = getattr(torch, dtype_name)
        for batch in (int(b) for b in args.batch_size.split(",")):
            ms = run(args.model, batch, dtype, args.device, args.rounds, args.min_time, settings, tome_before)
            table = Table(title=f"batch {batch}, {dtype_name}")
            for col in ("variant", "ms", "vs none", "vs its ideal"):
                table.add_column(col, justify="right" if col != "variant" else "left")
            for name, value in ms.items():
                ideal = ms.get(f"ideal({name})") or (ms.get("ideal(tome)") if name == "tome(before)" else None)
                table.add_row(
                    name,
                    f"{value:.3f}",
                    f"{value / ms['none'] - 1:+.1%}",
                    f"{value / ideal - 1:+.1%}" if ideal else "",
                )
            console.print(table)


if __name__ == "__main__":
    main()
