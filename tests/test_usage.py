"""The commands as users type them: the default model, help, shell completion, 80 columns."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from types import SimpleNamespace

import polars as pl
import pytest
from rich.console import Console

from conftest import needs, run_in_process
from pomt_cli import versions
from pomt_cli.bench import SCHEMA
from pomt_cli.models import DEFAULT_MODEL

DEFAULT_LINE = f"model: {DEFAULT_MODEL} (the default; --model NAME for another)"


@pytest.mark.parametrize("args", [
    ["profile", "--device", "cpu", "--cuda-graphs"],
    ["bench", "--device", "cpu", "--cuda-graphs"],
    ["estimate-accuracy", "--data", "digits", "--layer", "1"],
])
def test_the_default_model_is_named_first(args, capsys):
    # Bad input stops each command right after its first line, before any model is built.
    code, out, err = run_in_process(args, capsys)
    assert code == 2 and err.startswith("error:"), err
    assert out.splitlines() == [DEFAULT_LINE]


@needs(versions.ONNX_EXPORT)
def test_export_defaults_to_the_paper_model_too(tmp_path, capsys):
    code, out, err = run_in_process(["export", "--output", str(tmp_path / "m.onnx"), "--layer", "5"], capsys)
    assert code == 2 and "none has no layer" in err and out.splitlines() == [DEFAULT_LINE]


def test_a_model_given_is_named_without_the_default_note(capsys):
    code, out, _ = run_in_process(["profile", "--model", "digits-vit", "--device", "cpu", "--cuda-graphs"], capsys)
    assert code == 2 and out.splitlines() == ["model: digits-vit"]


@pytest.mark.parametrize("args, option", [
    (["profile", "--dtype", "float64"], "--dtype"),
    (["profile", "--method", "tome"], "--method"),
    (["bench", "--method", "merge"], "--method"),
    (["bench", "--dtype", "fp8"], "--dtype"),
    (["estimate-accuracy", "--data", "digits", "--estimator", "nope"], "--estimator"),
    (["export", "--output", "m.onnx", "--method", "merge"], "--method"),
])
def test_a_bad_choice_fails_at_parse_time_in_one_line(args, option, capsys):
    # Parsing refuses it before the command starts: not even the model line is printed.
    code, out, err = run_in_process(args, capsys)
    assert code == 2 and out == "", out
    assert err.startswith(f"error: Invalid value for '{option}'") and len(err.strip().splitlines()) == 1, err
    assert "is not one of" in err and f"`pomt {args[0]} --help`" in err


def _help(capsys, monkeypatch, *args: str, columns: int = 200) -> str:
    """``pomt ARGS --help`` in this process at COLUMNS wide (help wraps to the terminal's width)."""
    monkeypatch.setenv("COLUMNS", str(columns))
    code, out, err = run_in_process([*args, "--help"], capsys)
    assert code == 0, err
    return out


def test_profile_help_lists_the_presets_and_the_choices(capsys, monkeypatch):
    from pomt_cli.devices.presets import preset_names

    monkeypatch.setenv("TERM", "dumb")
    text = " ".join(_help(capsys, monkeypatch, "profile").replace("\u2502", " ").split())
    assert f"({', '.join(preset_names())})" in text, text
    assert "proxy|pomt" in text and "float32|float16|bfloat16" in text, text
    text = " ".join(_help(capsys, monkeypatch, "bench").replace("\u2502", " ").split())
    assert "none|pomt|tome|topk" in text, text


def test_help_names_the_default_model_and_no_bool_after_version(capsys, monkeypatch):
    for command in ("profile", "bench"):
        assert DEFAULT_MODEL in _help(capsys, monkeypatch, command)
    line = next(line for line in _help(capsys, monkeypatch).splitlines() if "--version" in line)
    assert "<bool>" not in line and "Print the version" in line
    assert "--install-completion" in _help(capsys, monkeypatch)


def check_help_at_80_columns(command: str, text: str) -> None:
    lines = text.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, text
    assert "\u2026" not in text and "<bool>" not in text, text
    # Typer before 0.22 escaped the brackets it adds ("\\[default: 3]") where markup is off.
    assert "\\[" not in text, text
    assert not [line for line in lines if line.rstrip().endswith("...") and not line.startswith("Usage:")], text
    if command in ("profile", "bench", "estimate-accuracy", "export"):
        assert DEFAULT_MODEL in text, text


@pytest.mark.parametrize("command", ["", "profile", "estimate-accuracy", "compute-r", "refine", "bench", "demo", "export",
                                     "clocks", "clocks status", "clocks lock", "clocks restore"])
def test_help_reads_whole_at_80_columns(command, capsys, monkeypatch):
    check_help_at_80_columns(command, _help(capsys, monkeypatch, *command.split(), columns=80))


def test_help_in_a_terminal_process_of_80_columns_reads_whole():
    # The cases above run in this process; this one as the user runs it.
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", "pomt_cli", "bench", "--help"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    check_help_at_80_columns("bench", done.stdout)


def test_show_completion_prints_the_script_for_a_named_shell():
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    done = subprocess.run([sys.executable, "-m", "pomt_cli", "--show-completion", "bash"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "_pomt_completion" in done.stdout and "_POMT_COMPLETE=complete_bash" in done.stdout
    # The completion itself: the shell asks with environment variables, pomt answers with names.
    env = {**os.environ, "_POMT_COMPLETE": "complete_bash", "COMP_WORDS": "pomt compute", "COMP_CWORD": "1"}
    done = subprocess.run([sys.executable, "-m", "pomt_cli"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.split() == ["compute-r"], done.stdout + done.stderr


def _render(renderable) -> str:
    console = Console(width=80, record=True, file=open(os.devnull, "w"), color_system=None)
    console.print(renderable)
    return console.export_text()


def test_the_bench_tables_read_whole_at_80_columns():
    from pomt_cli.cli.bench import _render as bench_tables

    rows = []
    for b in (1, 64):
        for method, setting, ms, acc in (("none", "none", 1234.567, 79.86), ("pomt", "pomt r=56 @3", 987.654, 78.12),
                                         ("tome", "tome r=16 (capped 12 from block 8)", 1001.25, 77.5),
                                         ("topk", "topk r=16", 999.999, 71.25)):
            rows.append({"batch_size": b, "method": method, "setting": setting, "tokens_out": 197 if method == "none" else 41,
                         "latency_ms": ms * b, "p10_ms": ms * b * 0.97, "p90_ms": ms * b * 1.08, "samples": 20,
                         "status": "ok", "latency_change_pct": None if method == "none" else -12.345,
                         "accuracy": acc, "top5": 95.0, "accuracy_change": None if method == "none" else -1.74,
                         "images": 50000, "predicted_ms": ms * b * 0.9 if method == "pomt" else None,
                         "predicted_by": "pomt" if method == "pomt" else None,
                         "prediction_error": 0.1111 if method == "pomt" else None,
                         # ToMe's interval holds 0: its change is not shown beyond it.
                         "change_low_pct": None if method == "none" else (-15.0 if method == "tome" else -14.0),
                         "change_high_pct": None if method == "none" else (3.0 if method == "tome" else -10.0)})
    frame = pl.DataFrame(rows, schema_overrides={k: v for k, v in SCHEMA.items() if k in rows[0]})
    for k in SCHEMA:
        if k not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=SCHEMA[k]).alias(k))
    title = f"{DEFAULT_MODEL} on NVIDIA Jetson AGX Orin (Orin), float16, CUDA graphs, 50000 images"
    text = "".join(_render(t) for t in bench_tables(frame, title, True))
    assert "\u2026" not in text and all(len(line) <= 80 for line in text.splitlines()), text
    for row in frame.iter_rows(named=True):
        for cell in (f"{row['latency_ms']:.3f}", f"{row['p10_ms']:.3g}-{row['p90_ms']:.3g}", f"{row['accuracy']:.2f}"):
            assert cell in text, (cell, text)
    assert "+11.1%" in text and "-12.3%" in text and "-1.74" in text
    marked = [line for line in text.splitlines() if "~-12.3%" in line]
    assert len(marked) == 2 and all(" tome " in line for line in marked)
    assert "~: no change beyond its 95% interval" in " ".join(text.split())


def test_the_accuracy_table_reads_whole_at_80_columns():
    from pomt_cli.cli.estimate_accuracy import block_tokens_text, summary_table

    grid = list(range(197, 0, -4))
    frame = pl.DataFrame({
        "layer": [layer for layer in (3, 11) for _ in grid], "tokens": grid * 2,
        "accuracy": [79.86 - (197 - n) * 0.3 for n in grid] * 2, "top5": [94.96 - (197 - n) * 0.1 for n in grid] * 2,
        "block_tokens": [[197] * (layer + 1) + [n] * (11 - layer) if layer < 11 else [197] * 12
                         for layer in (3, 11) for n in grid],
    }, schema_overrides={"layer": pl.Int64})
    meta = SimpleNamespace(estimator="tome", model=DEFAULT_MODEL, data="/datasets/imagenet/val", num_images=50000,
                           dtype="bfloat16", layers=None, layer=3)
    run = SimpleNamespace(frame=frame, meta=meta)
    text = _render(summary_table(run))
    assert "\u2026" not in text and all(len(line) <= 80 for line in text.splitlines()), text
    for row in frame.filter(pl.col("tokens").is_in([197, 1])).iter_rows(named=True):
        assert f"{row['accuracy']:.2f}" in text and f"{row['top5']:.2f}" in text
    assert block_tokens_text([197, 197, 197, 197, 141, 141]) == "197\u00d74 141\u00d72"
    assert block_tokens_text([65, 59, 53]) == "65 59 53"
    assert "197\u00d74 1\u00d78" in text and "197\u00d712" in text
    assert sum(1 for line in text.splitlines() if line.strip()[:2] in ("3 ", "11")) == 24


@pytest.mark.parametrize("estimator, layers, expected", [
    ("pomt", [0, 1, 2, 3], "8 grid points \u00d7 4 layers: decoded in 0.5 s, evaluated in 2.0 s (1000 image"),
    ("random", None, "8 grid points: decoded in 0.5 s, evaluated in 2.0 s (250 image"),
])
def test_the_accuracy_line_counts_every_layer_in_the_passes(estimator, layers, expected, monkeypatch, capsys):
    # 62.5 images at 8 grid points and 4 POMT layers in 2 s: 1000 passes/s, not 250.
    from pomt_cli.cli import estimate_accuracy

    monkeypatch.setattr(estimate_accuracy, "summary_table", lambda run: "")
    meta = SimpleNamespace(estimator=estimator, layers=layers, grid=list(range(65, 1, -8)), num_images=125,
                           num_classes=10, skipped=[], duplicates=[])
    run = SimpleNamespace(meta=meta, decode_s=0.5, evaluate_s=2.0, local_images=62.5)
    estimate_accuracy.render(SimpleNamespace(run=run, world_size=2, profile="a.parquet", plot="a.png"))
    text = " ".join(capsys.readouterr().out.split()).split(" accuracy profile:")[0]
    assert text == f"125 images of 10 classes, {expected} passes/s per process)".replace(": decoded",
                                                                                         " in 2 processes: decoded")


@pytest.mark.parametrize("args", [
    ["profile", "--output-dir", "runs/a\nb"],
    ["estimate-accuracy", "--data", "digits", "--output-dir", "runs\tx"],
    ["compute-r", "--output-dir", "runs/a\nb"],
    ["bench", "--output-dir", "a\rb"],
    ["demo", "--output-dir", "runs/demo\n"],
    ["export", "--output", "m\n.onnx"],
])
def test_an_output_path_with_a_control_character_is_refused_in_one_line(args, tmp_path, monkeypatch, capsys):
    # Every file written is named on one line: a newline in the folder's name would break it.
    monkeypatch.chdir(tmp_path)
    code, _, err = run_in_process(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "holds a control character (a newline, a tab...): give a name without one" in err
    assert list(tmp_path.iterdir()) == []


# What timm 1.0.3 and 1.0.9 do when they are imported (timm/models/hrnet.py).
OLD_TIMM_IMPORT = """
import sys, torch
if sys.argv[1] == "cli":
    import pomt_cli.cli
@torch.jit.interface
class ModuleInterface(torch.nn.Module):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        pass
"""


def test_the_command_line_hides_the_warning_that_older_timm_causes_at_import(tmp_path):
    # With an older timm, torch's FutureWarning about torch.jit.interface came before every
    # command's output, and an error was no longer one line on standard error.
    script = tmp_path / "old_timm_import.py"  # torch.jit reads the class's source from a file
    script.write_text(OLD_TIMM_IMPORT)

    def stderr(mode: str) -> str:
        done = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONWARNINGS": ""})
        assert done.returncode == 0, done.stderr
        return done.stderr

    # Whether this torch deprecates torch.jit.interface is read from its own source (2.14.1
    # does; 2.1.2, 2.5.1 and 2.7.1 do not), so a torch that warns and a run that did not see
    # it cannot pass as a skip.
    import torch.jit._script as script_module

    if "`torch.jit.interface` is deprecated" not in inspect.getsource(script_module):
        pytest.skip("this torch does not deprecate torch.jit.interface")
    assert "torch.jit.interface" in stderr("plain")
    assert stderr("cli") == ""
