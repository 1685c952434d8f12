"""The environment around the commands: terminals that cannot print Unicode, output whose reader
goes away, paths and working directories, thread settings.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pomt_cli
from pomt_cli.console import ERRORS, encodable, plain_console

#: This copy of the package, for subprocesses that run in another folder.
SOURCE = str(Path(pomt_cli.__file__).resolve().parents[1])


def run_env(*args: str, cwd: Path | None = None, stdout=subprocess.PIPE, **env: str) -> subprocess.CompletedProcess:
    """``python -m pomt_cli ARGS`` with ``env`` added to this environment (text mode, no exception)."""
    return subprocess.run([sys.executable, "-m", "pomt_cli", *args], cwd=cwd, stdout=stdout, stderr=subprocess.PIPE,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SOURCE, **env}, timeout=600,
                          encoding="utf-8", errors="strict")


def test_a_stream_writes_readable_ascii_for_what_its_encoding_lacks():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii", errors=ERRORS)
    stream.write("\u00b11.0% 17\u219213 \u03b1=0.5 donn\u00e9es\n")
    stream.flush()
    assert raw.getvalue() == b"+/-1.0% 17->13 alpha=0.5 donn\\xe9es\n"
    # latin-1 has the plus-minus sign and the e acute: only the arrow is replaced.
    assert encodable("\u00b11% 17\u219213 donn\u00e9es", "latin-1") == "\u00b11% 17->13 donn\u00e9es"
    assert encodable("\u00b11% \u219213", "utf-8") == "\u00b11% \u219213"


def test_a_table_keeps_its_columns_on_an_ascii_console():
    from rich.table import Table

    console = plain_console()
    console.file = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors=ERRORS)
    table = Table("step", "change")
    table.add_row("17 \u2192 13", "\u221212.0%")
    table.add_row("13 \u2192 9", "\u22123.5%")
    with console.capture() as capture:
        console.print(table)
    lines = capture.get().splitlines()
    assert "17 -> 13" in capture.get() and "-12.0%" in capture.get()
    # Substituted before rich measured: every line of the table is as wide as its border.
    assert len({len(line) for line in lines}) == 1, lines


def test_every_command_finishes_on_an_ascii_terminal(profiles, tmp_path):
    lat, acc = profiles
    out_dir = tmp_path / "out"
    done = run_env("compute-r", "--latency", str(lat), "--accuracy", str(acc), "--output-dir", str(out_dir),
                   PYTHONIOENCODING="ascii")
    assert done.returncode == 0, done.stderr
    assert "(alpha=0.5)" in done.stdout and done.stdout.isascii() and "Traceback" not in done.stderr
    assert sorted(p.suffix for p in out_dir.iterdir()) == [".json", ".png"]
    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert table and len({len(line) for line in table}) == 1, table
    # An error naming a path the terminal cannot print: one line, exit 2, the path escaped.
    done = run_env("compute-r", "--latency", str(tmp_path / "donn\u00e9es.parquet"), "--accuracy", str(acc),
                   PYTHONIOENCODING="ascii")
    assert done.returncode == 2
    assert done.stderr.startswith("error: profile ") and "donn\\xe9es.parquet does not exist" in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_a_reader_that_closes_early_gets_no_traceback():
    read, write = os.pipe()
    os.close(read)
    try:
        for args in ([], ["--help"], ["clocks", "--help"]):
            done = run_env(*args, stdout=write)
            assert done.returncode == 1 and done.stderr == "", (args, done.stderr)
    finally:
        os.close(write)


def test_a_quoted_tilde_is_the_home_folder_not_a_folder_named_tilde(profiles, tmp_path):
    lat, acc = profiles
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    (home / "in").mkdir(parents=True)
    cwd.mkdir()
    lat.rename(home / "in" / lat.name)
    done = run_env("compute-r", "--latency", f"~/in/{lat.name}", "--accuracy", str(acc), "--output-dir", "~/runs",
                   cwd=cwd, HOME=str(home))
    assert done.returncode == 0, done.stderr
    assert sorted(p.suffix for p in (home / "runs").iterdir()) == [".json", ".png"]
    assert list(cwd.iterdir()) == []
    assert f"report: {home / 'runs'}" in done.stdout


def test_a_preset_path_with_a_tilde_is_found(monkeypatch, tmp_path):
    from pomt_cli.cli.options import preset_path

    monkeypatch.setenv("HOME", str(tmp_path))
    assert preset_path("~/board.toml") == str(tmp_path / "board.toml")
    assert preset_path("orin") == "orin" and preset_path(None) is None


def test_cuda_hidden_by_an_empty_cuda_visible_devices_is_said():
    done = run_env("profile", "--device", "nvidia", "--model", "digits-vit", "--batch-size", "1", "--tokens", "65:5:30",
                   "--budget", "0.01", "--passes", "1", CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 2
    assert "CUDA is not available here" in done.stderr
    assert "CUDA_VISIBLE_DEVICES='' hides every GPU: unset it to use them" in done.stderr
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr


def test_a_resume_under_another_omp_num_threads_is_refused(tmp_path):
    args = ("profile", "--device", "cpu", "--model", "digits-vit", "--batch-size", "1", "--tokens", "65:5:30",
            "--budget", "0.01", "--passes", "1", "--no-lock-clocks", "--output-dir", str(tmp_path))
    first = run_env(*args, OMP_NUM_THREADS="2")
    assert first.returncode == 0, first.stderr
    (profile,) = tmp_path.glob("*.parquet")
    again = run_env(*args, "--resume", str(profile), OMP_NUM_THREADS="1")
    assert again.returncode == 2
    assert "num_threads 2, but this run has 1" in again.stderr and "OMP_NUM_THREADS" in again.stderr
    assert len(again.stderr.splitlines()) == 1
