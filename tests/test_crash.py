"""A pomt process killed outright (SIGKILL, the OOM killer, power loss) at a chosen point.

The kills are deterministic: a forked child writes an output set and kills itself with
SIGKILL at a marker (inside a writer, between the commit's renames), then the parent
checks what the next writer of the same names finds and leaves.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import needs, run_in_process, tiny_vit
import test_refine
from test_refine import copy_report

from pomt_cli import versions
from pomt_cli.devices.clocks import ClockController, locked_clocks
from pomt_cli.devices.presets import load_preset
from pomt_cli.errors import PomtError
from pomt_cli.formats.outputs import OutputSet, write_set
from pomt_cli.formats.report import read_report
from pomt_cli.measure import runtimes
from pomt_cli.pipelines import demonstration, refinement
from pomt_cli.measure.runtimes import Runtime, RuntimeOptions, prepare

digits_report = test_refine.digits_report  # refine's fixture, for the tests of a killed refine


def killed_child(body: Callable[[], object]) -> None:
    """Run ``body`` in a forked child; assert that it died of SIGKILL."""
    pid = os.fork()
    if pid == 0:
        try:
            # The parent's OpenMP threads do not exist in a forked child: a parallel region there
            # waits for them for ever (libgomp), so the child computes on its own thread.
            torch.set_num_threads(1)
            body()
        finally:
            os._exit(0)  # body returned or raised: not the kill the test wanted
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_set_killed_between_its_renames_lands_whole_at_the_next_writer(tmp_path):
    folder = tmp_path / "runs"
    write_set(folder, "r", {"a": lambda p: p.write_text("old"), "b": lambda p: p.write_text("old")})

    def second_rename_kills():
        real_replace = os.replace

        def replace(src, dst):
            if str(dst).endswith("r.b"):
                kill_self()
            return real_replace(src, dst)

        os.replace = replace
        write_set(folder, "r", {"a": lambda p: p.write_text("new"), "b": lambda p: p.write_text("new")})

    killed_child(second_rename_kills)
    assert (folder / "r.a").read_text() == "new" and (folder / "r.b").read_text() == "old"  # half a set
    with OutputSet(folder, "r", ("a", "b")):  # the next writer of the names, even one that writes nothing
        pass
    assert {n: (folder / n).read_text() for n in ("r.a", "r.b")} == {"r.a": "new", "r.b": "new"}
    assert listing(folder) == ["r.a", "r.b"]


def test_a_set_killed_before_its_commit_keeps_the_old_files_and_its_temporaries_are_removed(tmp_path):
    folder = tmp_path / "runs"
    write_set(folder, "r", {"a": lambda p: p.write_text("old"), "b": lambda p: p.write_text("old")})

    def writer_kills(path: Path) -> None:
        path.write_text("half")
        kill_self()

    killed_child(lambda: write_set(folder, "r", {"a": lambda p: p.write_text("new"), "b": writer_kills}))
    hidden = [n for n in listing(folder) if n.startswith(".")]
    assert len([n for n in hidden if n.endswith(".tmp")]) == 2, hidden  # what the kill leaves, pomt ignores
    assert (folder / "r.a").read_text() == "old" and (folder / "r.b").read_text() == "old"
    write_set(folder, "r", {"a": lambda p: p.write_text("3"), "b": lambda p: p.write_text("3")})
    assert listing(folder) == ["r.a", "r.b"]
    assert (folder / "r.a").read_text() == "3"


def test_the_cleanup_leaves_the_temporaries_of_other_names_alone(tmp_path):
    # Another result's temporaries in the same folder are not this set's to remove.
    folder = tmp_path / "runs"
    folder.mkdir()
    other = folder / ".s.a.abcd1234.tmp"
    other.write_text("another run's")
    write_set(folder, "r", {"a": lambda p: p.write_text("1")})
    assert listing(folder) == [".s.a.abcd1234.tmp", "r.a"]


@needs(versions.ONNX_EXPORT)
def test_a_full_disk_in_onnx_export_is_named_as_the_write_that_failed(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch.onnx, "export", full)
    out = tmp_path / "m.onnx"
    code, _, err = run_in_process(["export", "--model", "digits-vit", "--output", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"cannot write {out} (No space left on device)" in " ".join(err.split())
    assert listing(tmp_path) == []


def test_clocks_left_locked_by_a_killed_measurement_are_taken_over_and_restored(fake_tools):
    tools = fake_tools
    nvidia = load_preset("nvidia")
    ctl = ClockController(nvidia, "cpu")

    def killed_while_measuring():
        with locked_clocks(nvidia, torch_device="cpu"):
            kill_self()

    killed_child(killed_while_measuring)
    assert ctl.saved_state() is not None and ctl.saved_state().pid not in (None, os.getpid())
    with locked_clocks(nvidia, torch_device="cpu") as state:
        assert state.mode == "locked" and "killed before it restored them" in state.detail, state
        assert state.values == {"max_graphics": "1980", "max_memory": "2619"}  # read before the first lock
        assert ctl.saved_state().pid == os.getpid()
    assert tools.calls()[-2:] == ["nvidia-smi -i 0 --reset-gpu-clocks", "nvidia-smi -i 0 --reset-memory-clocks"]
    assert ctl.saved_state() is None


def test_clocks_locked_with_pomt_clocks_lock_stay_locked_for_a_measurement(fake_tools):
    tools = fake_tools
    nvidia = load_preset("nvidia")
    ClockController(nvidia, "cpu", measuring=False).lock()
    with locked_clocks(nvidia, torch_device="cpu") as state:
        assert state.mode == "already_locked"
    assert not any("reset" in call for call in tools.calls())
    assert ClockController(nvidia, "cpu").saved_state() is not None


@needs(versions.ONNX_EXPORT)
def test_an_onnx_cache_export_killed_outright_leaves_no_temporary_after_the_next(tmp_path):
    options = RuntimeOptions(cache_dir=tmp_path / "onnx")
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def export_kills():
        real_export = runtimes.export_graph

        def export_graph(*args, **kwargs):
            real_export(*args, **kwargs)
            kill_self()

        runtimes.export_graph = export_graph
        prepare(model, images, Runtime.onnxruntime, label="none", options=options)

    killed_child(export_kills)
    assert any(n.endswith(".tmp") for n in listing(tmp_path / "onnx"))  # what the kill left
    prepared = prepare(model, images, Runtime.onnxruntime, label="none", options=options)
    assert not prepared.cached and listing(tmp_path / "onnx") == [prepared.path.name]


def test_refine_of_a_report_without_its_plot_killed_while_writing_leaves_nothing_after_the_rerun(
        tmp_path, digits_report, capsys):
    report = copy_report(digits_report, tmp_path / "r")
    report.with_suffix(".png").unlink()
    args = ["refine", str(report), "--budget", "0.01", "--rounds", "1", "--candidates", "1", "--no-lock-clocks"]

    # A fresh interpreter: a fork of this one (polars' and torch's threads started) could deadlock.
    script = ("import os, signal, sys\n"  # killed at the first rename of the report's write
              "from pomt_cli.cli import main\n"
              "os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)\n"
              "main(sys.argv[1:])\n")
    env = dict(os.environ, PYTHONPATH=str(Path(refinement.__file__).parents[2]), OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    threads = torch.get_num_threads()
    assert read_report(report).refine is None and len(listing(report.parent)) > 1  # the old report; a temporary
    code, _, err = run_in_process(args, capsys)
    torch.set_num_threads(threads)
    assert code == 0, err
    assert read_report(report).refine is not None and listing(report.parent) == [report.name]


def test_the_demo_summary_killed_while_written_leaves_nothing_at_the_next_and_a_full_disk_is_one_line(
        tmp_path, monkeypatch):
    path = tmp_path / "summary.md"

    def write_kills():
        real_write_text = Path.write_text

        def write_text(self, *args, **kwargs):
            real_write_text(self, *args, **kwargs)
            kill_self()

        Path.write_text = write_text
        demonstration.write_summary(path, "# killed\n")

    killed_child(write_kills)
    assert not path.exists() and listing(tmp_path)  # a temporary
    assert demonstration.write_summary(path, "# page\n") == path and listing(tmp_path) == ["summary.md"]

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(PomtError, match=rf"^cannot write {path} \(No space left on device\)"):
        demonstration.write_summary(path, "# new page\n")
    assert path.read_text() == "# page\n" and listing(tmp_path) == ["summary.md"]
