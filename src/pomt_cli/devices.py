"""Device presets (``configs/devices/*.toml``) and the clock-locking helper.

A preset names a device, the torch device it runs on, and how to control its clocks, as
data: commands that *read* values (the current power mode, the maximum clock), commands
that *lock* the clocks, commands that *restore* them, and commands that show the *status*.
Arguments may hold ``{placeholders}``: ``{gpu}`` (the GPU for ``nvidia-smi -i``),
``{state_dir}`` (where the saved state lives) and the named groups of the read patterns.

Locking saves what restoring needs (``state.json`` in the state folder) before it changes
anything, so a separate ``pomt clocks restore`` can put the clocks back even after a
crash. :func:`locked_clocks` wraps a measurement and restores on normal exit, on
exceptions, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import importlib.resources
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from pomt_cli.errors import PomtError
from pomt_cli.outputs import atomic_write_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
BUILTIN_VARIABLES = frozenset({"gpu", "state_dir"})
#: Seconds a clock command may run before it counts as failed.
COMMAND_TIMEOUT_S = 60.0
STATE_FILE = "state.json"


class ClockRead(BaseModel):
    """A command whose output gives values, by the named groups of ``pattern``."""

    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(min_length=1)
    pattern: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"pattern {value!r} is not a regular expression: {exc}") from None
        if not compiled.groupindex:
            raise ValueError(f"pattern {value!r} has no named group (?P<name>...) to read a value into")
        return value

    @property
    def names(self) -> list[str]:
        return list(re.compile(self.pattern).groupindex)


class ClockControl(BaseModel):
    """How to lock, restore and inspect a device's clocks."""

    model_config = ConfigDict(extra="forbid")

    needs_root: bool = True
    requires_path: str | None = Field(
        None, description="a file that exists only where the clocks can be controlled (cpufreq)"
    )
    read: list[ClockRead] = Field(default_factory=list)
    lock: list[list[str]] = Field(min_length=1)
    restore: list[list[str]] = Field(min_length=1)
    status: list[list[str]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _placeholders_known(self) -> ClockControl:
        read_names = {name for r in self.read for name in r.names}
        for section, commands, allowed in (
            ("read", [r.argv for r in self.read], BUILTIN_VARIABLES),
            ("lock", self.lock, BUILTIN_VARIABLES | read_names),
            ("restore", self.restore, BUILTIN_VARIABLES | read_names),
            ("status", self.status, BUILTIN_VARIABLES),
        ):
            for argv in commands:
                if not argv:
                    raise ValueError(f"an empty command in clocks.{section}")
                for arg in argv:
                    for name in _PLACEHOLDER.findall(arg):
                        if name not in allowed:
                            raise ValueError(
                                f"clocks.{section}: {{{name}}} in {arg!r} is not one of {sorted(allowed)}"
                            )
        return self

    def uses(self, name: str) -> bool:
        """Whether any command refers to ``{name}``."""
        commands = [r.argv for r in self.read] + self.lock + self.restore + self.status
        return any(name in _PLACEHOLDER.findall(arg) for argv in commands for arg in argv)


class DevicePreset(BaseModel):
    """One device: its display name, torch device and clock control."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the preset's name (its file's stem)")
    display_name: str
    torch_device: str
    description: str = ""
    clocks: ClockControl
    _device_arg: str | None = PrivateAttr(None)

    @property
    def device_arg(self) -> str:
        """What to pass as ``--device`` for this preset: its name, or its file's path (shell-quoted)."""
        return shlex.quote(self._device_arg or self.name)


class ClockState(BaseModel):
    """What happened to the clocks around a measurement (recorded in profiles).

    ``mode``: ``locked`` (pomt locked them and restored them after), ``already_locked``
    (a state saved by ``pomt clocks lock`` existed, so they were left as they were),
    ``unlocked`` (``--no-lock-clocks``), ``unavailable`` (the machine has no controllable
    clocks, e.g. no cpufreq in a VM).
    """

    preset: str
    mode: Literal["locked", "already_locked", "unlocked", "unavailable"]
    detail: str = ""
    values: dict[str, str] = Field(default_factory=dict, description="values read before locking")
    status: str | None = Field(None, description="output of the preset's status commands while measuring")

    @property
    def locked(self) -> bool:
        return self.mode in ("locked", "already_locked")


class SavedClockState(BaseModel):
    """What ``state.json`` holds while pomt has the clocks locked: what restoring needs."""

    model_config = ConfigDict(extra="allow")

    preset: str
    locked_at: str
    pid: int | None = None
    values: dict[str, str] = Field(default_factory=dict)


def _builtin_dir() -> Path:
    return Path(str(importlib.resources.files("pomt_cli") / "configs" / "devices"))


def preset_names() -> list[str]:
    """Names of the bundled presets, sorted."""
    return sorted(p.stem for p in _builtin_dir().glob("*.toml"))


def load_preset(name_or_path: str | Path) -> DevicePreset:
    """A bundled preset by name (``orin``, ``h100``...) or a preset from a TOML file.

    Raises:
        PomtError: unknown name (the message lists the known ones), unreadable file,
            invalid TOML or a preset that does not validate.
    """
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".toml") or os.sep in text or path.is_file()):
        path = _builtin_dir() / f"{text}.toml"
        if not path.is_file():
            raise PomtError(
                f"unknown device {text!r}: use one of {', '.join(preset_names())} or the path of a .toml preset"
            )
    try:
        is_dir, exists = path.is_dir(), path.exists()
    except OSError as exc:
        raise PomtError(f"cannot use --device {path} ({exc.strerror or exc})") from None
    if is_dir:
        raise PomtError(f"--device {path} is a folder: give a preset name or the path of a .toml file")
    if not exists:
        raise PomtError(f"device preset {path} does not exist: give a preset name or the path of a .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PomtError(f"cannot read device preset {path} ({exc}): check the file") from None
    except tomllib.TOMLDecodeError as exc:
        raise PomtError(f"device preset {path} is not valid TOML: {exc}") from None
    try:
        preset = DevicePreset.model_validate({"name": path.stem, **data})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "file"
        raise PomtError(f"device preset {path} is invalid at {where}: {first['msg']}") from None
    if path.parent != _builtin_dir():
        preset._device_arg = text
    return preset


def default_preset_name() -> str:
    """The preset for "this machine": ``nvidia`` where CUDA is available, else ``cpu``."""
    return "nvidia" if torch.cuda.is_available() else "cpu"


def resolve_torch_device(spec: str) -> torch.device:
    """The torch device for ``spec`` (``cuda``, ``cuda:1``, ``cpu``, ``mps``), checked to exist here.

    Raises:
        PomtError: malformed, unsupported or absent device.
    """
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise PomtError(f"torch device {spec!r} is not a device name: use cpu, cuda, cuda:1 or mps") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PomtError(
                f"torch device {spec!r} asked for, but CUDA is not available here (torch {torch.__version__}): "
                "use --torch-device cpu or a CPU preset such as --device cpu"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise PomtError(f"torch device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise PomtError(f"torch device {spec!r} asked for, but MPS is not available here: use --torch-device cpu")
        return device
    raise PomtError(f"torch device {spec!r} is not supported: use cpu, cuda or mps")


def device_name(device: torch.device) -> str:
    """A human name for the hardware behind ``device``, e.g. ``NVIDIA H100 80GB HBM3``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (MPS)"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} logical cores, torch using {torch.get_num_threads()} threads)"


def gpu_selector(device: torch.device | str | None) -> str:
    """What ``nvidia-smi -i`` needs for ``device``: the GPU's UUID when CUDA sees it, else its index.

    The UUID survives CUDA_VISIBLE_DEVICES renumbering; without CUDA (e.g. on a board
    where torch lacks it) the index is the best guess.
    """
    device = torch.device(device) if device is not None else None
    index = device.index if device is not None and device.type == "cuda" and device.index is not None else 0
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        try:
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        except (AttributeError, RuntimeError):
            pass
    return str(index)


def state_root() -> Path:
    """Where saved clock states live: ``$POMT_STATE_DIR`` or ``/var/tmp/pomt`` (shared by sudo and the user)."""
    return Path(os.environ.get("POMT_STATE_DIR") or "/var/tmp/pomt")


def _substitute(argv: list[str], values: dict[str, str]) -> list[str]:
    return [_PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), arg) for arg in argv]


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else ""


class CommandResult(BaseModel):
    """One clock command as run."""

    argv: list[str]
    returncode: int
    output: str

    @property
    def shell(self) -> str:
        return shlex.join(self.argv)


class ClockController:
    """Runs one preset's clock commands for one device.

    Args:
        preset: the device preset.
        torch_device: the device measured (gives ``{gpu}``).
        state_dir: where to keep the saved state; default ``state_root()/clocks/<preset>[-<gpu>]``.
    """

    def __init__(self, preset: DevicePreset, torch_device: torch.device | str | None = None,
                 state_dir: str | Path | None = None) -> None:
        self.preset = preset
        self.gpu = gpu_selector(torch_device if torch_device is not None else preset.torch_device)
        if state_dir is None:
            leaf = preset.name + (f"-{re.sub(r'[^A-Za-z0-9.-]+', '-', self.gpu)}" if preset.clocks.uses("gpu") else "")
            state_dir = state_root() / "clocks" / leaf
        self.state_dir = Path(state_dir)

    @property
    def builtins(self) -> dict[str, str]:
        return {"gpu": self.gpu, "state_dir": str(self.state_dir)}

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def available(self) -> str | None:
        """``None`` when the clocks can be controlled here, else why not."""
        path = self.preset.clocks.requires_path
        if path and not Path(path).exists():
            return f"{path} does not exist on this machine, so its clocks cannot be controlled (a VM or container?)"
        return None

    def saved_state(self) -> SavedClockState | None:
        """The state saved by a lock that has not been restored yet, or None.

        Raises:
            PomtError: the file is unreadable, not JSON, or JSON of another shape (the
                message names the field).
        """
        try:
            text = self.state_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise PomtError(f"saved clock state {self.state_file} is unreadable ({cause}): check or delete it") from None
        try:
            return SavedClockState.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "the file"
            raise PomtError(
                f"saved clock state {self.state_file} is damaged ({where}: {first['msg']}): restore the clocks by "
                f"hand ({'; '.join(self.plan()['restore'])}) and delete it"
            ) from None

    def plan(self) -> dict[str, list[str]]:
        """The commands of each phase as shell lines, with known placeholders filled in."""
        c = self.preset.clocks
        values = self.builtins
        return {
            "read": [shlex.join(_substitute(r.argv, values)) for r in c.read],
            "lock": [shlex.join(_substitute(a, values)) for a in c.lock],
            "restore": [shlex.join(_substitute(a, values)) for a in c.restore],
            "status": [shlex.join(_substitute(a, values)) for a in c.status],
        }

    def missing_tools(self, phases: tuple[str, ...] = ("read", "lock", "restore")) -> list[str]:
        """Executables named by the commands of ``phases`` that are not on PATH."""
        c = self.preset.clocks
        commands = {"read": [r.argv for r in c.read], "lock": c.lock, "restore": c.restore, "status": c.status}
        tools = [argv[0] for phase in phases for argv in commands[phase]]
        return sorted({tool for tool in tools if shutil.which(tool) is None})

    def _hand_lines(self) -> str:
        return " && ".join(f"sudo {line}" if self.preset.clocks.needs_root else line for line in self.plan()["lock"])

    def _run(self, argv: list[str]) -> CommandResult:
        exe = shutil.which(argv[0])
        if exe is None:
            return CommandResult(argv=argv, returncode=127, output=f"{argv[0]}: command not found")
        try:
            done = subprocess.run([exe, *argv[1:]], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return CommandResult(argv=argv, returncode=124, output=f"timed out after {COMMAND_TIMEOUT_S:.0f} s")
        except OSError as exc:
            return CommandResult(argv=argv, returncode=126, output=str(exc))
        return CommandResult(argv=argv, returncode=done.returncode, output=(done.stdout + done.stderr).strip())

    def _check_can_lock(self) -> None:
        name = self.preset.name
        why = self.available()
        if why:
            raise PomtError(f"cannot lock the clocks of {name}: {why}; measure with --no-lock-clocks")
        missing = self.missing_tools()
        if missing:
            raise PomtError(
                f"locking the clocks of {name} needs {', '.join(missing)}, not found on PATH: install it, or lock them "
                f"by hand ({self._hand_lines()}) and pass --no-lock-clocks"
            )
        if self.preset.clocks.needs_root and os.geteuid() != 0:
            raise PomtError(
                f"locking the clocks of {name} needs root: run `sudo pomt clocks lock --device {self.preset.device_arg}` "
                f"first (and `sudo pomt clocks restore --device {self.preset.device_arg}` after), or by hand "
                f"{self._hand_lines()}, "
                "and pass --no-lock-clocks"
            )

    def read_values(self) -> dict[str, str]:
        """Run the read commands; the values of their patterns' named groups.

        Raises:
            PomtError: a read command failed or printed nothing the pattern matches.
        """
        values: dict[str, str] = {}
        for read in self.preset.clocks.read:
            result = self._run(_substitute(read.argv, self.builtins))
            if result.returncode != 0:
                raise PomtError(
                    f"`{result.shell}` failed (exit {result.returncode}: {_first_line(result.output)}); "
                    "run it by hand to see why, or pass --no-lock-clocks"
                )
            match = re.search(read.pattern, result.output)
            if match is None:
                raise PomtError(
                    f"`{result.shell}` printed {_first_line(result.output)!r}, which does not match "
                    f"{read.pattern!r}: fix the preset's clocks.read pattern"
                )
            values.update({k: v for k, v in match.groupdict().items() if v is not None})
        return values

    def lock(self) -> dict[str, str]:
        """Save the state, then lock the clocks; returns the values read.

        Nothing is changed when a tool is missing, root is needed, or a read fails. When a
        lock command fails, the commands that ran are undone by the restore commands.

        Raises:
            PomtError: see above; the message names the command to run by hand.
        """
        self._check_can_lock()
        if self.saved_state() is not None:
            raise PomtError(
                f"the clocks of {self.preset.name} are already locked by pomt (state in {self.state_file}): "
                f"restore them with `pomt clocks restore --device {self.preset.device_arg}` first"
            )
        values = self.read_values()
        _make_state_dir(self.state_dir)
        record = {
            "preset": self.preset.name,
            "locked_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "pid": os.getpid(),
            "values": values,
        }
        atomic_write_text(self.state_file, json.dumps(record, indent=2))
        all_values = {**self.builtins, **values}
        failed: CommandResult | None = None
        try:
            for argv in self.preset.clocks.lock:
                result = self._run(_substitute(argv, all_values))
                if result.returncode != 0:
                    failed = result
                    break
        except BaseException:  # Ctrl-C or SIGTERM between two lock commands: undo, then go on
            with _signals_ignored():
                self._restore_with(all_values)
            self.state_file.unlink(missing_ok=True)
            raise
        if failed is not None:
            with _signals_ignored():
                self._restore_with(all_values)
            self.state_file.unlink(missing_ok=True)
            hint = "with sudo" if self.preset.clocks.needs_root else "by hand"
            raise PomtError(
                f"`{failed.shell}` failed (exit {failed.returncode}: {_first_line(failed.output)}); the clocks were "
                f"put back; run it {hint} to see why, or pass --no-lock-clocks"
            )
        return values

    def _restore_with(self, values: dict[str, str]) -> list[CommandResult]:
        """Run every restore command (even after one fails); the failures."""
        failures = []
        for argv in self.preset.clocks.restore:
            result = self._run(_substitute(argv, values))
            if result.returncode != 0:
                failures.append(result)
        return failures

    def restore(self) -> None:
        """Put the clocks back as they were before :meth:`lock`, and forget the saved state.

        Raises:
            PomtError: nothing saved while restoring needs saved values, or a restore
                command failed (the state is kept so that it can be tried again).
        """
        saved = self.saved_state()
        values = {**self.builtins, **(saved.values if saved is not None else {})}
        needed = {n for argv in self.preset.clocks.restore for arg in argv for n in _PLACEHOLDER.findall(arg)}
        if saved is None and needed - set(values):
            raise PomtError(
                f"no saved clock state for {self.preset.name} in {self.state_dir}: the clocks were not locked by "
                "pomt, so there is nothing to restore"
            )
        failures = self._restore_with(values)
        if failures:
            first = failures[0]
            raise PomtError(
                f"restoring the clocks of {self.preset.name}: `{first.shell}` failed (exit {first.returncode}: "
                f"{_first_line(first.output)}); run it by hand; the saved state stays in {self.state_file}"
            )
        self.state_file.unlink(missing_ok=True)

    def status(self) -> list[CommandResult]:
        """Run the status commands (read-only); one result per command, missing tools included."""
        return [self._run(_substitute(argv, self.builtins)) for argv in self.preset.clocks.status]

    def status_text(self, limit: int = 4000) -> str:
        """The status commands' outputs as one text, for the record (never raises)."""
        parts = []
        for result in self.status():
            parts.append(f"$ {result.shell}\n{result.output}" + (f"\n(exit {result.returncode})" if result.returncode else ""))
        return "\n".join(parts)[:limit]


def _make_state_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PomtError(
            f"cannot create the clock state folder {path} ({exc.strerror or exc}): set POMT_STATE_DIR to a writable "
            "folder, or pass --no-lock-clocks"
        ) from None


@contextmanager
def clock_lock(ctl: ClockController) -> Iterator[None]:
    """Hold the preset's state folder (``fcntl.flock``) so that one pomt process at a time uses its clocks.

    Every run that locks the clocks (or measures under a lock saved by ``pomt clocks
    lock``) and ``pomt clocks lock|restore`` take it. A second process is refused at once:
    it would otherwise record the first run's lock as its own and have the clocks
    restored under it. The lock goes with the process (a crash frees it).

    Raises:
        PomtError: another process holds it, or the folder cannot be created or opened.
    """
    _make_state_dir(ctl.state_dir)
    try:
        fd = os.open(ctl.state_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise PomtError(f"cannot open the clock state folder {ctl.state_dir} ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise PomtError(f"cannot lock the clock state folder {ctl.state_dir} ({exc.strerror or exc})") from None
            raise PomtError(
                f"another pomt process is using the clocks of {ctl.preset.name} (it holds {ctl.state_dir}): "
                "wait for it to finish, then run again"
            ) from None
        yield
    finally:
        os.close(fd)


class _Terminated(SystemExit):
    """SIGTERM, raised so that ``finally`` blocks run; exits with 128 + 15."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`SystemExit` (143) instead of killing outright."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM (here and in the commands started) while restoring."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def locked_clocks(
    preset: DevicePreset,
    *,
    torch_device: torch.device | str | None = None,
    enabled: bool = True,
    state_dir: str | Path | None = None,
) -> Iterator[ClockState]:
    """Lock the clocks of ``preset`` for the duration of the block, and restore them after.

    Restores on normal exit, on exceptions, on Ctrl-C and on SIGTERM (which inside the
    block raises ``SystemExit(143)``). Yields the :class:`ClockState` to record.

    - ``enabled=False``: nothing is run but the status commands; mode ``unlocked``.
    - The preset's ``requires_path`` is missing (no cpufreq): mode ``unavailable``.
    - A state saved by ``pomt clocks lock`` exists: the clocks are left as they are and
      not restored at the end; mode ``already_locked``.

    In the last two cases the block runs holding :func:`clock_lock`, so a second process
    on the same preset is refused instead of measuring under this one's lock.

    Raises:
        PomtError: locking is not possible (missing tool, not root, failing command,
            another pomt process on the preset); nothing has been changed then.
    """
    ctl = ClockController(preset, torch_device, state_dir)
    if not enabled:
        yield ClockState(preset=preset.name, mode="unlocked", detail="--no-lock-clocks: measured without locking",
                         status=ctl.status_text())
        return
    unavailable = ctl.available()
    if unavailable:
        yield ClockState(preset=preset.name, mode="unavailable", detail=unavailable + "; measured without locking")
        return
    if ctl.saved_state() is None:
        ctl._check_can_lock()  # a missing tool or root fails before anything is created
    with clock_lock(ctl):
        saved = ctl.saved_state()
        if saved is not None:
            yield ClockState(
                preset=preset.name,
                mode="already_locked",
                detail=f"locked by pomt at {saved.locked_at} (state in {ctl.state_file}); left locked",
                values=saved.values,
                status=ctl.status_text(),
            )
            return
        with sigterm_raises():
            values = ctl.lock()
            try:
                yield ClockState(preset=preset.name, mode="locked",
                                 detail="locked for the measurement and restored after",
                                 values=values, status=ctl.status_text())
            finally:
                with _signals_ignored():
                    ctl.restore()
