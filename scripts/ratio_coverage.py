"""How often does a ratio's interval, measured side by side, cover the ratio? Measured on this device.

Times the unpruned model and POMT settings side by side, as ``pomt refine`` and ``pomt
bench`` do (:func:`pomt_cli.bench.time_methods`: interleaved rounds, samples pooled), many
times in a row. Each run gives each setting's ratio to the unpruned model with two
intervals: ``pooled``, the range over the two pooled intervals of the median (what refine
and bench used before), and ``paired``, :func:`pomt_cli.measure.ratio.paired_ratio`, which
adds the drift between rounds. The table shows how often each interval covers the median
of all runs' ratios (the long-run ratio) and the next run's ratio (what a second command
a moment later would read), and the median width of each. Prints tables; asserts nothing::

    PYTHONPATH=src python scripts/ratio_coverage.py --runs 30 --rounds 6 --budget 0.25

Defaults: the bundled digits model at batch 32 in float32 on the CPU, POMT removing 28,
32 and 36 of its 65 tokens in block 0 (the region ``pomt demo`` chooses from).
"""

from __future__ import annotations

import datetime as dt
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from pomt_cli.bench import BenchTiming, time_methods
from pomt_cli.devices.torch_device import resolve_torch_device
from pomt_cli.errors import PomtError
from pomt_cli.formats.bench import MethodSetting
from pomt_cli.measure.ratio import paired_ratio
from pomt_cli.models import create_model
from pomt_cli.pruning import apply, remove
from pomt_cli.script_args import OneLineParser, number, refuse
from pomt_cli.selection import latency_ratio


def _point(m) -> dict:
    return {"latency_ms": m.median_ms, "ci_low_ms": m.ci_low_ms, "ci_high_ms": m.ci_high_ms}


def run(model: torch.nn.Module, batch: int, rs: list[int], layer: int, runs: int, timing: BenchTiming,
        device: torch.device) -> dict[str, list[dict]]:
    """Per setting, each run's ratio with its pooled and paired intervals."""
    model = model.eval().to(device)
    settings = [MethodSetting(method="none"), *(MethodSetting(method="pomt", r=r, layer=layer) for r in rs)]
    out: dict[str, list[dict]] = {s.label: [] for s in settings[1:]}
    for i in range(runs):
        timed = time_methods(model, {batch: settings}, timing.model_copy(update={"seed": i}), device=device)
        none, _ = timed[(batch, "none")]
        for s in settings[1:]:
            m, _ = timed[(batch, s.label)]
            paired = paired_ratio(m, none)
            if paired is None:  # out of memory
                refuse(f"batch {batch} does not fit on {device} ({(m.error or none.error or '').strip()}): "
                       "give a smaller --batch-size")
            pooled = latency_ratio(_point(m), _point(none))
            out[s.label].append({"ratio": paired.ratio, "pooled": (pooled.low, pooled.high),
                                 "paired": (paired.low, paired.high)})
    return out


def coverage(rows: list[dict], kind: str) -> dict[str, float]:
    """How often ``kind``'s interval covers the long-run ratio and the next run's; its median width."""
    ratios = np.array([r["ratio"] for r in rows])
    truth = float(np.median(ratios))
    bounds = [r[kind] for r in rows]
    usable = [(lo, hi) for lo, hi in bounds if lo is not None and hi is not None]
    covers = np.mean([lo is not None and lo <= truth <= hi for lo, hi in bounds])
    following = [lo is not None and lo <= nxt <= hi for (lo, hi), nxt in zip(bounds[:-1], ratios[1:])]
    return {"truth": truth, "covers": float(covers), "next": float(np.mean(following)) if following else float("nan"),
            "width": float(np.median([hi - lo for lo, hi in usable])) if usable else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-vit")
    parser.add_argument("--batch-size", type=number(int, minimum=1), default=32)
    parser.add_argument("--r", default="28,32,36", help="POMT's tokens removed, comma-separated (default 28,32,36)")
    parser.add_argument("--layer", type=number(int, minimum=0), default=0)
    parser.add_argument("--runs", type=number(int, minimum=2), default=30)
    parser.add_argument("--rounds", type=number(int, minimum=1), default=6)
    parser.add_argument("--budget", type=number(float, above=0), default=0.25, help="seconds per setting and round")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)
    try:
        rs = [int(v) for v in args.r.split(",")]
    except ValueError:
        refuse(f"--r {args.r!r}: give whole numbers separated by commas, e.g. 28,32,36")
    try:
        device = resolve_torch_device(args.device)
    except PomtError as exc:
        refuse(f"--device {args.device}: {exc}")
    try:
        model = create_model(args.model, pretrained=False)
        for r in rs:  # an r or a layer the model refuses, before anything is timed
            apply(model, "pomt", r=r, layer=args.layer)
            remove(model)
    except PomtError as exc:
        refuse(str(exc))
    timing = BenchTiming(budget_s=args.budget, rounds=args.rounds)
    began = time.perf_counter()
    results = run(model, args.batch_size, rs, args.layer, args.runs, timing, device)
    console = Console(width=80)
    table = Table(title=f"Ratio to none, {args.runs} runs of {args.rounds} rounds x {args.budget:g} s "
                        f"({args.model}, batch {args.batch_size}, {device})", title_justify="left")
    for col in ("setting", "ratio", "interval", "covers", "next run", "width"):
        table.add_column(col, justify="left" if col in ("setting", "interval") else "right")
    for label, rows in results.items():
        for kind in ("pooled", "paired"):
            c = coverage(rows, kind)
            table.add_row(label if kind == "pooled" else "", f"{c['truth']:.3f}" if kind == "pooled" else "", kind,
                          f"{c['covers']:.0%}", f"{c['next']:.0%}", f"{c['width']:.3f}")
    console.print(table)
    console.print("ratio: the median of all runs' ratios; covers: runs whose 95% interval holds it; next run: runs "
                  "whose interval holds the next run's ratio; width: median high - low")
    console.print(f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads: {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
