"""Shared fixtures and helpers of the test modules: tiny timm ViTs built with pretrained=False,
CLI runners, generated image folders, synthetic latency and accuracy profiles, fake clock tools.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import timm
import torch
from PIL import Image

from pomt_cli import versions
from pomt_cli.formats.common import ProfileMeta, write_profile
from pomt_cli.measure.runtimes import Runtime

# The tests run in pytest-xdist's workers, one per core, each test file in one worker, so that
# a module's fixtures are made once (pyproject.toml: -n auto --dist loadfile). Each worker
# computes with its share of the cores (at most two threads), so that the workers do not
# oversubscribe the machine. The commands that tests start as processes use torch's default.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads(), (os.cpu_count() or 1) // _workers)))


def needs(feature: versions.Feature) -> pytest.MarkDecorator:
    """Skip a test of ``feature`` on a torch too old for it: pomt refuses the feature there in
    one line before any work (tests/test_versions.py checks that refusal), so the behaviour
    the test checks does not exist there."""
    return pytest.mark.skipif(not versions.supported(feature),
                              reason=f"{feature.what} needs {feature.needs}; this is torch {torch.__version__}")


#: What each runtime needs beyond eager PyTorch.
RUNTIME_FEATURE = {Runtime.compile: versions.COMPILE, Runtime.onnxruntime: versions.ONNX_EXPORT}


def triton_major() -> int | None:
    """The installed Triton's major version, or None without Triton. The kernel module
    refuses to import below 3 (torch 2.1 brings Triton 2.1); the tests decide by the
    version, so that a refusal on Triton 3 fails instead of skipping."""
    import importlib.metadata

    try:
        return int(importlib.metadata.version("triton").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return None


def runtime_param(runtime: Runtime | str, *values) -> pytest.param:
    """``pytest.param(runtime, *values)``, skipped where this torch is too old for the runtime."""
    feature = RUNTIME_FEATURE.get(Runtime(runtime))
    return pytest.param(runtime, *values, marks=() if feature is None else needs(feature))


def tiny_vit(name: str = "vit_tiny_patch16_224", **overrides) -> torch.nn.Module:
    """A small, randomly initialised timm model of the family ``name`` (eval mode, float32).

    The defaults give 32x32 inputs with patch 8 (16 patch tokens), 3 blocks, width 48.
    Any keyword overrides them (e.g. ``reg_tokens=4``, ``init_values=1e-5``).
    """
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.fixture
def make_vit():
    return tiny_vit


def run_pomt(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m pomt_cli ARGS`` in a subprocess; returns the completed process (text mode)."""
    return subprocess.run(
        [sys.executable, "-m", "pomt_cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def pomt():
    return run_pomt


def run_in_process(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``pomt ARGS`` in this process through the CLI's ``main``; (exit code, stdout, stderr)."""
    from pomt_cli.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def load_script(name: str):
    """``scripts/NAME.py`` imported as module ``NAME`` (registered, so that its dataclasses find it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def script_refusal(main, argv: list[str], capsys) -> str:
    """Run a script's ``main(argv)``; assert exit code 2, one ``error:`` line, no traceback; return it."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (argv, err)
    return lines[0]


def image_folder(root: Path, sizes: dict[str, int], *, size=(40, 30), seed: int = 0) -> Path:
    """One subfolder per class with ``sizes[class]`` random JPEGs (classes differ in mean colour)."""
    rng = np.random.default_rng(seed)
    for c, (name, count) in enumerate(sizes.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 60, (*size[::-1], 3), dtype=np.uint8) + np.uint8(60 * c)
            Image.fromarray(pixels).save(folder / f"img_{i:03d}.jpg", quality=90)
    return root


# Synthetic profiles whose answers are known by hand. The latency curves have steps where the
# utility must jump; the accuracy curve falls slowly and then fast. N = 17 (16 patches and a
# class token), as in the tiny test ViT.
MODEL = "vit_tiny_patch16_224"
N = 17
GEOMETRY = dict(model=MODEL, num_tokens=N, num_prefix=1, num_blocks=3, embed_dim=48)

# Batch 4: a step between n = 15 and n = 13 (latency nearly halves for 2 points of accuracy).
LAT_B4 = {17: 10.0, 15: 9.8, 13: 5.2, 11: 5.0, 9: 4.8, 7: 4.6, 5: 4.4, 3: 4.213}
# Batch 1: the step lies between n = 11 and n = 9.
LAT_B1 = {17: 4.0, 15: 3.9, 13: 3.8, 11: 3.7, 9: 2.0, 7: 1.9, 5: 1.8, 3: 1.7}
# Accuracy on a finer grid than latency: the points 16, 14, ... are not in the latency grid.
ACC = {17: 80.0, 16: 80.0, 15: 80.0, 14: 79.0, 13: 78.0, 12: 75.0, 11: 70.0, 10: 66.0, 9: 60.0,
       8: 50.0, 7: 40.0, 6: 30.0, 5: 20.0, 4: 15.0, 3: 10.0, 2: 5.0}


def latency_frame(curves: dict[int, dict[int, float | None]]) -> pl.DataFrame:
    """A latency profile frame; None is an out-of-memory point."""
    rows = [
        {"batch_size": b, "tokens": n, "latency_ms": ms, "p10_ms": ms, "p90_ms": ms,
         "samples": 0 if ms is None else 20, "status": "oom" if ms is None else "ok"}
        for b, curve in curves.items() for n, ms in curve.items()
    ]
    return pl.DataFrame(rows, schema={"batch_size": pl.Int64, "tokens": pl.Int64, "latency_ms": pl.Float64,
                                      "p10_ms": pl.Float64, "p90_ms": pl.Float64, "samples": pl.Int64,
                                      "status": pl.String})


def write_latency(path: Path, curves: dict[int, dict[int, float | None]] | None = None, **meta) -> Path:
    """A latency profile file at ``path`` (default curves: batch 1 and batch 4)."""
    curves = curves if curves is not None else {1: LAT_B1, 4: LAT_B4}
    fields = {**GEOMETRY, "dtype": "float16", "grid": sorted({n for c in curves.values() for n in c}, reverse=True),
              "batch_sizes": list(curves), "device_preset": "orin", "device_display_name": "Jetson AGX Orin",
              "device_name": "Orin", "torch_device": "cuda:0", "timing_mode": "eager", "host": "board",
              "complete": True, **meta}
    return write_profile(path, latency_frame(curves), ProfileMeta(kind="latency", **fields))


def write_accuracy(path: Path, accuracy: dict[int, float] | None = None, **meta) -> Path:
    """An accuracy profile file at ``path``."""
    accuracy = accuracy if accuracy is not None else ACC
    frame = pl.DataFrame({"tokens": list(accuracy), "accuracy": list(accuracy.values()),
                          "top5": [min(100.0, a + 10) for a in accuracy.values()],
                          "images": [1000] * len(accuracy)})
    fields = {**GEOMETRY, "dtype": "float32", "grid": list(accuracy), "estimator": "random", "weights": "random",
              "weights_sha256": "0" * 64, "data": "digits", "num_images": 1000, "num_classes": 10,
              "device_type": "cpu", "host": "workstation", **meta}
    return write_profile(path, frame, ProfileMeta(kind="accuracy", **fields))


@pytest.fixture
def profiles(tmp_path) -> tuple[Path, Path]:
    """A latency profile (batch 1 and 4) and an accuracy profile, in ``tmp_path/in``."""
    folder = tmp_path / "in"
    folder.mkdir()
    return write_latency(folder / "lat.parquet"), write_accuracy(folder / "acc.parquet")


# Fake nvidia-smi, nvpmodel, jetson_clocks and cpupower executables that record their arguments.
FAKE_TOOL = """#!/bin/sh
echo "$(basename "$0")${*:+ $*}" >> "$FAKE_LOG"
if [ -n "$FAKE_FAIL" ]; then
  case "$(basename "$0") $*" in *"$FAKE_FAIL"*) echo "fake failure: insufficient permissions" >&2; exit 3;; esac
fi
"""
FAKE_OUTPUT = {
    "nvidia-smi": """case "$*" in
  *clocks.max.graphics,clocks.max.memory*) echo "1980, 2619";;
  *clocks.max.graphics*) echo "1980";;
  *--query-gpu=name*) echo "name, pstate, clocks.current.graphics [MHz]"; echo "NVIDIA Fake, P0, 1980 MHz";;
esac
""",
    "nvpmodel": """case "$*" in -q) printf 'NV Fan Mode:quiet\\nNV Power Mode: MODE_30W\\n2\\n';; esac
""",
    "jetson_clocks": """case "$*" in --show) echo "SOC family:tegra234  Machine:Fake Orin";; esac
""",
    "cpupower": "",
}


class FakeTools:
    """Fake clock tools in ``bin``; each call appends ``tool args`` to ``log``."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        self.log = root / "calls.log"
        self.log.touch()
        self.state = root / "state"
        for name, body in FAKE_OUTPUT.items():
            path = self.bin / name
            path.write_text(FAKE_TOOL + body)
            path.chmod(0o755)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()

    def env(self, **extra: str) -> dict[str, str]:
        """An environment for subprocesses: the fakes first on PATH, the state folder, the log."""
        env = dict(os.environ)
        env.update(PATH=f"{self.bin}{os.pathsep}{env['PATH']}", FAKE_LOG=str(self.log),
                   POMT_STATE_DIR=str(self.state), **extra)
        return env

    def remove(self, name: str) -> None:
        (self.bin / name).unlink()


def preset_file(tmp_path: Path, name: str, *, needs_root: bool = False, requires_path: str | None = None) -> Path:
    """A copy of a bundled preset as a file, with ``needs_root`` and ``requires_path`` replaced (or added)."""
    text = (Path(__file__).parents[1] / "src/pomt_cli/configs/devices" / f"{name}.toml").read_text()
    text = text.replace("needs_root = true", f"needs_root = {str(needs_root).lower()}")
    if requires_path is not None:
        line = f'requires_path = "{requires_path}"'
        lines = text.splitlines()
        if any(old.startswith("requires_path") for old in lines):
            lines = [line if old.startswith("requires_path") else old for old in lines]
        else:
            lines.insert(lines.index("[clocks]") + 1, line)
        text = "\n".join(lines) + "\n"
    path = tmp_path / f"fake-{name}.toml"
    path.write_text(text)
    return path


def jetson_preset(tmp_path: Path, name: str = "orin", *, needs_root: bool = False) -> Path:
    """A bundled Jetson preset as a file whose ``requires_path`` exists: an ``nv_tegra_release`` in ``tmp_path``."""
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.0\n")
    return preset_file(tmp_path, name, needs_root=needs_root, requires_path=str(release))


def sigint_default() -> None:
    """``preexec_fn`` for a child that must see Ctrl-C: a shell's background job starts with
    SIGINT ignored, and Python then never turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def fake_tools(tmp_path, monkeypatch) -> FakeTools:
    """Fake tools on PATH for this process; root is assumed (os.geteuid patched to 0)."""
    tools = FakeTools(tmp_path)
    for key, value in tools.env().items():
        if key in ("PATH", "FAKE_LOG", "POMT_STATE_DIR"):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    return tools
