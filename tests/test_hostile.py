"""Hostile input and faults: one line on stderr, exit code 2, and a result's files land whole or not at all.

Faults are injected without root: names over 255 bytes, an OSError(ENOSPC) or a polars
error raised from the writers, rich markup and emoji codes in every kind of user text,
damaged files, a second process holding a preset's clock lock or a result's names.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import polars as pl
import pytest
import torch
from conftest import FakeTools, preset_file, run_in_process, tiny_vit

from pomt_cli.devices.clocks import ClockController, clock_lock
from pomt_cli.devices.presets import load_preset
from pomt_cli.errors import PomtError
from pomt_cli.formats.outputs import OutputSet, _slug, file_mode, write_set
from pomt_cli.formats.report import read_report

LONG = "x" * 300
MARKUP = "a[/]b[bold]c:100:d"


def one_line_error(code: int, err: str, *parts: str, after_progress: bool = False) -> None:
    assert code == 2, err
    if after_progress:  # progress bars may come first; the error is the last line
        err = err.strip().splitlines()[-1]
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, err


# 1. User text is printed as written: no markup, no emoji codes.


def test_markup_in_the_output_folder_is_printed_as_written(tmp_path, profiles, capsys):
    lat, acc = profiles
    out = tmp_path / MARKUP
    code, stdout, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc),
                                        "--output-dir", str(out)], capsys)
    assert code == 0, err
    assert MARKUP in stdout and sorted(p.suffix for p in out.iterdir()) == [".json", ".png"]


def test_a_long_output_path_prints_whole_on_one_line_at_80_columns(tmp_path, profiles, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    lat, acc = profiles
    out = tmp_path / ("a-folder-name-long-enough-to-pass-eighty-columns-on-its-own-" * 2)
    code, stdout, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc),
                                        "--output-dir", str(out)], capsys)
    assert code == 0, err
    report = next(out.glob("*.json"))
    assert f"report: {report}" in stdout.splitlines(), stdout


@pytest.mark.parametrize("args, shown", [
    (["profile", "--model", "digits-vit", "--device", "cpu", "--tokens", "250:100:4"], "'250:100:4'"),
    (["compute-r", "--latency", MARKUP + ".parquet", "--accuracy", "x.parquet"], MARKUP + ".parquet"),
    (["estimate-accuracy", "--model", "digits-vit", "--data", "/nowhere/" + MARKUP], MARKUP),
    (["profile", "--model", "digits-vit", "--device", MARKUP + ".toml"], MARKUP + ".toml"),
])
def test_markup_and_emoji_codes_in_errors_are_printed_as_written(tmp_path, capsys, args, shown):
    code, _, err = run_in_process([*args, "--output-dir", str(tmp_path / "out")], capsys)
    one_line_error(code, err, shown)
    assert not (tmp_path / "out").exists()


def markup_preset(tmp_path: Path, status: list[str], read: list[str] | None = None) -> Path:
    read_section = f"[[clocks.read]]\nargv = {json.dumps(read)}\npattern = '(?P<v>.*)'\n" if read else ""
    path = tmp_path / "weird.toml"
    path.write_text(
        f"display_name = {json.dumps(MARKUP)}\ntorch_device = 'cpu'\ndescription = '[/] :100:'\n"
        f"[clocks]\nneeds_root = false\nlock = [['true']]\nrestore = [['true']]\nstatus = [{json.dumps(status)}]\n"
        + read_section
    )
    return path


def test_markup_in_preset_names_and_tool_output_is_printed_as_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POMT_STATE_DIR", str(tmp_path / "state"))
    preset = markup_preset(tmp_path, ["echo", "[/] :100: [bold]"])
    code, out, err = run_in_process(["clocks", "status", "--device", str(preset)], capsys)
    assert code == 0, err
    assert f"{MARKUP} (weird): [/] :100:" in out and "[/] :100: [bold]" in out and "$ echo '[/] :100: [bold]'" in out
    code, out, err = run_in_process(["clocks", "lock", "--dry-run", "--device", str(preset)], capsys)
    assert code == 0 and MARKUP in out, err


def test_markup_in_a_clock_tool_error_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POMT_STATE_DIR", str(tmp_path / "state"))
    preset = markup_preset(tmp_path, ["true"], read=["sh", "-c", "echo '[/] :100:' >&2; exit 3"])
    code, _, err = run_in_process(["clocks", "lock", "--device", str(preset)], capsys)
    one_line_error(code, err, "[/] :100:", "exit 3")


# 2. OSError a user can cause: one line naming the path and the cause, nothing created.


@pytest.mark.parametrize("where", ["output-dir", "latency", "data", "checkpoint", "device", "r-from", "resume"])
def test_a_name_too_long_is_one_line(tmp_path, profiles, capsys, where):
    lat, acc = profiles
    long = str(tmp_path / LONG / "f.x")
    out = tmp_path / "out"
    args = {
        "output-dir": ["compute-r", "--latency", str(lat), "--accuracy", str(acc), "--output-dir", long],
        "latency": ["compute-r", "--latency", long, "--accuracy", str(acc), "--output-dir", str(out)],
        "data": ["estimate-accuracy", "--model", "digits-vit", "--data", long, "--output-dir", str(out)],
        "checkpoint": ["profile", "--model", "digits-vit", "--device", "cpu", "--checkpoint", long,
                       "--output-dir", str(out)],
        "device": ["profile", "--model", "digits-vit", "--device", long + ".toml", "--output-dir", str(out)],
        "r-from": ["bench", "--model", "digits-vit", "--r-from", long, "--output-dir", str(out)],
        "resume": ["profile", "--model", "digits-vit", "--device", "cpu", "--resume", long, "--output-dir", str(out)],
    }[where]
    code, _, err = run_in_process(args, capsys)
    one_line_error(code, err, LONG, "File name too long")
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_a_full_disk_leaves_no_file_and_the_earlier_ones_as_they_were(tmp_path, profiles, capsys, monkeypatch):
    lat, acc = profiles
    out = tmp_path / "out"
    code, _, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc),
                                   "--output-dir", str(out)], capsys)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".png"]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("pomt_cli.pipelines.choice.plot_selection", full)  # the second file of the set
    code, _, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc), "--alpha", "0.9",
                                   "--output-dir", str(out)], capsys)
    one_line_error(code, err, "No space left on device", str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporaries, no lock, old pair intact
    fresh = tmp_path / "new" / "deeper"
    code, _, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc),
                                   "--output-dir", str(fresh)], capsys)
    one_line_error(code, err, "No space left on device")
    assert not (tmp_path / "new").exists()


def test_a_polars_write_error_leaves_neither_file_of_an_accuracy_profile(tmp_path, capsys, monkeypatch):
    def broken(self, *args, **kwargs):
        raise pl.exceptions.ComputeError("Invalid thrift: end of file")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", broken)
    out = tmp_path / "out"
    code, _, err = run_in_process(["estimate-accuracy", "--model", "digits-vit", "--data", "digits", "--limit", "20",
                                   "--tokens", "65:33:32", "--output-dir", str(out)], capsys)
    one_line_error(code, err, "Invalid thrift", "cannot write", after_progress=True)
    assert not out.exists()


# 3. Output sets: together or not at all; the umask; one writer per set of names.


def test_an_output_set_lands_whole_or_not_at_all(tmp_path, monkeypatch):
    folder = tmp_path / "runs"
    paths = write_set(folder, "r", {"a": lambda p: p.write_text("1"), "b": lambda p: p.write_text("2")})
    assert {k: p.read_text() for k, p in paths.items()} == {"a": "1", "b": "2"}
    assert sorted(p.name for p in folder.iterdir()) == ["r.a", "r.b"]
    real_replace = os.replace
    calls = []

    def second_rename_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2 and str(dst).endswith("r.b"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(PomtError, match="cannot write .*r.b"):
        write_set(folder, "r", {"a": lambda p: p.write_text("new"), "b": lambda p: p.write_text("new")})
    assert sorted(p.name for p in folder.iterdir()) == ["r.a", "r.b"]
    assert (folder / "r.a").read_text() == "1" and (folder / "r.b").read_text() == "2"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert file_mode() == mode
        paths = write_set(tmp_path, "r", {"a": lambda p: p.write_text("1")})
    finally:
        os.umask(old)
    assert paths["a"].stat().st_mode & 0o777 == mode


def test_a_second_writer_of_the_same_names_is_refused(tmp_path, profiles, capsys):
    lat, acc = profiles
    out = tmp_path / "out"
    stem = "compute_r_vit-tiny-patch16-224_orin_bs1-4_float16"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pomt_cli.formats.outputs import OutputSet\n"
         f"with OutputSet({str(out)!r}, {stem!r}, ('json', 'png')):\n print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        code, _, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc),
                                       "--output-dir", str(out)], capsys)
        one_line_error(code, err, f"another pomt run (pid {holder.pid}) is writing", stem)
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc),
                                   "--output-dir", str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.json", f"{stem}.png"]  # the lock file went too


def test_output_sets_in_one_process_exclude_each_other_and_clean_up(tmp_path):
    with OutputSet(tmp_path / "a" / "b", "s", ("x",)) as files:
        with pytest.raises(PomtError, match="another pomt run"):
            OutputSet(tmp_path / "a" / "b", "s", ("x",)).__enter__()
        files.write("x", lambda p: p.write_text("1"))
    assert not (tmp_path / "a").exists()  # not committed: the folders it made are gone


# 4. Strict reading: column types, metadata types, finite values in range.


def damage(path: Path, **columns) -> Path:
    frame = pl.read_parquet(path).with_columns(**columns)
    # pomt's own key only: a copied ARROW:schema would still say the old column types, and
    # polars before 2 then cannot read the file at all (rather than read the wrong type).
    meta = {key: value for key, value in pl.read_parquet_metadata(path).items() if key == "pomt"}
    frame.write_parquet(path, metadata=meta)
    return path


@pytest.mark.parametrize("which, columns, message", [
    ("lat", {"tokens": pl.col("tokens").cast(pl.String)}, "column tokens has type String"),
    ("lat", {"latency_ms": pl.col("latency_ms").cast(pl.String)}, "column latency_ms has type String"),
    ("acc", {"accuracy": pl.col("accuracy").cast(pl.String)}, "column accuracy has type String"),
    ("lat", {"latency_ms": pl.lit(float("inf"))}, "column latency_ms is inf, not a finite number"),
    ("lat", {"latency_ms": -pl.col("latency_ms")}, "column latency_ms is -4.0, not positive"),
    ("lat", {"latency_ms": pl.lit(float("nan"))}, "column latency_ms is nan"),
    ("acc", {"accuracy": pl.lit(float("inf"))}, "column accuracy is inf"),
    ("acc", {"top5": pl.col("top5") + 50}, "outside 0..100"),
    ("lat", {"status": pl.lit("fine")}, "column status is 'fine'"),
])
def test_damaged_columns_are_one_line_naming_file_and_field(tmp_path, profiles, capsys, which, columns, message):
    lat, acc = profiles
    damaged = damage(lat if which == "lat" else acc, **columns)
    out = tmp_path / "out"
    code, _, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc),
                                   "--output-dir", str(out)], capsys)
    one_line_error(code, err, str(damaged), message)
    assert not out.exists()


def test_a_profile_whose_data_is_damaged_but_footer_readable_is_named_as_damaged(tmp_path, profiles, capsys):
    # Bytes of the first column chunk overwritten (a disk fault, a copy cut short and patched):
    # the footer still says "latency profile", the data cannot be decoded. The message said
    # "is a latency profile (...), not a profile" before.
    lat, acc = profiles
    data = bytearray(lat.read_bytes())
    data[4:200] = bytes(196)
    lat.write_bytes(bytes(data))
    out = tmp_path / "out"
    code, _, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc),
                                   "--output-dir", str(out)], capsys)
    one_line_error(code, err, str(lat), "is a latency profile", "its data cannot be read", "write it again")
    assert "not a profile" not in err and not out.exists()


@pytest.mark.parametrize("which, field, value", [
    ("lat", "num_tokens", "many"), ("lat", "batch_sizes", "x"), ("acc", "num_images", [1]), ("lat", "clocks", 3),
])
def test_metadata_of_the_wrong_type_is_one_line(tmp_path, profiles, capsys, which, field, value):
    lat, acc = profiles
    path = lat if which == "lat" else acc
    meta = json.loads(pl.read_parquet_metadata(path)["pomt"])
    meta[field] = value
    pl.read_parquet(path).write_parquet(path, metadata={"pomt": json.dumps(meta)})
    code, _, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc),
                                   "--output-dir", str(tmp_path / "out")], capsys)
    one_line_error(code, err, str(path), f"field {field}")


def test_a_damaged_resume_file_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["profile", "--model", "digits-vit", "--device", "cpu", "--tokens", "65:60:5", "--budget", "0.05",
            "--min-samples", "3", "--warmup", "1", "--passes", "1", "--remeasure", "0", "--no-lock-clocks"]
    code, _, err = run_in_process([*args, "--output-dir", str(tmp_path / "first")], capsys)
    assert code == 0, err
    parquet = next((tmp_path / "first").glob("*.parquet"))
    damage(parquet, p90_ms=pl.lit(-1.0))
    code, _, err = run_in_process([*args, "--resume", str(parquet), "--output-dir", str(out)], capsys)
    one_line_error(code, err, "column p90_ms is -1.0, not positive")
    assert not out.exists()


def test_a_report_with_infinite_values_is_damaged(tmp_path, profiles, capsys):
    lat, acc = profiles
    code, _, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc),
                                   "--output-dir", str(tmp_path)], capsys)
    report = next(tmp_path.glob("*.json"))
    data = json.loads(report.read_text())
    data["choices"][0]["latency_ms"] = float("inf")
    report.write_text(json.dumps(data))
    with pytest.raises(PomtError, match=r"damaged \(choices.0.latency_ms"):
        read_report(report)
    data["choices"][0]["latency_ms"], data["choices"][0]["accuracy"] = 1.0, 140.0
    report.write_text(json.dumps(data))
    code, _, err = run_in_process(["bench", "--model", "vit_tiny_patch16_224", "--r-from", str(report),
                                   "--output-dir", str(tmp_path / "out")], capsys)
    one_line_error(code, err, str(report), "choices.0.accuracy")


# 5. Saved clock state of the wrong shape.


@pytest.mark.parametrize("text, field", [("[1, 2]", "the file"), ('{"values": "x"}', "preset"),
                                         ('{"preset": "cpu", "locked_at": "t", "values": {"a": [1]}}', "values.a"),
                                         ("{not json", "the file")])
@pytest.mark.parametrize("command", ["status", "restore", "profile"])
def test_saved_clock_state_of_the_wrong_shape_is_one_line(tmp_path, capsys, monkeypatch, text, field, command):
    tools = FakeTools(tmp_path)
    for key, value in tools.env().items():
        monkeypatch.setenv(key, value)
    preset = preset_file(tmp_path, "nvidia")
    state = ClockController(load_preset(preset), "cpu").state_file
    state.parent.mkdir(parents=True)
    state.write_text(text)
    args = {"status": ["clocks", "status", "--device", str(preset)],
            "restore": ["clocks", "restore", "--device", str(preset)],
            "profile": ["profile", "--model", "digits-vit", "--device", str(preset), "--torch-device", "cpu",
                        "--tokens", "65:60:5", "--output-dir", str(tmp_path / "out")]}[command]
    code, _, err = run_in_process(args, capsys)
    one_line_error(code, err, str(state), field)
    assert state.read_text() == text and not (tmp_path / "out").exists()
    assert not any("lock" in c or "reset" in c for c in tools.calls())


# 6. Two runs on one preset: the second is refused; the first's clocks are not touched.


def test_a_second_process_on_a_locked_preset_is_refused(tmp_path, monkeypatch):
    tools = FakeTools(tmp_path)
    preset = preset_file(tmp_path, "nvidia")
    monkeypatch.setenv("POMT_STATE_DIR", str(tools.state))
    ctl = ClockController(load_preset(preset), "cpu")
    with clock_lock(ctl):  # held by this process, as a measuring run holds it
        runs = [
            ["profile", "--model", "digits-vit", "--device", str(preset), "--torch-device", "cpu",
             "--tokens", "65:60:5", "--output-dir", str(tmp_path / "out")],
            ["clocks", "restore", "--device", str(preset)],
            ["clocks", "lock", "--device", str(preset)],
        ]
        for args in runs:
            done = subprocess.run([sys.executable, "-m", "pomt_cli", *args], env=tools.env(),
                                  capture_output=True, text=True, timeout=300)
            one_line_error(done.returncode, done.stderr, "another pomt process is using the clocks")
    assert not any("lock-gpu" in c or "reset" in c for c in tools.calls()), tools.calls()
    assert not (tmp_path / "out").exists() and not ctl.state_file.exists()


# 7. SIGTERM without clock locking: the partial profile is saved, a resume line, exit 143.


def test_sigterm_without_clock_locking_saves_the_profile_for_resume(tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "pomt_cli", "profile", "--device", "cpu", "--model", "digits-vit",
           "--threads", "1", "--no-lock-clocks", "--budget", "0.2", "--min-samples", "3", "--warmup", "1",
           "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parquet = out / "latency_digits-vit_cpu_bs1_float32.parquet"
    deadline = time.monotonic() + 120
    while not parquet.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted" in err and f"--resume {parquet}" in err and "Traceback" not in err
    meta = json.loads(pl.read_parquet_metadata(parquet)["pomt"])
    assert meta["complete"] is False and meta["clocks"]["mode"] == "unlocked"
    assert sorted(p.name for p in out.iterdir()) == [parquet.name]


# 8. The smaller items.


def test_a_huge_seed_is_a_usage_error(tmp_path, capsys):
    code, _, err = run_in_process(["profile", "--model", "digits-vit", "--device", "cpu",
                                   "--seed", "99999999999999999999", "--output-dir", str(tmp_path / "o")], capsys)
    one_line_error(code, err, "--seed")


def test_checkpoints_and_presets_that_are_folders_or_do_not_fit(tmp_path, capsys):
    out = str(tmp_path / "out")
    code, _, err = run_in_process(["profile", "--model", "digits-vit", "--device", "cpu", "--checkpoint",
                                   str(tmp_path), "--output-dir", out], capsys)
    one_line_error(code, err, "is a folder")
    folder_toml = tmp_path / "p.toml"
    folder_toml.mkdir()
    code, _, err = run_in_process(["profile", "--model", "digits-vit", "--device", str(folder_toml),
                                   "--output-dir", out], capsys)
    one_line_error(code, err, "is a folder")
    wrong = tmp_path / "wrong.pth"
    torch.save(tiny_vit().state_dict(), wrong)
    code, _, err = run_in_process(["profile", "--model", "digits-vit", "--device", "cpu", "--checkpoint",
                                   str(wrong), "--output-dir", out], capsys)
    one_line_error(code, err, "does not fit digits-vit", "size mismatch for")


def test_the_root_hint_of_a_preset_file_names_its_path(tmp_path, monkeypatch):
    preset = preset_file(tmp_path, "nvidia", needs_root=True)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr("shutil.which", lambda name: "/bin/true")
    with pytest.raises(PomtError, match=f"--device {preset}"):
        ClockController(load_preset(preset), "cpu")._check_can_lock()


def test_warnings_stay_out_of_the_error_line_and_are_one_line_after_success(tmp_path, profiles, capsys, monkeypatch):
    from pomt_cli.pipelines import choice as compute_r

    lat, acc = profiles
    real = compute_r.select_r

    def noisy(*args, **kwargs):
        warnings.warn("first line\nsecond line", UserWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(compute_r, "select_r", noisy)
    code, _, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(tmp_path / "no.parquet"),
                                   "--output-dir", str(tmp_path / "o")], capsys)
    one_line_error(code, err, "no.parquet")
    code, _, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc),
                                   "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 0 and err.strip().splitlines() == ["warning: first line second line (UserWarning)"], err


def test_non_ascii_names_stay_apart_in_file_names():
    assert _slug("données") == "données" and _slug("日本語") == "日本語"
    assert _slug("!!!") != _slug("???") and _slug("deit_small_patch16_224") == "deit-small-patch16-224"


def test_the_accuracy_summary_spreads_over_a_coarse_grid(monkeypatch):
    import pomt_cli.cli.estimate_accuracy as ea

    class Run:
        meta = None
        frame = pl.DataFrame({"layer": pl.Series([None, None, None], dtype=pl.Int64), "tokens": [65, 33, 2],
                              "accuracy": [90.0, 80.0, 10.0], "top5": [99.0, 95.0, 50.0],
                              "block_tokens": [[65], [33], [2]]})

    monkeypatch.setattr("pomt_cli.accuracy.evaluate.describe", lambda meta: "t")
    assert ea.summary_table(Run()).row_count == 3
