"""Device presets and the clock helper, run for real against fake nvidia-smi, nvpmodel,
jetson_clocks and cpupower executables put first on PATH that record their arguments.

Nothing here touches a real clock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest
import torch

from conftest import FAKE_TOOL, FakeTools, jetson_preset, preset_file, run_in_process, sigint_default
from pomt_cli.devices.clocks import ClockController, locked_clocks
from pomt_cli.devices.presets import load_preset, preset_names
from pomt_cli.devices.torch_device import resolve_torch_device, short_device_name
from pomt_cli.errors import PomtError

PRESETS = {"a100", "cpu", "h100", "nvidia", "orin", "tx2", "xavier"}

@pytest.fixture
def orin(tmp_path):
    """The bundled orin preset (root needed), on a machine that passes for a Jetson: its requires_path in tmp_path."""
    return load_preset(str(jetson_preset(tmp_path, "orin", needs_root=True)))


ORIN_LOCK = ["nvpmodel -q", "jetson_clocks --store {s}/jetson_clocks.conf", "nvpmodel -m 0", "jetson_clocks"]
ORIN_STATUS = ["nvpmodel -q", "jetson_clocks --show"]
ORIN_RESTORE = ["nvpmodel -m 2", "jetson_clocks --restore {s}/jetson_clocks.conf"]


def expand(lines: list[str], state_dir: Path) -> list[str]:
    return [line.format(s=state_dir) for line in lines]


def test_bundled_presets_load_and_validate():
    assert set(preset_names()) == PRESETS
    for name in PRESETS:
        preset = load_preset(name)
        assert preset.name == name and preset.display_name
        assert torch.device(preset.torch_device).type in ("cuda", "cpu")
        assert preset.clocks.lock and preset.clocks.restore and preset.clocks.status
    assert load_preset("orin").clocks.read[0].names == ["nvpmodel_mode"]
    assert load_preset("nvidia").clocks.read[0].names == ["max_graphics", "max_memory"]


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(PomtError, match="unknown device 'jetson-nano'.*a100, cpu, h100, nvidia, orin, tx2, xavier"):
        load_preset("jetson-nano")


@pytest.mark.parametrize(
    "text, message",
    [
        ("display_name = 'x'\ntorch_device = [", "not valid TOML"),
        ("display_name = 'x'\ntorch_device = 'cpu'\n", "invalid at clocks"),
        ("display_name = 'x'\ntorch_device = 'cpu'\ncolour = 1\n[clocks]\nlock = [['a']]\nrestore = [['b']]\n",
         "invalid at colour"),
        ("display_name = 'x'\ntorch_device = 'cpu'\n[clocks]\nlock = [['a', '{mode}']]\nrestore = [['b']]\n",
         "mode"),
        ("display_name = 'x'\ntorch_device = 'cpu'\n[clocks]\nread = [{argv = ['q'], pattern = '\\d+'}]\n"
         "lock = [['a']]\nrestore = [['b']]\n", "named group"),
    ],
)
def test_preset_files_are_validated(tmp_path, text, message):
    path = tmp_path / "custom.toml"
    path.write_text(text)
    with pytest.raises(PomtError, match=message):
        load_preset(str(path))


def test_preset_from_a_path(tmp_path):
    preset = load_preset(str(preset_file(tmp_path, "nvidia")))
    assert preset.name == "fake-nvidia" and not preset.clocks.needs_root


def test_resolve_torch_device():
    assert resolve_torch_device("cpu") == torch.device("cpu")
    with pytest.raises(PomtError, match="not a device name"):
        resolve_torch_device("gpu please")
    if not torch.cuda.is_available():
        with pytest.raises(PomtError, match="CUDA is not available"):
            resolve_torch_device("cuda")


def test_orin_lock_and_restore_run_in_order_with_the_saved_mode(orin, fake_tools):
    ctl = ClockController(orin, "cpu")
    with locked_clocks(orin, torch_device="cpu") as state:
        assert state.mode == "locked" and state.locked
        assert state.values == {"nvpmodel_mode": "2"}
        assert "Fake Orin" in state.status
        saved = json.loads(ctl.state_file.read_text())
        assert saved["values"] == {"nvpmodel_mode": "2"}
        assert fake_tools.calls() == expand(ORIN_LOCK + ORIN_STATUS, ctl.state_dir)
    assert fake_tools.calls() == expand(ORIN_LOCK + ORIN_STATUS + ORIN_RESTORE, ctl.state_dir)
    assert not ctl.state_file.exists()


def test_nvidia_locks_graphics_and_memory_at_their_maximum(fake_tools):
    with locked_clocks(load_preset("nvidia"), torch_device="cpu") as state:
        assert state.values == {"max_graphics": "1980", "max_memory": "2619"}
    calls = fake_tools.calls()
    assert calls[1:3] == ["nvidia-smi -i 0 --lock-gpu-clocks=1980,1980", "nvidia-smi -i 0 --lock-memory-clocks=2619,2619"]
    assert calls[-2:] == ["nvidia-smi -i 0 --reset-gpu-clocks", "nvidia-smi -i 0 --reset-memory-clocks"]


def test_restore_runs_after_an_exception(fake_tools):
    with pytest.raises(RuntimeError, match="measurement failed"):
        with locked_clocks(load_preset("h100"), torch_device="cpu"):
            raise RuntimeError("measurement failed")
    calls = fake_tools.calls()
    assert calls[1] == "nvidia-smi -i 0 --lock-gpu-clocks=1980,1980"
    assert calls[-1] == "nvidia-smi -i 0 --reset-gpu-clocks"


SIGNAL_SCRIPT = """
import os, signal, sys, time
from pomt_cli.devices.clocks import locked_clocks
from pomt_cli.devices.presets import load_preset
with locked_clocks(load_preset(sys.argv[1]), torch_device="cpu"):
    print("locked", flush=True)
    os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    time.sleep(30)
print("not reached")
"""


@pytest.mark.parametrize("sig, returncode", [("SIGINT", -signal.SIGINT), ("SIGTERM", 143)])
def test_restore_runs_after_a_signal(tmp_path, sig, returncode):
    tools = FakeTools(tmp_path)
    preset = jetson_preset(tmp_path, "orin")
    done = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT, str(preset), sig], env=tools.env(),
                          capture_output=True, text=True, timeout=60, preexec_fn=sigint_default)
    assert done.returncode == returncode, done.stderr
    assert "locked" in done.stdout and "not reached" not in done.stdout
    state_dir = tools.state / "clocks" / "fake-orin"
    assert tools.calls() == expand(ORIN_LOCK + ORIN_STATUS + ORIN_RESTORE, state_dir)
    assert not (state_dir / "state.json").exists()


def test_missing_tool_changes_nothing_and_names_the_commands(orin, fake_tools):
    fake_tools.remove("jetson_clocks")
    with pytest.raises(PomtError) as err:
        with locked_clocks(orin, torch_device="cpu"):
            pytest.fail("must not get here")
    message = str(err.value)
    assert "jetson_clocks, not found on PATH" in message and "\n" not in message
    assert "sudo nvpmodel -m 0 && sudo jetson_clocks" in message and "--no-lock-clocks" in message
    assert fake_tools.calls() == []


def test_missing_root_changes_nothing(fake_tools, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PomtError, match=r"needs root: run `sudo pomt clocks lock --device a100`"):
        with locked_clocks(load_preset("a100"), torch_device="cpu"):
            pytest.fail("must not get here")
    assert fake_tools.calls() == []


def test_pomt_clocks_lock_does_not_offer_an_option_it_lacks(fake_tools, tmp_path, capsys, monkeypatch):
    # --no-lock-clocks belongs to the measuring commands; `pomt clocks lock` told its users to
    # pass it when it lacked root, a tool or a state folder. A measurement still offers it.
    nvidia = str(preset_file(tmp_path, "nvidia"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("POMT_STATE_DIR", str(blocker / "state"))
    code, _, err = run_in_process(["clocks", "lock", "--device", nvidia], capsys)
    assert code == 2 and "cannot create the clock state folder" in err and "POMT_STATE_DIR" in err
    assert "--no-lock-clocks" not in err
    code, _, err = run_in_process(["profile", "--model", "digits-vit", "--device", nvidia, "--torch-device", "cpu",
                                   "--tokens", "65:60:5", "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and "cannot create the clock state folder" in err and "--no-lock-clocks" in err
    monkeypatch.setenv("POMT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, _, err = run_in_process(["clocks", "lock", "--device", "a100"], capsys)
    assert code == 2 and "needs root: run `sudo pomt clocks lock --device a100`" in err
    assert "--no-lock-clocks" not in err and "first" not in err
    fake_tools.remove("nvidia-smi")
    code, _, err = run_in_process(["clocks", "lock", "--device", "a100"], capsys)
    assert code == 2 and "nvidia-smi, not found on PATH" in err and "--no-lock-clocks" not in err
    assert fake_tools.calls() == []


def test_a_failing_lock_command_is_undone(orin, fake_tools, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "nvpmodel -m 0")
    ctl = ClockController(orin, "cpu")
    with pytest.raises(PomtError, match=r"`nvpmodel -m 0` failed \(exit 3: fake failure"):
        with locked_clocks(orin, torch_device="cpu"):
            pytest.fail("must not get here")
    assert fake_tools.calls() == expand(ORIN_LOCK[:3] + ORIN_RESTORE, ctl.state_dir)
    assert not ctl.state_file.exists()


def test_unparseable_read_changes_nothing(orin, fake_tools, tmp_path):
    (fake_tools.bin / "nvpmodel").write_text(FAKE_TOOL + "echo 'NV Power Mode: unknown'\n")
    with pytest.raises(PomtError, match="does not match"):
        with locked_clocks(orin, torch_device="cpu"):
            pytest.fail("must not get here")
    assert fake_tools.calls() == ["nvpmodel -q"]


def test_unlocked_and_already_locked_run_no_lock_commands(orin, fake_tools):
    with locked_clocks(orin, torch_device="cpu", enabled=False) as state:
        assert state.mode == "unlocked" and not state.locked
    assert fake_tools.calls() == ORIN_STATUS
    ctl = ClockController(orin, "cpu")
    ctl.lock()
    before = len(fake_tools.calls())
    with locked_clocks(orin, torch_device="cpu") as state:
        assert state.mode == "already_locked" and state.locked
    assert fake_tools.calls()[before:] == ORIN_STATUS  # neither locked again nor restored
    assert ctl.state_file.exists()
    ctl.restore()
    assert fake_tools.calls()[-2:] == expand(ORIN_RESTORE, ctl.state_dir)


@pytest.mark.skipif(Path("/etc/nv_tegra_release").exists(), reason="this machine is a Jetson")
@pytest.mark.parametrize("name", ["orin", "xavier", "tx2"])
def test_a_jetson_preset_off_a_jetson_is_unavailable_and_runs_nothing(fake_tools, name):
    with locked_clocks(load_preset(name), torch_device="cpu") as state:
        assert state.mode == "unavailable" and not state.locked
        assert state.detail.startswith("/etc/nv_tegra_release does not exist: this machine is not a Jetson")
    assert fake_tools.calls() == []


def test_cpu_without_cpufreq_is_unavailable_and_with_it_sets_the_governor(fake_tools, tmp_path):
    missing = tmp_path / "no-cpufreq" / "scaling_governor"
    with locked_clocks(load_preset(str(preset_file(tmp_path, "cpu", requires_path=str(missing))))) as state:
        assert state.mode == "unavailable" and "does not exist" in state.detail
    assert fake_tools.calls() == []
    governor = tmp_path / "scaling_governor"
    governor.write_text("powersave\n")
    text = preset_file(tmp_path, "cpu", requires_path=str(governor)).read_text()
    text = text.replace("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor", str(governor))
    path = tmp_path / "cpu-here.toml"
    path.write_text(text)
    with locked_clocks(load_preset(str(path))) as state:
        assert state.mode == "locked" and state.values == {"governor": "powersave"}
    calls = fake_tools.calls()
    assert "cpupower frequency-set --governor performance" in calls
    assert calls[-1] == "cpupower frequency-set --governor powersave"




def test_clocks_commands(fake_tools, tmp_path, capsys):
    orin = str(jetson_preset(tmp_path, "orin"))
    code, out, _ = run_in_process(["clocks", "lock", "--device", orin, "--dry-run"], capsys)
    assert code == 0
    assert "nvpmodel -m 0" in out and "jetson_clocks --store" in out and "nothing was run" in out
    assert fake_tools.calls() == []

    code, out, _ = run_in_process(["clocks", "lock", "--device", orin], capsys)
    assert code == 0 and "nvpmodel_mode=2" in out
    code, out, _ = run_in_process(["clocks", "status", "--device", orin], capsys)
    assert code == 0 and "locked by pomt" in out and "NV Power Mode: MODE_30W" in out
    code, out, _ = run_in_process(["clocks", "lock", "--device", orin], capsys)
    assert code == 2  # a second lock would overwrite the saved state
    code, out, _ = run_in_process(["clocks", "restore", "--device", orin], capsys)
    assert code == 0 and "restored" in out
    state_dir = Path(os.environ["POMT_STATE_DIR"]) / "clocks" / "fake-orin"
    assert fake_tools.calls() == expand(ORIN_LOCK, state_dir) + ORIN_STATUS + expand(ORIN_RESTORE, state_dir)

    code, _, err = run_in_process(["clocks", "restore", "--device", orin], capsys)
    assert code == 2 and "no saved clock state" in err and len(err.strip().splitlines()) == 1


def test_clocks_status_without_the_tools_is_a_one_line_error(fake_tools, tmp_path, capsys):
    fake_tools.remove("nvpmodel")
    code, _, err = run_in_process(["clocks", "status", "--device", str(jetson_preset(tmp_path, "tx2"))], capsys)
    assert code == 2
    assert err.startswith("error:") and "nvpmodel" in err and len(err.strip().splitlines()) == 1


def test_state_root_is_shared_between_processes(tmp_path):
    tools = FakeTools(tmp_path)
    preset = preset_file(tmp_path, "nvidia")
    script = textwrap.dedent("""
        import sys
        from pomt_cli.devices.clocks import ClockController
        from pomt_cli.devices.presets import load_preset
        ctl = ClockController(load_preset(sys.argv[1]), "cpu")
        getattr(ctl, sys.argv[2])()
    """)
    for action in ("lock", "restore"):
        subprocess.run([sys.executable, "-c", script, str(preset), action], env=tools.env(), check=True, timeout=60)
    assert tools.calls()[-2:] == ["nvidia-smi -i 0 --reset-gpu-clocks", "nvidia-smi -i 0 --reset-memory-clocks"]
    assert not (tools.state / "clocks" / "fake-nvidia-0" / "state.json").exists()


def test_a_long_device_name_is_shortened_where_a_reader_sees_it():
    """Titles once cut the name at 40 characters, mid-word: "Processor (2 logical co"."""
    cpu = "Intel(R) Xeon(R) Processor (2 logical cores, torch using 1 thread)"
    assert short_device_name(cpu) == "Intel(R) Xeon(R) Processor"
    assert short_device_name("NVIDIA H100 80GB HBM3") == "NVIDIA H100 80GB HBM3"
    long = "AMD EPYC 7B13 64-Core Processor with a very long marketing name (8 logical cores)"
    assert short_device_name(long) == "AMD EPYC 7B13 64-Core Processor with a\u2026"
    assert all(len(short_device_name(n)) <= 40 for n in (cpu, long, "x" * 60))



def test_a_restore_that_fails_after_the_measurement_keeps_what_was_measured(tmp_path, fake_tools, monkeypatch, capsys):
    """A broken restore command in a user's preset: the finished profile and bench report are written whole
    (recording that the restore failed), then the error names the command, the saved state and the file."""
    preset = str(preset_file(tmp_path, "nvidia"))
    monkeypatch.setenv("FAKE_FAIL", "--reset-memory-clocks")
    common = ["--model", "digits-vit", "--device", preset, "--torch-device", "cpu", "--budget", "0.05"]
    runs = {
        "profile": (["profile", *common, "--tokens", "65:45:10", "--min-samples", "3", "--warmup", "1"], "parquet",
                    "the profile is complete"),
        "bench": (["bench", *common, "--method", "none", "--rounds", "1"], "parquet", "the bench report is written"),
    }
    for name, (args, suffix, what) in runs.items():
        out = tmp_path / name
        code, _, err = run_in_process([*args, "--output-dir", str(out)], capsys)
        written = sorted(out.glob(f"*.{suffix}"))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "--reset-memory-clocks` failed (exit 3: fake failure: insufficient permissions); run it by hand" in err
        assert f"({what}: {written[0]})" in err and len(written) == 1
        meta = json.loads(pl.read_parquet_metadata(written[0])["pomt"])
        assert meta["clocks"]["mode"] == "locked" and "restoring them after failed" in meta["clocks"]["detail"]
        assert meta.get("complete", True) is True
        state = tmp_path / "state" / "clocks" / "fake-nvidia-0" / "state.json"
        assert state.exists()  # kept for `pomt clocks restore`
        state.unlink()
    calls = fake_tools.calls()
    assert calls.count("nvidia-smi -i 0 --reset-gpu-clocks") == 2  # every restore command ran, twice


def test_after_an_exception_a_failing_restore_is_a_plain_error(fake_tools, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "--reset-gpu-clocks")
    with pytest.raises(PomtError, match="--reset-gpu-clocks` failed") as caught:
        with locked_clocks(load_preset("h100"), torch_device="cpu"):
            raise RuntimeError("measurement failed")
    assert type(caught.value) is PomtError


def test_no_lock_clocks_under_a_lock_of_pomt_clocks_lock_records_that_lock(fake_tools):
    preset = load_preset("h100")
    ClockController(preset, "cpu").lock()
    with locked_clocks(preset, torch_device="cpu", enabled=False) as state:
        pass
    assert state.mode == "unlocked" and state.detail.startswith("--no-lock-clocks: not locked by this run, but "
                                                                "locked by pomt at ")
    assert state.values == {"max_graphics": "1980"}
    assert not any("reset" in c for c in fake_tools.calls())
    ClockController(preset, "cpu").restore()
    with locked_clocks(preset, torch_device="cpu", enabled=False) as state:
        assert state.detail == "--no-lock-clocks: measured without locking"


def tool_output_preset(tmp_path: Path, status: list[list[str]]) -> Path:
    """A preset whose clocks need nothing and whose status commands are ``status``."""
    path = tmp_path / "tool-output.toml"
    path.write_text(textwrap.dedent(f"""\
        display_name = "Fake tool output"
        torch_device = "cpu"
        description = "fake"
        [clocks]
        needs_root = false
        read = [ {{ argv = ["echo", "performance"], pattern = '(?P<governor>\\S+)' }} ]
        lock = [ ["true"] ]
        restore = [ ["echo", "{{governor}}"] ]
        status = {json.dumps(status)}
        """))
    return path


def test_tool_output_that_is_not_utf8_is_read_with_replacement_characters(fake_tools, tmp_path, capsys):
    # head -c of random bytes crashed every command that records the status (UnicodeDecodeError).
    preset = tool_output_preset(tmp_path, [["printf", "\\374caf\\351 ok\\n"]])
    code, out, err = run_in_process(["clocks", "status", "--device", str(preset)], capsys)
    assert code == 0 and "\ufffdcaf\ufffd ok" in out and not err
    with locked_clocks(load_preset(str(preset)), enabled=False) as state:
        assert "\ufffdcaf\ufffd ok" in state.status


def test_tool_output_is_printed_and_recorded_without_control_characters(fake_tools, tmp_path, capsys):
    preset = tool_output_preset(tmp_path, [["printf", "\\033[2J\\033[31mred\\033[0m\\ta\\r\\nb\\033]0;title\\007\\302\\233c\\bd"]])
    code, out, _ = run_in_process(["clocks", "status", "--device", str(preset)], capsys)
    assert code == 0 and "red" in out
    assert not any(ord(c) < 32 and c not in "\n\t" or 0x7f <= ord(c) <= 0x9f for c in out)
    with locked_clocks(load_preset(str(preset)), enabled=False) as state:
        assert state.status.splitlines()[1:] == ["red\ta", "bcd"]


def test_a_tool_that_prints_without_bound_is_cut(fake_tools, tmp_path, capsys):
    # 5 MB of status output took minutes to print; what is kept and what is printed are bounded.
    from pomt_cli.devices.clocks import OUTPUT_LIMIT
    preset = tool_output_preset(tmp_path, [["sh", "-c", f"yes | head -c {OUTPUT_LIMIT + 300000}"]])
    [result] = ClockController(load_preset(str(preset)), measuring=False).status()
    assert result.returncode == 0 and len(result.output) < OUTPUT_LIMIT and result.output.startswith("y\ny\n")
    code, out, _ = run_in_process(["clocks", "status", "--device", str(preset)], capsys)
    assert code == 0 and len(out) < 20000 and "more characters: run it by hand" in out


def test_a_refused_clocks_lock_leaves_no_state_folder(fake_tools, tmp_path, capsys, monkeypatch):
    # README: such an error "changes nothing"; it left POMT_STATE_DIR/clocks/<preset> behind.
    root = tmp_path / "new-state"
    monkeypatch.setenv("POMT_STATE_DIR", str(root))
    missing = preset_file(tmp_path, "orin", requires_path=str(tmp_path / "no-tegra-release"))
    code, _, err = run_in_process(["clocks", "lock", "--device", str(missing)], capsys)
    assert code == 2 and "does not exist" in err
    assert not root.exists()
    (fake_tools.bin / "nvpmodel").write_text(FAKE_TOOL + "echo 'NV Power Mode: unknown'\n")
    code, _, err = run_in_process(["clocks", "lock", "--device", str(jetson_preset(tmp_path, "orin"))], capsys)
    assert code == 2 and "does not match" in err
    assert not root.exists()
    root.mkdir()
    code, _, _ = run_in_process(["clocks", "lock", "--device", str(missing)], capsys)
    assert code == 2 and root.is_dir() and not any(root.iterdir())  # only what it made is removed
