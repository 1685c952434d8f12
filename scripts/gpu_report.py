"""Every GPU claim of pomt, measured by one command: core, profile, bench, accuracy, environment.

    python scripts/gpu_report.py --output-dir runs/gpu           # one CUDA GPU, at most 8 minutes
    python scripts/gpu_report.py --output-dir runs/smoke --smoke # the same code paths on the CPU, tiny models

``DIR`` holds exactly three files, so that a tool that brings back at most 8 files of
16 MiB each, none deeper than ``DIR/a/b/file``, brings back all of it:

- ``report.md`` and ``report.json`` (one key per section; ``extras`` lists the archive);
- ``extras.tar.gz``: what the sections wrote, paths relative to the work folder:
  ``sections/NAME.json`` (each section's results as it measured them), ``logs/NAME.log``
  (each section's output), ``NAME-command*.log`` (the pomt commands' output), the
  profiles' and benches' parquet, CSV and plots. Not kept: ``cache/`` (the ONNX graphs
  that the runtimes section exports; remade by running it). Files go in that order
  while their total stays under 15 MiB, so the archive stays under 16 MiB; any file
  beyond is left out and named in ``report.json``'s ``extras.dropped`` and in
  ``report.md``.

All three are rewritten atomically after every section, so that a run cut short still
brings back what it measured. The sections work in ``--work-dir`` (default: a temporary
folder, removed at the end), never under ``DIR``. Each section runs in a child process
with its own time limit (``--limit SECTION=SECONDS``); a section that overruns is
stopped, and what it had measured stays in the report, marked as cut short. A section
that fails or is cut short shows its status and the last meaningful line of its logs
(the exception, or pomt's one-line error); a pomt command that exits with an error
inside a section is that section's result (its exit code and its error line).
The clocks are never changed: they are read (nvidia-smi, read-only queries) before and
after, and every command runs with ``--no-lock-clocks``.

For the test of that path only: with ``POMT_GPU_REPORT_FAIL=SECTION`` in the
environment, that section's child raises at its start.

Sections:
- core: the pruning core against the unpatched model and each method's ideal
  (``scripts/bench_core.py``), batch 1, 4, 64, 256, float16 and float32, eager and CUDA
  graphs, with POMT's reduction by its Triton kernel and by tensor operations
  (``pomt(ops)``) side by side; and the lean POMT scores against exact ones on the device.
- profile: pairs of consecutive full profiles, in this order: batch 64 float32 eager
  with ``--budget 0.1 --warmup 1 --passes 2`` (``bs64_float32_eager_fast``: 25-26 s a run
  on the H200, docs/PERFORMANCE.md), and batch 1 and 4 float16 with CUDA graphs; wall
  time, agreement per point, steps (each run's largest 8, and the two runs' whole step
  lists compared). ``--profiles`` picks others, in the order given, such as
  ``bs64_float32_eager`` (batch 64 float32 with the default settings: about 115 s a run on
  the H200, which the section's default limit cuts).
- engine: where a profile's time goes. Every visit of a 25-point grid (n = 197, 189, ...,
  5) at batch 64 float32 eager and at batch 4 float16 with CUDA graphs, with the
  profile's default settings, through the library's ``profile_latency``: each visit's
  samples in order, its warm-up (and capture) time and the host's time around it.
- bench: ``pomt bench`` with none, POMT, ToMe and Top-K at batch 4, 64, 256, float16,
  CUDA graphs.
- accuracy: ``pomt estimate-accuracy`` on 2,000 generated JPEGs, batch 64, 20 grid points;
  decoding and evaluation apart.
- runtimes: ``pomt bench --runtime eager,onnxruntime`` (issue 13) at batch 4 and 64,
  float32, none and POMT r=56 at block 3 side by side: ONNX Runtime's CUDA provider and
  its I/O binding on the GPU (where onnxruntime-gpu is installed; otherwise the one-line
  refusal is recorded).
- environment: GPU, driver, versions; clocks and temperature before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

from pomt_cli.formats.outputs import atomic_output, atomic_write_text  # noqa: E402

SECTIONS = ("core", "profile", "engine", "bench", "accuracy", "runtimes")
#: Each section's default limit (s). Together 430 s, so that with the children's start-up (about
#: 7 s on the H200) a whole report stays within 8 minutes; what a limit cuts short is reported as
#: such. Measured on the H200 (2026-11-28): core 125 s (with ``pomt(ops)`` and the kernel traces),
#: profile 64 s for the short pair and about 120 s with the CUDA-graph pair, engine 23-30 s, bench
#: 20-23 s, accuracy 27-31 s, runtimes 10 s.
LIMITS_S = {"core": 130, "profile": 160, "engine": 35, "bench": 30, "accuracy": 35, "runtimes": 40}
SMOKE_LIMITS_S = {"core": 40, "profile": 40, "engine": 30, "bench": 30, "accuracy": 40, "runtimes": 40}

FULL = {
    "device": "cuda", "preset": "nvidia", "model": "deit_small_patch16_224", "model_kwargs": {},
    "core_batches": [256, 64, 4, 1], "core_dtypes": ["float16", "float32"], "core_graphs": [False, True],
    "core_settings": {"pomt": {"r": 56, "layer": 3}, "tome": {"r": 8}, "topk": {"r": 8}},
    "core_rounds": 3, "core_budget_s": 0.25,
    # Where POMT's time over its ideal goes, kernel by kernel (the float16 gap at batch 64).
    "kernel_batches": [64, 256], "kernel_dtype": "float16",
    "profile_model": "deit_small_patch16_224", "profile_tokens": None,
    "profiles": [("bs64_float32_eager", ["--batch-size", "64", "--dtype", "float32"]),
                 ("bs1-4_float16_cudagraphs", ["--batch-size", "1,4", "--dtype", "float16", "--cuda-graphs"]),
                 ("bs4_float16_cudagraphs", ["--batch-size", "4", "--dtype", "float16", "--cuda-graphs"]),
                 # The 30 s target's settings: predicted by scripts/replay_timing.py and
                 # scripts/simulate_profile.py, measured on the H200 (docs/PERFORMANCE.md); two
                 # passes, so that every point's visits can agree.
                 ("bs64_float32_eager_fast", ["--batch-size", "64", "--dtype", "float32", "--budget", "0.1",
                                              "--warmup", "1", "--passes", "2"])],
    # The 30 s target's profile (2 x 25-26 s on the H200), then the CUDA-graph pair (2 x 22-45 s).
    # The default settings at batch 64 (2 x 115 s) are not run by default: the fourth H200 run has them.
    "profile_names": ["bs64_float32_eager_fast", "bs1-4_float16_cudagraphs"],
    "watch": {64: [(177, 176), (89, 88)]},
    "engine_model": "deit_small_patch16_224", "engine_tokens": (197, 1, -8),
    "engine_runs": [("bs64_float32_eager", 64, "float32", False), ("bs4_float16_cudagraphs", 4, "float16", True)],
    "bench_model": "deit_small_patch16_224",
    "bench_args": ["--batch-size", "4,64,256", "--dtype", "float16", "--cuda-graphs", "-r", "56", "--layer", "3",
                   "--tome-r", "8", "--topk-r", "8", "--budget", "0.5", "--rounds", "3"],
    "accuracy_model": "deit_small_patch16_224", "accuracy_images": 2000, "accuracy_classes": 1000,
    "accuracy_tokens": "197:7:10", "accuracy_batch": 64, "accuracy_limit": None, "accuracy_size": (500, 375),
    "runtimes_model": "deit_small_patch16_224",
    "runtimes_args": ["--batch-size", "4,64", "--dtype", "float32", "-r", "56", "--layer", "3", "--method", "pomt",
                      "--runtime", "eager,onnxruntime", "--budget", "0.5", "--rounds", "3"],
}
SMOKE = {
    **FULL,
    "device": "cpu", "preset": "cpu", "model": "vit_tiny_patch16_224",
    "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3},
    "core_batches": [4, 1], "core_dtypes": ["float32"], "core_graphs": [False],
    "core_settings": {"pomt": {"r": 5, "layer": 1}, "tome": {"r": 2}, "topk": {"r": 2}},
    "core_rounds": 2, "core_budget_s": 0.05,
    "kernel_batches": [4], "kernel_dtype": "float32",
    "profile_model": "digits-vit", "profile_tokens": "65:5:12",
    "profiles": [("bs4_float32_eager", ["--batch-size", "4", "--dtype", "float32", "--budget", "0.1"]),
                 ("bs1-4_float32_eager", ["--batch-size", "1,4", "--dtype", "float32", "--budget", "0.1"])],
    "profile_names": ["bs4_float32_eager", "bs1-4_float32_eager"],
    "watch": {4: [(41, 40)]},
    "engine_model": "vit_tiny_patch16_224", "engine_tokens": (17, 1, -3),
    "engine_runs": [("bs4_float32_eager", 4, "float32", False)], "engine_budget_s": 0.1,
    "bench_model": "digits-vit",
    "bench_args": ["--batch-size", "1,4", "--dtype", "float32", "-r", "16", "--layer", "1", "--tome-r", "2",
                   "--topk-r", "2", "--budget", "0.1", "--rounds", "2"],
    "accuracy_model": "deit_tiny_patch16_224", "accuracy_images": 1000, "accuracy_classes": 1000,
    "accuracy_tokens": "197:17:90", "accuracy_batch": 8, "accuracy_limit": 24, "accuracy_size": (40, 30),
    "runtimes_model": "digits-vit",
    "runtimes_args": ["--batch-size", "1,4", "--dtype", "float32", "-r", "16", "--layer", "1", "--method", "pomt",
                      "--runtime", "eager,onnxruntime", "--budget", "0.1", "--rounds", "2"],
}


# --- writing -------------------------------------------------------------------------------

def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


EXTRAS = "extras.tar.gz"
EXTRAS_BUDGET = 15 * 2**20  # bytes of files in the archive: with tar's headers and gzip, under 16 MiB
EXTRAS_ORDER = ("sections/*.json", "logs/*.log", "*-command*.log", "**/*.parquet", "**/*.csv", "**/*")
EXTRAS_SKIP = ("cache",)  # the ONNX graphs of the runtimes section: large, and remade by running it


def write_extras(folder: Path, work: Path) -> dict:
    """Archive the work folder's files worth keeping as ``folder/extras.tar.gz`` (atomically).

    Files are taken in the order of ``EXTRAS_ORDER`` while their total stays within
    ``EXTRAS_BUDGET``; the rest are returned as ``dropped``, with their sizes.
    """
    chosen: dict[Path, int] = {}
    dropped: list[dict] = []
    total = 0
    for pattern in EXTRAS_ORDER:
        for path in sorted(work.glob(pattern)):
            rel = path.relative_to(work)
            if (path in chosen or not path.is_file() or rel.parts[0] in EXTRAS_SKIP
                    or path.is_relative_to(folder) or any(d["file"] == str(rel) for d in dropped)):
                continue
            size = path.stat().st_size
            if total + size > EXTRAS_BUDGET:
                dropped.append({"file": str(rel), "bytes": size})
                continue
            chosen[path] = size
            total += size
    with atomic_output(folder / EXTRAS) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for path in chosen:
            tar.add(path, arcname=str(path.relative_to(work)), recursive=False)
    return {"file": EXTRAS, "files": len(chosen), "bytes": (folder / EXTRAS).stat().st_size, "dropped": dropped}


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def last_line(*logs: Path) -> tuple[str, Path | None]:
    """The last meaningful line of the most recently written of ``logs`` (an exception, pomt's
    one-line error, or where a cut-short command was), and that log."""
    for log in sorted((p for p in logs if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True):
        for line in reversed(log.read_text(errors="replace").splitlines()):
            line = ANSI.sub("", line).strip()
            if any(c.isalnum() for c in line):
                return line[:300], log
    return "(nothing in its logs)", None


class SectionWriter:
    """A child's results, written to ``WORK/sections/NAME.json`` after every item."""

    def __init__(self, folder: Path, name: str) -> None:
        self.path = folder / "sections" / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict = {}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        write_json(self.path, self.data)

    def append(self, key: str, value) -> None:
        self.data.setdefault(key, []).append(value)
        write_json(self.path, self.data)


# --- environment -----------------------------------------------------------------------------

QUERY = ("name,driver_version,pstate,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,temperature.gpu,"
         "power.draw,power.limit,clocks_event_reasons.active")


def read_gpu() -> dict:
    """The GPU's clocks, temperature and power as nvidia-smi reports them (read-only queries)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"nvidia_smi": "not found"}
    fields = QUERY.split(",")
    try:
        done = subprocess.run([smi, f"--query-gpu={QUERY}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"nvidia_smi": f"failed: {exc}"}
    if done.returncode != 0:
        # Older drivers call the last field clocks_throttle_reasons.
        done = subprocess.run([smi, f"--query-gpu={QUERY.rsplit(',', 1)[0]}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        fields = fields[:-1]
    line = done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""
    values = [v.strip() for v in line.split(",")]
    return dict(zip(fields, values)) if len(values) == len(fields) else {"nvidia_smi": done.stdout + done.stderr}


def environment() -> dict:
    import timm
    import torch

    import pomt_cli

    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "timm": timm.__version__, "pomt": pomt_cli.__version__,
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count)
    for name in ("onnxruntime", "triton"):  # ONNX Runtime's section; POMT's float16 kernel
        try:
            info[name] = importlib.import_module(name).__version__
        except ImportError:
            info[name] = None
    return info


# --- sections (each runs in a child process) -----------------------------------------------------

def section_core(cfg: dict, out: SectionWriter, folder: Path) -> None:
    import torch
    from bench_core import ratios, time_variants

    from pomt_cli.pruning import pomt

    out.put("settings", {"model": cfg["model"], "settings": cfg["core_settings"], "rounds": cfg["core_rounds"],
                         "budget_s_per_variant_and_round": cfg["core_budget_s"]})
    for dtype_name in cfg["core_dtypes"]:
        out.append("scores", score_agreement(cfg, getattr(torch, dtype_name)))
    for batch in cfg["kernel_batches"]:
        out.append("kernels", kernel_times(cfg, batch))
    for graphs in cfg["core_graphs"]:
        for dtype_name in cfg["core_dtypes"]:
            for batch in cfg["core_batches"]:
                began = time.perf_counter()
                ms = time_variants(cfg["model"], batch, getattr(torch, dtype_name), cfg["device"], cuda_graphs=graphs,
                                   rounds=cfg["core_rounds"], budget_s=cfg["core_budget_s"],
                                   settings=cfg["core_settings"], model_kwargs=cfg["model_kwargs"])
                out.append("tables", {"batch": batch, "dtype": dtype_name, "mode": "cuda_graphs" if graphs else "eager",
                                      "seconds": round(time.perf_counter() - began, 1), "variants": ratios(ms)})
                out.put("received_kernel", {f"{device} {str(dtype).removeprefix('torch.')}":
                                            pomt.received_path(device, dtype) for device, dtype in pomt.RECEIVED_KERNEL})
                out.put("prune_kernel", {f"{device} {str(dtype).removeprefix('torch.')}":
                                         pomt.prune_path(device, dtype) for device, dtype in pomt.PRUNE_KERNEL})


#: Forward passes per trace of :func:`kernel_times` (two traces per variant, each after three
#: untraced passes).
KERNEL_PASSES = 10
#: Kernels listed per batch size in report.md, by their difference between POMT and its ideal
#: (report.json keeps them all).
KERNEL_ROWS = 15


def kernel_times(cfg: dict, batch: int) -> dict:
    """Where POMT's time over its ideal goes: each kernel's device time per forward pass, in both.

    torch.profiler traces ``KERNEL_PASSES`` eager forward passes of POMT (the default block)
    and of its ideal, twice each (POMT, ideal, ideal, POMT). On CUDA each kernel's own GPU time counts (host time does not: this
    is what remains with CUDA graphs); on the CPU (``--smoke``) each op's self CPU time.
    A failure is recorded as the result's ``error``: the tables after it still run.
    """
    import timm
    import torch
    from bench_core import prepare, variants
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from pomt_cli.pruning import remove

    dtype = getattr(torch, cfg["kernel_dtype"])
    device = cfg["device"]
    on_gpu = device == "cuda"
    result: dict = {"batch": batch, "dtype": cfg["kernel_dtype"], "passes": KERNEL_PASSES,
                    "timer": "GPU time per kernel" if on_gpu else "self CPU time per op"}
    model = None
    try:
        torch.manual_seed(0)
        model = timm.create_model(cfg["model"], pretrained=False, **cfg["model_kwargs"]).eval()
        model = model.to(device=device, dtype=dtype)
        c, h, w = model.patch_embed.proj.in_channels, *model.patch_embed.img_size
        images = torch.randn(batch, c, h, w, device=device, dtype=dtype)
        table = {v.name: v for v in variants(model, {"pomt": cfg["core_settings"]["pomt"]})}
        per: dict[str, dict[str, float]] = {"pomt": {}, "ideal(pomt)": {}}
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with torch.inference_mode():
            # Two traces of each, in the order A B B A, so that neither gains from going first.
            for name in ("pomt", "ideal(pomt)", "ideal(pomt)", "pomt"):
                fn = prepare(model, images, table[name])
                for _ in range(3):  # compiles and tunes out of the trace (Triton, cuDNN)
                    fn()
                if on_gpu:
                    torch.cuda.synchronize()
                with profile(activities=activities) as prof:
                    for _ in range(KERNEL_PASSES):
                        fn()
                    if on_gpu:
                        torch.cuda.synchronize()
                totals = per[name]
                for evt in prof.events():
                    if on_gpu and evt.device_type == DeviceType.CUDA:
                        us = evt.time_range.elapsed_us()
                    elif not on_gpu and evt.device_type == DeviceType.CPU:
                        us = evt.self_cpu_time_total
                    else:
                        continue
                    totals[evt.name[:200]] = totals.get(evt.name[:200], 0.0) + us / (2 * KERNEL_PASSES)
        pomt_us, ideal_us = per["pomt"], per["ideal(pomt)"]
        if not pomt_us:
            raise RuntimeError("the trace holds no kernel events")
        rows = [{"kernel": k, "pomt_us": round(pomt_us.get(k, 0.0), 2), "ideal_us": round(ideal_us.get(k, 0.0), 2),
                 "difference_us": round(pomt_us.get(k, 0.0) - ideal_us.get(k, 0.0), 2)}
                for k in set(pomt_us) | set(ideal_us)]
        rows.sort(key=lambda r: -abs(r["difference_us"]))
        result.update(pomt_total_us=round(sum(pomt_us.values()), 2), ideal_total_us=round(sum(ideal_us.values()), 2),
                      rows=rows)
    except Exception as exc:  # noqa: BLE001 - a diagnostic: the section goes on to its tables
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    finally:
        if model is not None:
            remove(model)
    return result


def score_agreement(cfg: dict, dtype) -> dict:
    """POMT's scores by the default block, the chunked product and the explicit block, against exact
    scores of the same q, k, v (float64), and which kernels the lean block used."""
    import timm
    import torch

    from pomt_cli.pruning import pomt
    from pomt_cli.pruning.patch import _qkv

    torch.manual_seed(0)
    model = timm.create_model(cfg["model"], pretrained=False, **cfg["model_kwargs"]).eval()
    model = model.to(device=cfg["device"], dtype=dtype)
    layer = cfg["core_settings"]["pomt"]["layer"]
    c, h, w = model.patch_embed.proj.in_channels, *model.patch_embed.img_size
    x = torch.randn(8, c, h, w, device=cfg["device"], dtype=dtype)
    with torch.inference_mode():
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk in model.blocks[:layer]:
            t = blk(t)
        attn = model.blocks[layer].attn
        q, k, v = _qkv(attn, model.blocks[layer].norm1(t))
        p = model.num_prefix_tokens
        exact = pomt.importance(((q.double() * attn.scale) @ k.double().transpose(-2, -1)).softmax(-1), v.double(), p)
        o, lse = pomt.attention_lse(q, k, v, attn.scale)
        lean = pomt.importance_lean(q, k, v, lse, attn.scale, p).double()
        product = pomt.importance_lean(q, k, v, lse, attn.scale, p, kernel=False).double()
        explicit = pomt.importance(((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1), v, p).double()

    def rel(a):
        return float(((a - exact).abs() / exact.abs()).max())

    def same_order(a):
        return bool(torch.equal(a.argsort(dim=-1, stable=True), exact.argsort(dim=-1, stable=True)))

    return {"dtype": str(dtype).removeprefix("torch."), "fused_lse_kernel": lse_kernel_name(q),
            "received_kernel": pomt.received_path(q.device, q.dtype) or "not tried (float32, or not CUDA)",
            "lean_max_rel_error": rel(lean), "product_max_rel_error": rel(product),
            "explicit_max_rel_error": rel(explicit), "lean_same_order": same_order(lean),
            "product_same_order": same_order(product), "explicit_same_order": same_order(explicit)}


def lse_kernel_name(q) -> str:
    """Which fused attention kernel gave the lean block its log-sum-exp (pomt._lse_kernels' order)."""
    import torch

    from pomt_cli.pruning import pomt

    chosen = pomt._LSE_KERNEL.get((q.device.type, q.dtype))
    if chosen is None:
        return "explicit"
    if not q.is_cuda:
        return "flash (cpu)"
    names = ["cudnn", "flash", "efficient"] if q.dtype in (torch.float16, torch.bfloat16) else ["efficient"]
    return names[chosen]


@contextlib.contextmanager
def quiet(log: Path):
    """Send a command's stdout and stderr to ``log`` (its rich progress bars included)."""
    with open(log, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield


def run_cli(args: list[str], log: Path) -> tuple[int, float]:
    """``pomt ARGS`` in this process; (exit code, wall seconds).

    An exception that escapes pomt (a bug, not a refusal) is logged with its traceback and
    counts as exit code 1, so that the section records it and goes on.
    """
    import traceback

    from pomt_cli.cli import main

    began = time.perf_counter()
    code = 0
    with quiet(log):
        print("+ pomt " + " ".join(args), flush=True)
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
    return code, time.perf_counter() - began


def run_command(out: SectionWriter, args: list[str], log: Path) -> int:
    """``pomt ARGS`` as a section's result: its command, exit code, wall time and, when it
    fails, its last line (pomt's one-line error, or the exception)."""
    out.put("command", "pomt " + " ".join(args))
    code, wall = run_cli(args, log)
    out.put("exit_code", code)
    out.put("wall_s", round(wall, 1))
    if code != 0:
        out.put("error", last_line(log)[0])
    return code


def section_profile(cfg: dict, out: SectionWriter, folder: Path) -> None:
    from compare_profiles import agreement

    from pomt_cli.formats.latency import read_latency as read_latency_profile
    from pomt_cli.measure.steps import find_steps

    log = folder / "profile-commands.log"
    profiles = dict(cfg["profiles"])
    for name in cfg["profile_names"]:  # in the order asked: a limit cuts the last ones short
        extra = profiles[name]
        runs = []
        for run in ("a", "b"):
            target = folder / "profile" / f"{name}-{run}"
            args = ["profile", "--device", cfg["preset"], "--no-lock-clocks", "--model", cfg["profile_model"],
                    "--output-dir", str(target), *extra]
            if cfg["profile_tokens"]:
                args += ["--tokens", cfg["profile_tokens"]]
            code, wall = run_cli(args, log)
            files = sorted(target.glob("latency_*.parquet"))
            if code != 0 or not files:
                out.append("profiles", {"name": name, "run": run, "exit_code": code, "wall_s": round(wall, 1),
                                        "error": last_line(log)[0] if code else "no profile written"})
                break
            frame, meta = read_latency_profile(files[0])
            steps = find_steps(frame, top=8)
            runs.append(frame)
            counts = dict(frame.group_by("status").len().iter_rows())
            out.append("profiles", {
                "name": name, "run": run, "command": "pomt " + " ".join(args), "exit_code": code,
                "wall_s": round(wall, 1), "measuring_s": round(meta.elapsed_s, 1), "points": frame.height,
                "status_counts": counts, "file": str(files[0].relative_to(folder)),
                "steps": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
                          for row in steps.iter_rows(named=True)],
                "watched": watched(frame, cfg["watch"]),
            })
        if len(runs) == 2:
            # |L1 - L2| / L2 per point, the measure: the second run is the reference.
            for row in agreement(runs[1], runs[0]).iter_rows(named=True):
                out.append("agreement", {"name": name, "batch_size": row["batch_size"], "points": row["points"],
                                         "median_pct": round(100 * row["median"], 3),
                                         "p90_pct": round(100 * row["p90"], 3),
                                         "max_pct": round(100 * row["max"], 3),
                                         **steps_agreement(runs[0], runs[1], row["batch_size"])})


def steps_agreement(a, b, batch_size: int) -> dict:
    """Every step two runs list at ``batch_size`` (not only the top 8): in both, in run a only, in run b only."""
    from pomt_cli.measure.steps import find_steps, step_pairs

    parts = [frame.filter(frame["batch_size"] == batch_size) for frame in (a, b)]
    found_a, found_b = (step_pairs(find_steps(part, top=max(part.height, 1))) for part in parts)

    def listed(pairs: set[tuple[int, int]]) -> list[str]:
        return [f"{f}\u2192{t}" for f, t in sorted(pairs, reverse=True)]

    return {"steps_both": listed(found_a & found_b), "steps_a_only": listed(found_a - found_b),
            "steps_b_only": listed(found_b - found_a)}


def section_engine(cfg: dict, out: SectionWriter, folder: Path) -> None:
    """Every visit of a short profile, as the engine made it: where a profile's wall time goes."""
    import timm
    import torch

    from pomt_cli.measure.grid import LatencySettings
    from pomt_cli.measure.workload import profile_latency
    from pomt_cli.pipelines import ProfileSettings

    defaults = {name: ProfileSettings.model_fields[name].default
                for name in ("rel_precision", "budget_s", "min_samples", "warmup", "passes", "seed")}
    if cfg.get("engine_budget_s"):
        defaults["budget_s"] = cfg["engine_budget_s"]
    grid = list(range(*cfg["engine_tokens"]))
    out.put("settings", {"model": cfg["engine_model"], "grid": grid, **defaults})
    for name, batch, dtype, graphs in cfg["engine_runs"]:
        settings = LatencySettings(batch_sizes=[batch], grid=grid, dtype=dtype, cuda_graphs=graphs,
                                   remeasure_rounds=ProfileSettings.model_fields["remeasure"].default, **defaults)
        torch.manual_seed(0)
        model = timm.create_model(cfg["engine_model"], pretrained=False, **cfg["model_kwargs"])
        visits: list[dict] = []
        pooled: dict = {}
        started = {"at": 0.0}

        def progress(event, visits=visits, pooled=pooled, started=started) -> None:
            now = time.perf_counter()
            if event.measurement is None:
                started["at"] = now
                return
            m = event.measurement
            before = pooled.get(event.tokens)
            pooled[event.tokens] = m
            if m.status == "oom":
                visits.append({"n": event.tokens, "phase": event.phase, "status": "oom"})
                return
            new = m.raw_ms[len(before.raw_ms):] if before else m.raw_ms
            measure_s = m.elapsed_s - (before.elapsed_s if before else 0.0)
            visits.append({
                "n": event.tokens, "phase": event.phase, "status": m.status,
                "warmup_calls": m.warmup_calls - (before.warmup_calls if before else 0),
                "wall_s": round(now - started["at"], 5), "measure_s": round(measure_s, 5),
                "samples_ms": [round(v, 5) for v in new],
            })

        began = time.perf_counter()
        frame = profile_latency(model, settings, device=torch.device(cfg["device"]), progress=progress)
        wall = time.perf_counter() - began
        out.append("runs", {"name": name, "batch_size": batch, "dtype": dtype, "cuda_graphs": graphs,
                            "wall_s": round(wall, 2), "points": frame.height,
                            "status_counts": dict(frame.group_by("status").len().iter_rows()),
                            "samples_per_point": dict(zip(map(str, frame["tokens"]), frame["samples"])),
                            "summary": engine_summary(visits, wall), "visits": visits})
        del model
        if cfg["device"] == "cuda":
            torch.cuda.empty_cache()


def engine_summary(visits: list[dict], wall_s: float) -> dict:
    """Where the time of one traced profile went, and how noisy its samples were."""
    import numpy as np

    timed = [v for v in visits if v.get("samples_ms")]
    timed_s = sum(sum(v["samples_ms"]) for v in timed) / 1e3
    measure_s = sum(v["measure_s"] for v in timed)
    visit_s = sum(v["wall_s"] for v in timed)
    calls: dict[int, int] = {}
    by_point: dict[int, list[float]] = {}
    first_vs_rest = []
    for v in timed:
        calls[v["n"]] = calls.get(v["n"], 0) + len(v["samples_ms"]) + v["warmup_calls"]
        by_point.setdefault(v["n"], []).extend(v["samples_ms"])
        if len(v["samples_ms"]) >= 3:
            first_vs_rest.append(v["samples_ms"][0] / float(np.median(v["samples_ms"][1:])) - 1)
    spread = [float(np.percentile(s, 90) / np.percentile(s, 10)) for s in by_point.values() if len(s) >= 5]
    cv = [float(np.std(s) / np.mean(s)) for s in by_point.values() if len(s) >= 5]
    return {
        "visits": len(timed), "wall_s": round(wall_s, 2), "timed_s": round(timed_s, 2),
        "warmup_s": round(measure_s - timed_s, 2), "host_in_visits_s": round(visit_s - measure_s, 2),
        "outside_visits_s": round(wall_s - visit_s, 2),
        "calls_per_point_median": float(np.median(list(calls.values()))) if calls else None,
        "calls_per_point_max": max(calls.values(), default=None),
        "spread_p90_p10_median": round(float(np.median(spread)), 4) if spread else None,
        "cv_median": round(float(np.median(cv)), 4) if cv else None,
        "first_call_vs_rest_median": round(float(np.median(first_vs_rest)), 4) if first_vs_rest else None,
    }


def watched(frame, watch: dict) -> list[dict]:
    """Latency either side of the steps the issue names (where the grid has both points)."""
    import polars as pl

    rows = []
    for batch, pairs in watch.items():
        part = frame.filter(pl.col("batch_size") == batch)
        ms = dict(zip(part["tokens"].to_list(), part["latency_ms"].to_list()))
        for a, b in pairs:
            if ms.get(a) and ms.get(b):
                rows.append({"batch_size": batch, "from": a, "to": b, "from_ms": round(ms[a], 4),
                             "to_ms": round(ms[b], 4), "change_pct": round(100 * (ms[b] / ms[a] - 1), 2)})
    return rows


def section_bench(cfg: dict, out: SectionWriter, folder: Path) -> None:
    from pomt_cli.formats.bench import read_bench

    target = folder / "bench"
    args = ["bench", "--device", cfg["preset"], "--no-lock-clocks", "--model", cfg["bench_model"],
            "--method", "none", "--method", "pomt", "--method", "tome", "--method", "topk",
            "--output-dir", str(target), *cfg["bench_args"]]
    code = run_command(out, args, folder / "bench-command.log")
    files = sorted(target.glob("bench_*.parquet")) if code == 0 else []
    if files:
        frame, _ = read_bench(files[0])
        keep = ["batch_size", "setting", "tokens_out", "latency_ms", "p10_ms", "p90_ms", "samples", "status",
                "latency_change_pct", "change_low_pct", "change_high_pct", "speedup"]
        out.put("rows", frame.select(keep).to_dicts())


def section_runtimes(cfg: dict, out: SectionWriter, folder: Path) -> None:
    """Eager PyTorch and ONNX Runtime side by side in one bench run (the graphs exported in the run)."""
    from pomt_cli.formats.bench import read_bench

    target = folder / "runtimes"
    args = ["bench", "--device", cfg["preset"], "--no-lock-clocks", "--model", cfg["runtimes_model"],
            "--output-dir", str(target), *cfg["runtimes_args"]]
    # Each section is a child process of its own: the exported graphs go to the work folder.
    os.environ["POMT_CACHE_DIR"] = str(folder / "cache")
    code = run_command(out, args, folder / "runtimes-command.log")
    files = sorted(target.glob("bench_*.parquet")) if code == 0 else []
    if files:
        frame, meta = read_bench(files[0])
        out.put("providers", {r: (info or {}).get("providers") for r, info in meta.runtimes_info.items()})
        keep = ["batch_size", "runtime", "setting", "latency_ms", "p10_ms", "p90_ms", "samples", "status",
                "latency_change_pct", "runtime_change_pct"]
        out.put("rows", frame.select(keep).to_dicts())


def write_image_folder(root: Path, images: int, classes: int, width: int = 500, height: int = 375) -> float:
    """``scripts/make_image_folder.py``'s folder, written with threads; returns seconds."""
    from make_image_folder import write_image

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda i: write_image(root, i, classes, width, height, seed=0), range(images)))
    return time.perf_counter() - began


def section_accuracy(cfg: dict, out: SectionWriter, folder: Path) -> None:
    from pomt_cli.accuracy.distributed import processes
    from pomt_cli.accuracy.evaluate import EstimateConfig, run_estimate
    from pomt_cli.options import TokenRange

    root = Path(tempfile.mkdtemp(prefix="pomt-gpu-report-images-"))  # not under DIR: a cut-short run leaves it
    made = write_image_folder(root, cfg["accuracy_images"], cfg["accuracy_classes"], *cfg["accuracy_size"])
    out.put("images_written", {"images": cfg["accuracy_images"], "size": list(cfg["accuracy_size"]),
                               "seconds": round(made, 1)})
    config = EstimateConfig(model=cfg["accuracy_model"], data=str(root), allow_random_weights=True,
                            tokens=TokenRange(**dict(zip(("start", "stop", "stride"), map(int, cfg["accuracy_tokens"].split(":"))))),
                            batch_size=cfg["accuracy_batch"],
                            limit=cfg["accuracy_limit"])
    out.put("settings", config.model_dump(mode="json"))
    began = time.perf_counter()
    with quiet(folder / "accuracy-command.log"), processes(cfg["device"]) as procs:
        run = run_estimate(config, procs)
    images, points = run.local_images, len(run.meta.grid)
    out.put("result", {
        "images": images, "grid_points": points, "decode_s": round(run.decode_s, 2),
        "evaluate_s": round(run.evaluate_s, 2), "wall_s": round(time.perf_counter() - began, 1),
        "images_decoded_per_s": round(images / max(run.decode_s, 1e-9)),
        "image_passes_per_s": round(images * points / max(run.evaluate_s, 1e-9)),
        "end_to_end_image_passes_per_s": round(images * points / max(run.decode_s + run.evaluate_s, 1e-9)),
    })
    shutil.rmtree(root, ignore_errors=True)


RUNNERS = {"core": section_core, "profile": section_profile, "engine": section_engine, "bench": section_bench,
           "accuracy": section_accuracy, "runtimes": section_runtimes}


# --- the report --------------------------------------------------------------------------------------

def fmt(value, pattern: str = "{:.3f}") -> str:
    """A figure for a table cell; ``n/a`` where it was not measured."""
    return "n/a" if value is None else pattern.format(value)


def md_table(header: str, rows: list[list]) -> list[str]:
    """A Markdown table: ``header`` names the columns, separated by `` | ``; a trailing ``>``
    right-aligns one (``"batch> | method"``); each row is its cells."""
    names = header.split(" | ")
    lines = ["| " + " | ".join(n.rstrip(">") for n in names) + " |",
             "|" + "|".join(" ---: " if n.endswith(">") else " --- " for n in names) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def command_line(res: dict) -> list[str]:
    """A pomt command run by a section, how it ended and, if it failed, its last line."""
    if "command" not in res:
        return []
    code = res.get("exit_code")
    if code is None:
        ended = "did not finish"
    elif code == 0:
        ended = f"exit code 0, {res.get('wall_s')} s"
    else:
        ended = f"{'refused' if code == 2 else 'failed'} with exit code {code} after {res.get('wall_s')} s"
    lines = [f"`{res['command']}` ({ended})", ""]
    if res.get("error"):
        lines += [f"> {res['error']}", ""]
    return lines


def md_core(core: dict) -> list[str]:
    lines = ["Each variant's median ms; in brackets the ratio to the unpatched model and to "
             "its ideal. `pomt` is the default block (in float16/bfloat16 on CUDA: fused attention and a Triton "
             "kernel for the attention received); `pomt(lean)` and `pomt(explicit)` force its other two ways of "
             "scoring: log-probabilities from fused attention by a chunked matrix product, or the full softmax "
             "matrix (the paper's way). On CUDA every POMT block keeps and averages its tokens by one Triton kernel; "
             "`pomt(ops)` is the default block with that reduction by tensor operations (sorts, gathers, a mean) "
             "instead.", ""]
    for s in core.get("scores", []):
        product = (f"chunked product {s['product_max_rel_error']:.2e} (same order: {s['product_same_order']}), "
                   if "product_max_rel_error" in s else "")
        lines.append(f"- scores, {s['dtype']} (log-sum-exp from: {s['fused_lse_kernel']}; received attention "
                     f"by: {s.get('received_kernel', 'no such kernel')}): max rel. error of the lean block "
                     f"{s['lean_max_rel_error']:.2e} (same order: {s['lean_same_order']}), {product}explicit "
                     f"{s['explicit_max_rel_error']:.2e} (same order: {s['explicit_same_order']})")
    for where, state in core.get("received_kernel", {}).items():
        lines.append(f"- the attention received, {where}, by the default block: {state}")
    for where, state in core.get("prune_kernel", {}).items():
        lines.append(f"- the reduction (kept tokens and the mean of the rest), {where}: {state}")
    lines += md_kernels(core.get("kernels", []))
    tables = core.get("tables", [])
    if not tables:
        return lines + ["", "No table was timed."]
    names = list(dict.fromkeys(n for t in tables for n in t["variants"]))
    rows = []
    for t in tables:
        cells = [f"{t['batch']}, {t['dtype']}, {t['mode']}"]
        for n in names:
            v = t["variants"].get(n, {})
            if not v.get("ms"):
                cells.append(v.get("status") or "n/a")
                continue
            ratios = [fmt(v.get("vs_none"))] + ([fmt(v["vs_ideal"])] if v.get("vs_ideal") else [])
            cells.append(fmt(v["ms"]) + (f" ({', '.join(ratios)})" if n != "none" else ""))
        rows.append(cells)
    return lines + [""] + md_table(" | ".join(["batch, dtype, mode", *(n + ">" for n in names)]), rows)


def md_kernels(kernels: list[dict]) -> list[str]:
    """Where POMT's time over its ideal goes, per traced batch size."""
    lines = []
    for k in kernels:
        head = f"Kernels of one forward pass, batch {k['batch']}, {k['dtype']}, eager ({k['timer']}, µs"
        if "error" in k:
            lines += ["", f"{head}): not traced ({k['error']})"]
            continue
        shown, rest = k["rows"][:KERNEL_ROWS], k["rows"][KERNEL_ROWS:]
        lines += ["", f"{head}, mean of 2 x {k['passes']} passes): POMT {k['pomt_total_us']:.1f}, its ideal "
                      f"{k['ideal_total_us']:.1f}, difference {k['pomt_total_us'] - k['ideal_total_us']:+.1f}; "
                      f"the {len(shown)} largest differences (the {len(rest)} others: "
                      f"{sum(r['difference_us'] for r in rest):+.1f}):", ""]
        lines += md_table("kernel | pomt µs> | ideal µs> | difference µs>",
                          [[f"`{r['kernel'][:90].replace('|', '/')}`", fmt(r["pomt_us"], "{:.1f}"),
                            fmt(r["ideal_us"], "{:.1f}"), fmt(r["difference_us"], "{:+.1f}")] for r in shown])
    return lines


def md_profile(prof: dict) -> list[str]:
    rows, failures = [], []
    for p in prof.get("profiles", []):
        if "points" not in p:
            rows.append([p["name"], p["run"], p["wall_s"], "n/a", "n/a", f"exit code {p['exit_code']}", "n/a"])
            failures.append(f"- {p['name']} run {p['run']}: {p.get('error') or 'no profile written'}")
            continue
        steps = ", ".join(f"b{s['batch_size']} {s['from_tokens']}\u2192{s['to_tokens']} \u2212{s['drop_pct']:.1f}%"
                          for s in p.get("steps", [])[:6]) or "none"
        rows.append([p["name"], p["run"], p["wall_s"], p["measuring_s"], p["points"], p["status_counts"], steps])
    lines = md_table("profile | run | wall s> | measuring s> | points> | statuses | largest steps", rows)
    lines += [""] + failures + ([""] if failures else [])
    if prof.get("agreement"):
        lines += md_table("profile | batch> | points> | median \\|L1\u2212L2\\|/L2> | p90> | max>",
                          [[a["name"], a["batch_size"], a["points"], f"{a['median_pct']}%", f"{a['p90_pct']}%",
                            f"{a['max_pct']}%"] for a in prof["agreement"]])
        compared = [a for a in prof["agreement"] if "steps_both" in a]
        if compared:
            lines += [""] + md_table(
                "profile | batch> | steps in both runs> | in run a only | in run b only",
                [[a["name"], a["batch_size"], len(a["steps_both"]), ", ".join(a["steps_a_only"]) or "none",
                  ", ".join(a["steps_b_only"]) or "none"] for a in compared])
    else:
        lines.append("No two runs of a profile to compare.")
    for p in prof.get("profiles", []):
        for w in p.get("watched", []):
            lines.append(f"- {p['name']} run {p['run']}, batch {w['batch_size']}: n {w['from']}\u2192{w['to']}: "
                         f"{w['from_ms']} \u2192 {w['to_ms']} ms ({w['change_pct']:+.2f}%)")
    return lines


def md_engine(engine: dict) -> list[str]:
    if not engine.get("runs"):
        return ["No run was traced."]
    lines = ["Where the time of a profile goes, on a grid of "
             f"{len(engine['settings']['grid'])} points with the default settings: the timed calls, the "
             "warm-up calls (and CUDA-graph captures), the host's work inside a visit (patching, the "
             "pooled statistics) and between visits; calls per point, warm-up included; the spread of a "
             "point's samples (p90/p10, coefficient of variation); how much slower a visit's first timed "
             "call is than its others.", ""]
    rows = []
    for r in engine["runs"]:
        m = r["summary"]
        rows.append([r["name"], r["points"], m["visits"], m["wall_s"], m["timed_s"], m["warmup_s"],
                     m["host_in_visits_s"], m["outside_visits_s"],
                     f"{fmt(m['calls_per_point_median'], '{:.0f}')} (max {fmt(m['calls_per_point_max'], '{}')})",
                     fmt(m["spread_p90_p10_median"], "{:.3f}"), fmt(m["cv_median"], "{:.2%}"),
                     fmt(m["first_call_vs_rest_median"], "{:+.1%}")])
    return lines + md_table("run | points> | visits> | wall s> | timed> | warm-up> | host in> | between> | "
                            "calls/point | p90/p10> | CV> | first call>", rows)


def timing_cells(row: dict) -> list[str]:
    """A bench row's median (or its status where it has none), p10-p90 and change against none."""
    median = fmt(row["latency_ms"]) if row["latency_ms"] is not None else row["status"]
    return [median, f"{fmt(row['p10_ms'])}-{fmt(row['p90_ms'])}", fmt(row["latency_change_pct"], "{:+.1f}%")]


def change_interval(row: dict) -> str:
    """The interval of a bench row's change against none (pooled samples and rounds), where it has one."""
    low, high = row.get("change_low_pct"), row.get("change_high_pct")
    return "" if low is None or high is None else f"{low:+.1f}% to {high:+.1f}%"


def md_bench(bench: dict) -> list[str]:
    lines = command_line(bench)
    if bench.get("rows"):
        lines += md_table("batch> | method | tokens out> | median ms> | p10-p90 ms | vs none> | its interval",
                          [[r["batch_size"], r["setting"], fmt(r["tokens_out"], "{}"), *timing_cells(r),
                            change_interval(r)] for r in bench["rows"]])
    return lines


def md_accuracy(acc: dict) -> list[str]:
    made = acc.get("images_written", {})
    written = (f"{made.get('images')} generated JPEGs of {'x'.join(str(v) for v in made.get('size', []))} px "
               f"(written in {made.get('seconds')} s)") if made else "no images written"
    r = acc.get("result")
    if not r:
        return [f"{written}; nothing evaluated."]
    return [f"{acc['settings']['model']}, {r['images']} of {written}, batch {acc['settings']['batch_size']}, "
            f"{r['grid_points']} grid points: decoded in {r['decode_s']} s ({r['images_decoded_per_s']} images/s), "
            f"evaluated in {r['evaluate_s']} s ({r['image_passes_per_s']} image passes/s); "
            f"{r['end_to_end_image_passes_per_s']} image passes/s from JPEG to logits."]


def md_runtimes(runtimes: dict) -> list[str]:
    lines = command_line(runtimes)
    if runtimes.get("providers"):
        lines += [f"ONNX Runtime providers: {runtimes['providers'].get('onnxruntime')}", ""]
    if runtimes.get("rows"):
        lines += md_table("batch> | runtime | method | median ms> | p10-p90 ms | vs none> | vs eager>",
                          [[r["batch_size"], r["runtime"], r["setting"], *timing_cells(r),
                            fmt(r["runtime_change_pct"], "{:+.1f}%")] for r in runtimes["rows"]])
    return lines


RENDERERS = {"core": md_core, "profile": md_profile, "engine": md_engine, "bench": md_bench,
             "accuracy": md_accuracy, "runtimes": md_runtimes}


def md_section(name: str, sec: dict) -> list[str]:
    """A section's heading, how it ended when it did not complete, and what it measured."""
    lines = ["", f"## {name}", ""]
    if sec["status"] != "complete":
        lines += [f"**{sec['status']}** after {sec['seconds']} s; the last line of its logs "
                  f"({sec.get('log', 'logs/' + name + '.log')}):", "", f"> {sec.get('last_line', '')}", ""]
    if sec.get("results"):
        lines += RENDERERS[name](sec["results"])
    else:
        lines.append("Nothing measured.")
    while lines[-1] == "":
        lines.pop()
    return lines


def markdown(report: dict) -> str:
    env = report.get("environment", {})
    info = env.get("info", {})
    lines = [f"# pomt GPU report ({info.get('date', '')[:10]})", "",
             f"`{report['command']}`", "",
             f"{info.get('gpu', 'no GPU')}; torch {info.get('torch')}, CUDA {info.get('cuda') or 'none'}, timm "
             f"{info.get('timm')}, Triton {info.get('triton') or 'not installed'}, pomt {info.get('pomt')}, Python "
             f"{info.get('python')}. Clocks were not "
             "changed; as read before and after:", ""]
    for when in ("before", "after"):
        if when in env:
            lines.append(f"- {when}: " + ", ".join(f"{k} {v}" for k, v in env[when].items()))
    lines += ["", "| section | status | seconds |", "| --- | --- | ---: |"]
    for name in SECTIONS:
        sec = report.get(name)
        if sec:
            lines.append(f"| {name} | {sec['status']} | {sec['seconds']} |")
    lines.append(f"| all | | {report.get('total_s', 'running')} |")
    extras = report.get("extras")
    if extras:
        lines += ["", f"Logs, each section's JSON and the raw files: `{extras['file']}` ({extras['files']} files, "
                  f"{extras['bytes'] / 2**20:.2f} MiB)."]
        if extras["dropped"]:
            lines.append("Left out to stay under 16 MiB: " + ", ".join(
                f"`{d['file']}` ({d['bytes'] / 2**20:.1f} MiB)" for d in extras["dropped"]) + ".")
    for name in SECTIONS:
        if name in report:
            lines += md_section(name, report[name])
    lines += ["", "## targets", ""]
    lines += [f"- {t}" for t in targets(report)] or ["No target measured."]
    return "\n".join(lines) + "\n"


def targets(report: dict) -> list[str]:
    """The issue's targets, each with the measured figure and whether it was met."""
    out = []
    tables = report.get("core", {}).get("results", {}).get("tables", [])
    for t in tables:
        pomt = t["variants"].get("pomt", {})
        ideal = t["variants"].get("ideal(pomt)", {})
        where = f"batch {t['batch']}, {t['dtype']}, {t['mode']}"
        if t["batch"] >= 64 and pomt.get("vs_ideal"):
            # Where the ideal itself is slower than the unpatched model, the host's Python
            # overhead (eager launches) is being timed, not the GPU's work.
            launch_bound = (ideal.get("vs_none") or 0) > 1
            verdict = ("not meaningful: the ideal is slower than the unpatched model (launch-bound)" if launch_bound
                       else "met" if pomt["vs_ideal"] <= 1.05 else "missed")
            out.append(f"POMT \u2264 1.05x its ideal, {where}: {pomt['vs_ideal']:.3f}x ({verdict})")
        if t["batch"] >= 256 and pomt.get("vs_none"):
            out.append(f"POMT faster than unpatched, {where}: {pomt['vs_none']:.3f}x "
                       f"({'met' if pomt['vs_none'] < 1 else 'missed'})")
    prof = report.get("profile", {}).get("results", {})
    for p in prof.get("profiles", []):
        if p["name"].startswith("bs64") and "measuring_s" in p:
            out.append(f"full profile, batch 64 float32 ({p['name']}), run {p['run']}: {p['wall_s']} s wall "
                       f"({'met' if p['wall_s'] <= 30 else 'missed'} \u2264 30 s)")
    for a in prof.get("agreement", []):
        out.append(f"agreement, {a['name']}, batch {a['batch_size']}: median {a['median_pct']}% "
                   f"({'met' if a['median_pct'] <= 1 else 'missed'} \u2264 1%)")
    if "total_s" in report:
        verdict = "met" if report["total_s"] <= 480 else "missed"
        left = [n for n in SECTIONS if n not in report]
        short = [n for n in SECTIONS if n in report and report[n].get("status") != "complete"]
        if left or short:
            # Within the time only because something was not measured: say what.
            gaps = ([f"not run: {', '.join(left)}"] if left else []) + ([f"not complete: {', '.join(short)}"]
                                                                        if short else [])
            verdict = f"{verdict} as run, but not the whole report ({'; '.join(gaps)})"
        out.append(f"whole report: {report['total_s']} s ({verdict}; \u2264 480 s)")
    return out


def write_report(folder: Path, work: Path, report: dict) -> None:
    """The archive of the work folder's files, then report.json and report.md that list it."""
    report["extras"] = write_extras(folder, work)
    write_json(folder / "report.json", report)
    atomic_write_text(folder / "report.md", markdown(report))


def run_section(name: str, args, work: Path) -> dict:
    """Run one section in a child process under its time limit; its results and how it ended."""
    limit = args.limits[name]
    log = work / "logs" / f"{name}.log"
    path = work / "sections" / f"{name}.json"
    path.unlink(missing_ok=True)  # a failed child must not leave an earlier run's results in the report
    command = [sys.executable, str(Path(__file__).resolve()), "--output-dir", str(args.output_dir), "--child", name,
               "--core-modes", args.core_modes, "--work-dir", str(work)]
    for flag, value in (("--core-batches", args.core_batches), ("--profiles", args.profiles)):
        if value:
            command += [flag, str(value)]
    if args.smoke:
        command.append("--smoke")
    began = time.perf_counter()
    with open(log, "w") as fh:
        child = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT)
        try:
            code = child.wait(timeout=limit)
            status = "complete" if code == 0 else f"failed (exit code {code})"
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            status = f"cut short at its limit of {limit} s"
    try:
        results = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        results = {}
    section = {"status": status, "seconds": round(time.perf_counter() - began, 1), "limit_s": limit}
    if status != "complete":
        line, source = last_line(log, *work.glob(f"{name}-command*.log"))
        section["last_line"] = line
        section["log"] = f"{(source or log).relative_to(work)} in {EXTRAS}"
    return {**section, "results": results}


def refuse(message: str) -> None:
    """Bad input: one line on standard error, exit code 2, nothing written."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="the same code paths on the CPU with tiny models")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    parser.add_argument("--limit", action="append", default=[], metavar="SECTION=SECONDS",
                        help="a section's time limit (defaults: " + ", ".join(f"{k}={v}" for k, v in LIMITS_S.items())
                        + ")")
    parser.add_argument("--work-dir", type=Path, help="where the sections' own files go, outside DIR (default: a "
                        "temporary folder, removed at the end); what is worth keeping is archived in DIR/" + EXTRAS)
    parser.add_argument("--core-batches", help="batch sizes of the core section (default: 256,64,4,1)")
    parser.add_argument("--core-modes", choices=("eager", "cuda_graphs", "both"), default="both",
                        help="timing modes of the core section")
    parser.add_argument("--profiles", help="profiles of the profile section, comma-separated (default: "
                        + ",".join(FULL["profile_names"]) + "; also bs4_float16_cudagraphs)")
    parser.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.core_batches:
        batches = args.core_batches.split(",")
        if not all(b.isdigit() and int(b) > 0 for b in batches):
            refuse(f"--core-batches {args.core_batches}: write positive batch sizes, e.g. 256,64")
        cfg["core_batches"] = [int(b) for b in batches]
    if args.profiles:
        cfg["profile_names"] = args.profiles.split(",")
    if args.core_modes != "both":
        cfg["core_graphs"] = [g for g in cfg["core_graphs"] if g == (args.core_modes == "cuda_graphs")]
    folder = args.output_dir.resolve()
    if args.child:
        if os.environ.get("POMT_GPU_REPORT_FAIL") == args.child:
            raise RuntimeError(f"the {args.child} section fails on purpose (POMT_GPU_REPORT_FAIL={args.child})")
        if args.smoke:
            import torch

            torch.set_num_threads(1)  # the smoke run checks code paths; one thread keeps a busy machine fast
        work = args.work_dir.resolve()
        RUNNERS[args.child](cfg, SectionWriter(work, args.child), work)
        return

    import torch

    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        refuse(f"unknown section(s) {', '.join(unknown)}: use {', '.join(SECTIONS)}")
    known = [name for name, _ in cfg["profiles"]]
    unknown = [p for p in cfg["profile_names"] if p not in known]
    if unknown:  # a profile section that would skip them all reports nothing
        refuse(f"unknown profile(s) {', '.join(unknown)}: use {', '.join(known)}")
    args.limits = dict(SMOKE_LIMITS_S if args.smoke else LIMITS_S)
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in SECTIONS or not seconds.replace(".", "", 1).isdigit() or float(seconds) <= 0:
            refuse(f"--limit {item}: write SECTION=SECONDS with a section of {', '.join(SECTIONS)}")
        args.limits[name] = float(seconds)
    if args.work_dir and (args.work_dir.resolve() == folder or args.work_dir.resolve().is_relative_to(folder)):
        refuse(f"--work-dir {args.work_dir} is inside --output-dir: choose a folder outside it")
    if not args.smoke and not torch.cuda.is_available():
        refuse("no CUDA GPU here: run on one, or pass --smoke for the CPU check")
    work = args.work_dir.resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="pomt-gpu-report-"))
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("sections", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    report: dict = {"command": "python scripts/gpu_report.py " + " ".join(sys.argv[1:]), "smoke": args.smoke,
                    "environment": {"info": environment(), "before": read_gpu()}}
    write_report(folder, work, report)
    for name in sections:
        report[name] = run_section(name, args, work)
        report["total_s"] = round(time.perf_counter() - began, 1)
        write_report(folder, work, report)
        print(f"{name}: {report[name]['status']} in {report[name]['seconds']} s", flush=True)
    report["environment"]["after"] = read_gpu()
    report["total_s"] = round(time.perf_counter() - began, 1)
    write_report(folder, work, report)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"report: {folder / 'report.md'} and {folder / EXTRAS} ({report['total_s']} s)")


if __name__ == "__main__":
    main()
