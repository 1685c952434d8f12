"""Ctrl-C and SIGTERM in bench and demo, and pomt demo's --output-dir: one line, clocks restored, no stale files."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import FakeTools, preset_file, run_in_process, sigint_default

OLD_SUMMARY = "# pomt demo: digits-vit\n\nRun earlier, on files the next demo replaces.\n"


def _started(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1]


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_sigterm_while_bench_measures_is_one_line_restores_the_clocks_and_writes_nothing(tmp_path):
    tools = FakeTools(tmp_path)
    preset = preset_file(tmp_path, "nvidia")
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "pomt_cli", "bench", "--device", str(preset), "--torch-device", "cpu", "--model",
           "digits-vit", "--data", "digits", "-r", "8", "--layer", "1", "--budget", "1", "--rounds", "3",
           "--threads", "1", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, env=tools.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)
    _started(proc, lambda: any("lock-gpu-clocks" in c for c in tools.calls()))
    time.sleep(1.5)  # inside the timing: 3 settings x 3 rounds x 1 s
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated" and "Traceback" not in err, err
    calls = tools.calls()
    assert "nvidia-smi -i 0 --lock-gpu-clocks=1980,1980" in calls
    assert calls[-2:] == ["nvidia-smi -i 0 --reset-gpu-clocks", "nvidia-smi -i 0 --reset-memory-clocks"]
    assert not any((tools.state / "clocks").glob("*/state.json"))
    assert _files(out) == []


def test_ctrl_c_in_the_demo_profile_says_how_to_go_on_and_leaves_no_stale_summary(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "summary.md").write_text(OLD_SUMMARY)
    cmd = [sys.executable, "-m", "pomt_cli", "demo", "--device", "cpu", "--budget", "0.05", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)
    parquet = out / "latency_digits-vit_cpu_bs1-32_float32_pomt-layers0-1-2-3.parquet"
    _started(proc, parquet.exists)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert lines[-1] == "aborted" and "Traceback" not in err, err
    # demo has no --resume: the line says what a rerun does and how to continue the profile alone.
    assert "pomt demo starts over when run again" in err and f"add --resume {parquet} to the pomt profile" in err
    assert "continue with --resume" not in err
    # The earlier demo's page described files this run replaced: it is gone; no temporary file is left.
    assert _files(out) == [parquet.name]


def test_demo_refuses_a_folder_whose_summary_no_demo_wrote(tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "summary.md").write_text("# My notes\n")
    (out / "data.csv").write_text("a,b\n")
    code, stdout, err = run_in_process(["demo", "--device", "cpu", "--output-dir", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"error: --output-dir {out} holds a summary.md that pomt demo did not write: give an empty or new " \
           "folder, or move that file" in " ".join(err.split())
    assert (out / "summary.md").read_text() == "# My notes\n" and _files(out) == ["data.csv", "summary.md"]
    assert "pomt profile" not in stdout


def test_demo_refuses_a_file_as_its_folder(tmp_path, capsys):
    path = tmp_path / "afile"
    path.write_text("x")
    code, _, err = run_in_process(["demo", "--device", "cpu", "--output-dir", str(path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--output-dir {path}: {path} is a file, not a folder: give a folder path" in " ".join(err.split())
    assert path.read_text() == "x"
