"""What the command line imports before a command runs, and the light names it parses with.

``pomt --help``, a command's help, ``--version``, shell completion (the shell runs pomt on
every TAB) and an option refused while parsing must answer without importing torch, timm
and the rest: each case runs as the user runs it, ``python -m pomt_cli``, under
``-X importtime``, which lists every module the process imported. The names that the
options take from standard-library modules (``pomt_cli.names``, ``pomt_cli.defaults``,
``pomt_cli.options``) are checked against the library's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import typing

import pytest
import torch

#: Packages the help path must not import: each takes from a fifth of a second (numpy) to
#: seconds (torch, timm with torchvision).
HEAVY = {"torch", "timm", "torchvision", "polars", "numpy", "matplotlib", "PIL", "safetensors", "onnx",
         "onnxruntime"}
#: Typer 0.29 (not 0.22) checks every option's value with a pydantic TypeAdapter once a
#: command's options are processed: pydantic counts as heavy only where none is (``pomt
#: --help``, ``--version``), where it would be pomt's own doing.
PYDANTIC = {"pydantic", "pydantic_core"}


def imported(args: list[str], env: dict[str, str] | None = None,
             code: str | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime -m pomt_cli ARGS`` (or ``-c CODE``); the process and the top-level
    packages it imported, pomt_cli among them (the listing saw its imports)."""
    command = ["-m", "pomt_cli", *args] if code is None else ["-c", code]
    done = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "80", **(env or {})})
    packages = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "pomt_cli" in packages, done.stderr[-2000:]
    return done, packages


@pytest.mark.parametrize("args", [
    [], ["--help"], ["--version"], ["profile", "--help"], ["estimate-accuracy", "--help"], ["compute-r", "--help"],
    ["refine", "--help"], ["bench", "--help"], ["demo", "--help"], ["export", "--help"], ["clocks", "--help"],
    ["clocks", "lock", "--help"],
], ids=lambda args: " ".join(args) or "no arguments")
def test_help_and_version_import_no_heavy_package(args):
    done, packages = imported(args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip(), done.stderr[-2000:]
    heavy = HEAVY | (PYDANTIC if len(args) < 2 else set())
    assert not packages & heavy, sorted(packages & heavy)


@pytest.mark.parametrize("args, option", [
    (["bench", "--method", "merge"], "--method"),
    (["profile", "--dtype", "fp8"], "--dtype"),
    (["estimate-accuracy", "--data", "digits", "--estimator", "nope"], "--estimator"),
    (["profile", "--seed", "-1"], "--seed"),
    (["profile", "--min-samples", "0"], "--min-samples"),
    (["profile", "--tokens", "197:17"], "--tokens"),
    (["bench", "--runtime", "eager,tensorflow"], "--runtime"),
    (["profile", "--budget", "0"], "--budget"),
    (["demo", "--output-dir", "runs/a\nb"], "--output-dir"),
    (["profile", "--budgte", "1"], "--budgte"),
    (["refine"], "REPORT"),
    # Options whose text the command reads before it imports the library.
    (["profile", "--batch-size", "0"], "--batch-size"),
    (["profile", "--layer", "1,x", "--method", "pomt"], "--layer"),
    (["profile", "--ort-providers", ","], "--ort-providers"),
    (["bench", "--batch-size", "4,a"], "--batch-size"),
    (["bench", "--ort-providers", ","], "--ort-providers"),
    (["estimate-accuracy", "--data", "digits", "--layer", "2,2"], "--layer"),
    (["compute-r", "--latency", "l.parquet", "--accuracy", "a.parquet", "--batch-size", "-1"], "--batch-size"),
])
def test_an_option_refused_while_parsing_imports_no_heavy_package(args, option):
    done, packages = imported(args)
    errors = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert done.returncode == 2 and done.stdout == "", done.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error: ") and option in errors[0], errors
    assert not packages & HEAVY, sorted(packages & HEAVY)


@pytest.mark.parametrize("words, cword, expected", [
    ("pomt compute", "1", ["compute-r"]),
    ("pomt profile --dtype ", "3", ["float32", "float16", "bfloat16"]),
    ("pomt bench --method ", "3", ["none", "pomt", "tome", "topk"]),
    ("pomt clocks ", "2", ["status", "lock", "restore"]),
])
def test_shell_completion_imports_no_heavy_package(words, cword, expected):
    done, packages = imported([], {"_POMT_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": cword})
    assert done.returncode == 0 and done.stdout.split() == expected, done.stdout + done.stderr[-2000:]
    assert not packages & HEAVY, sorted(packages & HEAVY)


def _builtin(name: str) -> bool:
    """Whether the registered method ``name`` is one of pomt's own (not one a test or a user added)."""
    from pomt_cli.pruning.registry import get

    return type(get(name)).__module__.startswith("pomt_cli.pruning.")


def test_the_light_method_names_are_the_registered_built_ins():
    from pomt_cli import names
    from pomt_cli.bench import BASELINE
    from pomt_cli.formats.accuracy import RANDOM, estimators
    from pomt_cli.pruning import method_names

    assert tuple(m for m in method_names() if _builtin(m)) == names.METHODS
    assert names.BASELINE == BASELINE and names.RANDOM == RANDOM
    assert tuple(e for e in estimators() if e == RANDOM or _builtin(e)) == names.ESTIMATORS


def test_the_light_choices_are_the_library_s():
    from pomt_cli import names, options
    from pomt_cli.cli.options import Estimator, Method, Workload
    from pomt_cli.formats.common import DtypeName
    from pomt_cli.formats.latency import RuntimeName
    from pomt_cli.formats.latency import Workload as WorkloadName
    from pomt_cli.measure import runtimes

    assert typing.get_args(WorkloadName) == names.WORKLOADS
    assert typing.get_args(RuntimeName) == tuple(r.value for r in names.Runtime)
    assert typing.get_args(DtypeName) == tuple(d.value for d in options.Dtype)
    assert runtimes.Runtime is names.Runtime and runtimes.PROVIDER_ALIASES is names.PROVIDER_ALIASES
    assert [m.value for m in Method] == list(names.METHODS)
    assert [e.value for e in Estimator] == list(names.ESTIMATORS)
    assert [w.value for w in Workload] == list(names.WORKLOADS)


def test_the_light_modules_import_no_heavy_package_and_each_dtype_names_its_torch_dtype():
    # The modules the options are built from: the types and names of every option.
    done, packages = imported([], code="import pomt_cli.names, pomt_cli.defaults, pomt_cli.options, "
                              "pomt_cli.devices.bundled, pomt_cli.formats.command, pomt_cli.cli.options")
    assert done.returncode == 0 and not packages & (HEAVY | PYDANTIC), done.stderr[-2000:]
    from pomt_cli.options import Dtype

    expected = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    assert {d.value: d.torch for d in Dtype} == expected


def test_the_old_homes_of_the_moved_names_still_give_them():
    from pomt_cli import defaults, models, pipelines, selection
    from pomt_cli.devices import bundled, presets
    from pomt_cli.formats import command, common
    from pomt_cli.measure import timing

    assert models.DEFAULT_MODEL == defaults.DEFAULT_MODEL
    assert (pipelines.BUDGET_S, pipelines.ROUNDS, pipelines.ROUND_BUDGET_S, pipelines.DEMO_BUDGET_S) == (
        defaults.BUDGET_S, defaults.ROUNDS, defaults.ROUND_BUDGET_S, defaults.DEMO_BUDGET_S)
    assert (selection.DEFAULT_ALPHA, selection.REFINE_CANDIDATES) == (defaults.DEFAULT_ALPHA,
                                                                      defaults.REFINE_CANDIDATES)
    assert timing.MAX_SAMPLES == defaults.MAX_SAMPLES
    assert presets.preset_names is bundled.preset_names and common.command_line is command.command_line
