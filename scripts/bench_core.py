"""Benchmark of the pruning core: each method against the unpatched model and its ideal.

The ideal of a method is the unpatched model's own sub-layers run at the token counts the
method produces (tokens dropped by slicing, so choosing and merging tokens cost nothing).
``pomt(lean)`` and ``pomt(explicit)`` force POMT's two ways of scoring (log-probabilities
from fused attention, or the full softmax matrix as the paper's code); ``pomt`` is the
default, which picks one by device and dtype. On CUDA, ``pomt(ops)`` is the default block
with its reduction by tensor operations (sorts, gathers, a mean) in place of its Triton
kernel. Variants are timed with pomt's
timing engine in interleaved rounds within one process (a fresh shuffled order each
round, samples pooled over rounds), so ratios compare like with like. Prints a table per
(batch size, dtype, timing mode).

    python scripts/bench_core.py --model deit_small_patch16_224 --batch-size 1,4,64,256 \
        --dtype float16,float32 --device cuda --cuda-graphs both

``--host-overhead`` measures the host's share instead (one thread, batch 1, a tiny ViT
whose forward is all Python and dispatch): per-forward time of none, ideal and POMT r=5 at
layer 3 in interleaved rounds, the top-level aten ops of one forward, and the pieces of
POMT's block (scoring, ``prune_keep_mean``, the patched block against timm's). The op
counts need torch 2.5 or newer: on torch 2.1 the profiler's parent links vary, and two
profiles of one forward counted 457 and 472 ops:

    OMP_NUM_THREADS=1 python scripts/bench_core.py --host-overhead --dtype float32,bfloat16

``--tome-before FILE`` adds a variant ``tome(before)``: ToMe with the matching and merging
functions of another version of ``pomt_cli/pruning/tome.py`` (e.g. one checked out with
``git show REV:src/pomt_cli/pruning/tome.py > FILE``), timed in the same rounds as ``tome``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
import random
import sys
import types
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table

from pomt_cli.devices.torch_device import device_name, resolve_torch_device
from pomt_cli.errors import PomtError
from pomt_cli.pruning import apply, forward_ideal, patch, planned_token_counts, pomt, remove, tome
from pomt_cli.pruning.attention import qkv
from pomt_cli.measure.timing import Measurement, Task, is_out_of_memory, measure, release_memory
from pomt_cli.script_args import OneLineParser, number, refuse

DTYPES = ("float32", "float16", "bfloat16")
#: The largest batch size (a 32-bit int, as pomt's own --batch-size).
BATCH_MAX = 2**31 - 1
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
    prune_kernel: bool = True  # False: POMT's reduction by tensor operations, not its Triton kernel
    tome_module: types.SimpleNamespace | None = None  # another version of tome.py (tome(before))


def variants(model: torch.nn.Module, settings: dict[str, dict],
             tome_before: types.SimpleNamespace | None = None) -> list[Variant]:
    """none, then each method followed by its ideal (and POMT's lean and explicit blocks after POMT,
    with ``pomt(ops)``, its reduction by tensor operations, where its Triton kernel can run: CUDA;
    ToMe's other version after ToMe)."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    out = [Variant("none", "none", {}, [])]
    for method, setting in settings.items():
        counts = planned_token_counts(apply(model, method, **setting))
        remove(model)
        out.append(Variant(method, method, setting, counts))
        if method == "pomt":
            out += [Variant(f"pomt({s})", method, setting, counts, scoring=s) for s in ("lean", "explicit")]
            if on_cuda:
                out.append(Variant("pomt(ops)", method, setting, counts, prune_kernel=False))
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
    if variant.scoring is not None or not variant.prune_kernel:
        for blk in model.blocks:
            blk.pomt_plan = dataclasses.replace(blk.pomt_plan, scoring=variant.scoring or blk.pomt_plan.scoring,
                                                prune_kernel=variant.prune_kernel)
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


#: The host-bound model of ``--host-overhead``: 17 tokens of width 48, twelve blocks.
TINY_MODEL = "vit_tiny_patch16_224"
TINY_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 12, "num_heads": 3}
TINY_POMT = {"pomt": {"r": 5, "layer": 3}}


def top_level_ops(fn: Callable[[], torch.Tensor]) -> int:
    """aten ops called by ``fn()`` itself, not from inside another aten op (one profiled call)."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()

    def nested(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not nested(e))


def host_pieces(dtype: torch.dtype, *, rounds: int, budget_s: float, seed: int = 0) -> dict[str, Measurement]:
    """POMT's pieces on the tiny model's block 3 at batch 1: scoring, pruning, the block.

    ``block(timm)`` is timm's own block on the same tokens, ``block(pomt)`` the patched one
    with the default scoring; both include the MLP, which the patched block runs on fewer tokens.
    """
    torch.manual_seed(seed)
    model = timm.create_model(TINY_MODEL, pretrained=False, **TINY_KWARGS).eval().to(dtype=dtype)
    setting = TINY_POMT["pomt"]
    images = torch.randn(1, 3, 32, 32, dtype=dtype)
    with torch.inference_mode():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for blk in model.blocks[: setting["layer"]]:
            x = blk(x)
        blk = model.blocks[setting["layer"]]
        attn, p = blk.attn, model.num_prefix_tokens
        q, k, v = qkv(attn, blk.norm1(x))
        a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        lse = pomt.attention_lse(q, k, v, attn.scale)[1]
        scores = pomt.importance(a, v, p)
        pieces: dict[str, Callable[[], torch.Tensor]] = {
            "importance": lambda: pomt.importance(a, v, p),
            "importance_lean": lambda: pomt.importance_lean(q, k, v, lse, attn.scale, p, kernel=False),
            "prune_keep_mean": lambda: pomt.prune_keep_mean(x, scores, setting["r"], p),
            "block(timm)": lambda: blk(x),
        }
        parts: dict[str, list[Measurement]] = {name: [] for name in [*pieces, "block(pomt)"]}
        rng = random.Random(seed)
        for _ in range(rounds):
            order = list(parts)
            rng.shuffle(order)
            for name in order:
                if name == "block(pomt)":
                    apply(model, "pomt", **setting)
                    fn = lambda: model.blocks[setting["layer"]].forward_tokens(x, None)[0]  # noqa: E731
                else:
                    remove(model)
                    fn = pieces[name]
                task = Task(name, TINY_MODEL, 1, dtype=str(dtype).removeprefix("torch."))
                parts[name].append(measure(fn, device="cpu", budget_s=budget_s, rel_precision=0.005,
                                           min_samples=10, task=task))
        remove(model)
    return {name: Measurement.pool(ms) for name, ms in parts.items()}


def host_overhead(dtype: torch.dtype, *, rounds: int, budget_s: float) -> tuple[Table, Table]:
    """The tables of ``--host-overhead`` for one dtype: forwards with op counts, and POMT's pieces."""
    ms = time_variants(TINY_MODEL, 1, dtype, "cpu", rounds=rounds, budget_s=budget_s, settings=TINY_POMT,
                       model_kwargs=TINY_KWARGS)
    torch.manual_seed(0)
    model = timm.create_model(TINY_MODEL, pretrained=False, **TINY_KWARGS).eval().to(dtype=dtype)
    images = torch.randn(1, 3, 32, 32, dtype=dtype)
    table = variants(model, TINY_POMT)
    name = str(dtype).removeprefix("torch.")
    forwards = Table(title=f"tiny ViT, batch 1, {name}, 1 thread: one forward", title_justify="left")
    for col in ("variant", "median us", "over ideal us", "aten ops"):
        forwards.add_column(col, justify="right" if col != "variant" else "left")
    ideal = ms["ideal(pomt)"].median_ms
    with torch.inference_mode():
        for variant in table:
            ops = top_level_ops(prepare(model, images, variant))
            value = ms[variant.name].median_ms
            over = f"{(value - ideal) * 1e3:+.0f}" if variant.method == "pomt" else ""
            forwards.add_row(variant.name, f"{value * 1e3:.0f}", over, str(ops))
    remove(model)
    pieces = Table(title=f"POMT's pieces at block 3, {name}", title_justify="left")
    for col in ("piece", "median us", "p10 us", "p90 us"):
        pieces.add_column(col, justify="right" if col != "piece" else "left")
    for piece, m in host_pieces(dtype, rounds=rounds, budget_s=budget_s).items():
        pieces.add_row(piece, f"{m.median_ms * 1e3:.1f}", f"{m.p10_ms * 1e3:.1f}", f"{m.p90_ms * 1e3:.1f}")
    return forwards, pieces


def tome_version(path: str) -> types.SimpleNamespace:
    """``load_tome(path)``, or one line and exit code 2 for a file that is no version of tome.py."""
    if not path.endswith(".py") or not Path(path).is_file():
        refuse(f"--tome-before {path} is no Python file: give a version of pomt_cli/pruning/tome.py, e.g. from "
               "git show REV:src/pomt_cli/pruning/tome.py > FILE")
    try:
        return load_tome(path)
    except (OSError, SyntaxError, ImportError, AttributeError) as exc:
        refuse(f"--tome-before {path} cannot be loaded as a version of tome.py ({type(exc).__name__}: {exc})")


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch-size", default="1,4,64,256")
    parser.add_argument("--dtype", default="float16,float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cuda-graphs", choices=("no", "yes", "both"), default="no")
    parser.add_argument("--pomt-r", type=number(int, minimum=0), default=56)
    parser.add_argument("--layer", type=number(int, minimum=0), default=3)
    parser.add_argument("--tome-r", type=number(int, minimum=0), default=8)
    parser.add_argument("--topk-r", type=number(int, minimum=0), default=8)
    parser.add_argument("--rounds", type=number(int, minimum=1), default=5, help="interleaved rounds; samples are pooled")
    parser.add_argument("--min-time", type=number(float, above=0), default=0.2, help="seconds per variant per round")
    parser.add_argument("--methods", default="pomt,tome,topk", help="methods to time, comma-separated")
    parser.add_argument("--tome-before", metavar="FILE", help="also time ToMe with this version of tome.py")
    parser.add_argument("--host-overhead", action="store_true",
                        help="one thread, batch 1, a tiny ViT: POMT's host overhead, op counts and pieces")
    args = parser.parse_args(argv)
    dtypes = args.dtype.split(",")
    batches = args.batch_size.split(",")
    methods = args.methods.split(",")
    for bad, what in (([d for d in dtypes if d not in DTYPES], f"--dtype takes {', '.join(DTYPES)}"),
                      ([b for b in batches if not (b.isdigit() and 0 < int(b) <= BATCH_MAX)],
                       f"--batch-size takes positive sizes up to {BATCH_MAX}"),
                      ([m for m in methods if m not in DEFAULT_SETTINGS], f"--methods takes {', '.join(DEFAULT_SETTINGS)}")):
        if bad:  # one line, exit code 2, before anything runs
            print(f"error: {', '.join(bad)}: {what}, comma-separated", file=sys.stderr)
            raise SystemExit(2)
    try:
        device = resolve_torch_device(args.device)
    except PomtError as exc:
        refuse(f"--device {args.device}: {exc}")
    if args.cuda_graphs != "no" and device.type != "cuda":
        refuse(f"--cuda-graphs {args.cuda_graphs} needs a CUDA device, not {args.device}: pass --device cuda")
    if not args.host_overhead and not timm.is_model(args.model):
        refuse(f"--model {args.model}: timm has no such model; give a timm model name, e.g. deit_small_patch16_224")
    settings = {
        "pomt": {"r": args.pomt_r, "layer": args.layer},
        "tome": {"r": args.tome_r},
        "topk": {"r": args.topk_r},
    }
    settings = {m: settings[m] for m in methods}
    tome_before = tome_version(args.tome_before) if args.tome_before else None
    console = Console(highlight=False)
    model = f"{TINY_MODEL} {TINY_KWARGS}" if args.host_overhead else args.model
    console.print(
        f"{model}, random weights, {device_name(torch.device(args.device))}, torch {torch.__version__}, "
        f"timm {timm.__version__}, {dt.date.today().isoformat()}; {args.rounds} interleaved rounds, samples pooled"
    )
    if args.host_overhead:
        torch.set_num_threads(1)
        for dtype_name in dtypes:
            for table in host_overhead(getattr(torch, dtype_name), rounds=args.rounds, budget_s=args.min_time):
                console.print(table)
        return
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.cuda_graphs]
    for graphs in modes:
        for dtype_name in dtypes:
            for batch in (int(b) for b in batches):
                try:
                    ms = time_variants(args.model, batch, getattr(torch, dtype_name), args.device,
                                       cuda_graphs=graphs, rounds=args.rounds, budget_s=args.min_time,
                                       settings=settings, tome_before=tome_before)
                except PomtError as exc:  # an r or a layer the model refuses
                    refuse(str(exc))
                except (RuntimeError, MemoryError) as exc:
                    if not is_out_of_memory(exc):
                        raise
                    refuse(f"batch {batch} in {dtype_name} does not fit in memory on {args.device}: "
                           "give smaller --batch-size values")
                mode = "CUDA graphs" if graphs else "eager"
                console.print(render(f"batch {batch}, {dtype_name}, {mode}", ratios(ms)))


if __name__ == "__main__":
    main()
