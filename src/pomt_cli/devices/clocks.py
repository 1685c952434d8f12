"""Clock control: a preset's commands to read, lock and restore clocks, with a process lock."""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import re
import selectors
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pomt_cli.devices.presets import DevicePreset, PLACEHOLDER
from pomt_cli.devices.signals import signals_ignored, sigterm_raises
from pomt_cli.devices.torch_device import gpu_selector
from pomt_cli.errors import PomtError
from pomt_cli.formats.latency import ClockState
from pomt_cli.formats.outputs import atomic_write_text


#: Seconds a clock command may run before it counts as failed.
COMMAND_TIMEOUT_S = 60.0

#: Bytes kept of each of a clock command's two streams; the rest is read and dropped.
OUTPUT_LIMIT = 1 << 20

#: Terminal escape sequences (CSI, OSC, two-character) and control characters other than
#: newline and tab (C0, DEL, C1): tool output is printed and recorded without them.
_ESCAPES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


STATE_FILE = "state.json"


class SavedClockState(BaseModel):
    """What ``state.json`` holds while pomt has the clocks locked: what restoring needs."""

    model_config = ConfigDict(extra="allow")

    preset: str
    locked_at: str
    pid: int | None = None
    values: dict[str, str] = Field(default_factory=dict)
    measurement: bool = Field(False, description="locked by a measurement for its run (profile, refine, bench), "
                                                 "not by `pomt clocks lock`")


def state_root() -> Path:
    """Where saved clock states live: ``$POMT_STATE_DIR`` or ``/var/tmp/pomt`` (shared by sudo and the user)."""
    return Path(os.environ.get("POMT_STATE_DIR") or "/var/tmp/pomt")


def _substitute(argv: list[str], values: dict[str, str]) -> list[str]:
    return [PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), arg) for arg in argv]


def plain_text(data: bytes) -> str:
    """Tool output as text: UTF-8 (bytes that are not: U+FFFD), without escape sequences or
    control characters other than newline and tab."""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def _capture(argv: list[str], timeout_s: float) -> tuple[int, bytes, bytes]:
    """Run ``argv``; (exit code, stdout, stderr), each stream cut at :data:`OUTPUT_LIMIT` bytes.

    Both streams are read to their end as they come (a tool that prints without bound
    neither fills memory nor blocks on a full pipe).

    Raises:
        subprocess.TimeoutExpired: it ran past ``timeout_s`` (it is killed), or something it
            started kept its output open that long.
        OSError: it could not be started.
    """
    deadline = time.monotonic() + timeout_s
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        kept = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        with selectors.DefaultSelector() as selector:
            for stream in (proc.stdout, proc.stderr):
                selector.register(stream, selectors.EVENT_READ)
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    proc.kill()
                    raise subprocess.TimeoutExpired(argv, timeout_s)
                for key, _ in selector.select(left):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        selector.unregister(key.fileobj)
                    buffer = kept[key.fd]
                    buffer += chunk[:max(OUTPUT_LIMIT - len(buffer), 0)]
        try:
            returncode = proc.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        return returncode, bytes(kept[proc.stdout.fileno()]), bytes(kept[proc.stderr.fileno()])


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else ""


def _exit_text(result: CommandResult) -> str:
    """``exit N: the first line of its output``, or ``exit N`` where it printed nothing."""
    line = _first_line(result.output)
    return f"exit {result.returncode}: {line}" if line else f"exit {result.returncode}"


class CommandResult(BaseModel):
    """One clock command as run."""

    argv: list[str]
    returncode: int
    output: str

    @property
    def shell(self) -> str:
        """The command as a shell line, printable (see :func:`plain_text`)."""
        return plain_text(shlex.join(self.argv).encode())


class ClockController:
    """Runs one preset's clock commands for one device.

    Args:
        preset: the device preset.
        torch_device: the device measured (gives ``{gpu}``).
        state_dir: where to keep the saved state; default ``state_root()/clocks/<preset>[-<gpu>]``.
        measuring: the lock is for a measurement (profile, refine, bench), which can go on
            without it: errors end with ``--no-lock-clocks``. False for ``pomt clocks lock``,
            which has no such option.
    """

    def __init__(self, preset: DevicePreset, torch_device: torch.device | str | None = None,
                 state_dir: str | Path | None = None, measuring: bool = True) -> None:
        self.preset = preset
        self.measuring = measuring
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
        if not path or Path(path).exists():
            return None
        message = self.preset.clocks.requires_message
        if message:
            return f"{path} does not exist: {message}"
        return f"{path} does not exist on this machine, so its clocks cannot be controlled (a VM or container?)"

    def saved_state(self) -> SavedClockState | None:
        """The state saved by a lock that has not been restored yet, or None.

        Raises:
            PomtError: the file is unreadable, not JSON, or JSON of another shape (the
                message names the field).
        """
        try:
            text = self.state_file.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):  # no folder, or a file where a folder would be
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
            returncode, stdout, stderr = _capture([exe, *argv[1:]], COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return CommandResult(argv=argv, returncode=124, output=f"timed out after {COMMAND_TIMEOUT_S:.0f} s")
        except (OSError, ValueError) as exc:  # ValueError: a NUL in an argument
            return CommandResult(argv=argv, returncode=126, output=plain_text(str(exc).encode()))
        return CommandResult(argv=argv, returncode=returncode, output=plain_text(stdout + stderr).strip())

    def _or_unlocked(self, joint: str = ", or pass") -> str:
        """The way on without locking, for a measurement; nothing for ``pomt clocks lock``."""
        return f"{joint} --no-lock-clocks" if self.measuring else ""

    def _check_can_lock(self) -> None:
        name = self.preset.name
        why = self.available()
        if why:
            raise PomtError(f"cannot lock the clocks of {name}: {why}" + self._or_unlocked("; measure with"))
        missing = self.missing_tools()
        if missing:
            raise PomtError(
                f"locking the clocks of {name} needs {', '.join(missing)}, not found on PATH: install it, or lock them "
                f"by hand ({self._hand_lines()})" + self._or_unlocked(" and pass")
            )
        if self.preset.clocks.needs_root and os.geteuid() != 0:
            device = self.preset.device_arg
            if not self.measuring:
                raise PomtError(f"locking the clocks of {name} needs root: run `sudo pomt clocks lock --device {device}`")
            raise PomtError(
                f"locking the clocks of {name} needs root: run `sudo pomt clocks lock --device {device}` "
                f"first (and `sudo pomt clocks restore --device {device}` after), or by hand "
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
                    f"`{result.shell}` failed ({_exit_text(result)}); "
                    "run it by hand to see why" + self._or_unlocked()
                )
            match = re.search(read.pattern, result.output)
            if match is None:
                raise PomtError(
                    f"`{result.shell}` printed {_first_line(result.output)!r}, which does not match "
                    f"{read.pattern!r}: fix the preset's clocks.read pattern"
                )
            values.update({k: v for k, v in match.groupdict().items() if v is not None})
        return values

    def lock(self, killed: SavedClockState | None = None, *, for_run: bool = False) -> dict[str, str]:
        """Save the state, then lock the clocks; returns the values read.

        Nothing is changed when a tool is missing, root is needed, or a read fails. When a
        lock command fails, the commands that ran are undone by the restore commands.

        Args:
            killed: the saved state of a measurement that was killed with the clocks
                locked (see :func:`locked_clocks`): its values, read before that lock, are
                taken over rather than read again from the locked clocks.
            for_run: the lock lasts one measurement's run (:func:`locked_clocks`), which
                restores the clocks at its end; saved as ``measurement``.

        Raises:
            PomtError: see above; the message names the command to run by hand.
        """
        self._check_can_lock()
        if killed is None and self.saved_state() is not None:
            raise PomtError(
                f"the clocks of {self.preset.name} are already locked by pomt (state in {self.state_file}): "
                f"restore them with `pomt clocks restore --device {self.preset.device_arg}` first"
            )
        values = self.read_values() if killed is None else killed.values
        _make_state_dir(self.state_dir, self._or_unlocked())
        record = {
            "preset": self.preset.name,
            "locked_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "pid": os.getpid(),
            "values": values,
            "measurement": for_run,
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
            with signals_ignored():
                self._restore_with(all_values)
            self.state_file.unlink(missing_ok=True)
            raise
        if failed is not None:
            with signals_ignored():
                self._restore_with(all_values)
            self.state_file.unlink(missing_ok=True)
            hint = "with sudo" if self.preset.clocks.needs_root else "by hand"
            raise PomtError(
                f"`{failed.shell}` failed ({_exit_text(failed)}); the clocks were "
                f"put back; run it {hint} to see why" + self._or_unlocked()
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
        needed = {n for argv in self.preset.clocks.restore for arg in argv for n in PLACEHOLDER.findall(arg)}
        if saved is None and needed - set(values):
            raise PomtError(
                f"no saved clock state for {self.preset.name} in {self.state_dir}: the clocks were not locked by "
                "pomt, so there is nothing to restore"
            )
        failures = self._restore_with(values)
        if failures:
            first = failures[0]
            raise PomtError(
                f"restoring the clocks of {self.preset.name}: `{first.shell}` failed ({_exit_text(first)}); run it "
                f"by hand; the saved state stays in {self.state_file}"
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


class ClockRestoreError(PomtError):
    """Restoring the clocks failed after a measurement that finished: its results are sound."""


def _make_state_dir(path: Path, or_unlocked: str) -> list[Path]:
    """Create ``path`` and its missing parents; the folders created, deepest first."""
    created = [folder for folder in (path, *path.parents) if not folder.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(created)
        raise PomtError(
            f"cannot create the clock state folder {path} ({exc.strerror or exc}): set POMT_STATE_DIR to a writable "
            f"folder{or_unlocked}"
        ) from None
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is empty; stop at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


@contextmanager
def clock_lock(ctl: ClockController) -> Iterator[None]:
    """Hold the preset's state folder (``fcntl.flock``) so that one pomt process at a time uses its clocks.

    Every run that locks the clocks (or measures under a lock saved by ``pomt clocks
    lock``) and ``pomt clocks lock|restore`` take it. A second process is refused at once:
    it would otherwise record the first run's lock as its own and have the clocks
    restored under it. The lock goes with the process (a crash frees it).

    Folders it created are removed again when the block fails and leaves them empty (a
    refused lock changes nothing).

    Raises:
        PomtError: another process holds it, or the folder cannot be created or opened.
    """
    created = _make_state_dir(ctl.state_dir, ctl._or_unlocked())
    try:
        fd = os.open(ctl.state_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        _remove_empty(created)
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
        try:
            yield
        except BaseException:
            _remove_empty(created)  # still locked: no other pomt process has put anything in it
            raise
    finally:
        os.close(fd)


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
    block raises ``SystemExit(143)``). Yields the :class:`ClockState` to record. A restore
    that fails after the block finished raises :class:`ClockRestoreError`, so that the
    caller can keep what it measured; after an exception, a failed restore raises
    :class:`PomtError` in its place.

    - ``enabled=False``: nothing is run but the status commands; mode ``unlocked``.
    - The preset's ``requires_path`` is missing (no cpufreq, not a Jetson): mode ``unavailable``;
      nothing is run.
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
        detail = "--no-lock-clocks: measured without locking"
        try:
            saved = ctl.saved_state()
        except PomtError:
            saved = None
        if saved is not None:
            detail = (f"--no-lock-clocks: not locked by this run, but locked by pomt at {saved.locked_at} "
                      f"(state in {ctl.state_file}) and left as they were")
        yield ClockState(preset=preset.name, mode="unlocked", detail=detail, values=saved.values if saved else {},
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
        # A measurement holds clock_lock while its state is saved, so one saved by a measurement
        # that this process could lock was killed outright (SIGKILL, OOM, power loss) before it
        # restored the clocks: take its lock over and restore them at the end.
        killed = saved if saved is not None and saved.measurement else None
        if saved is not None and killed is None:
            yield ClockState(
                preset=preset.name,
                mode="already_locked",
                detail=f"locked by pomt at {saved.locked_at} (state in {ctl.state_file}); left locked",
                values=saved.values,
                status=ctl.status_text(),
            )
            return
        with sigterm_raises():
            values = ctl.lock(killed, for_run=True)
            detail = "locked for the measurement and restored after"
            if killed is not None:
                detail = (f"locked at {killed.locked_at} by a pomt run (pid {killed.pid}) killed before it "
                          "restored them; taken over for the measurement and restored after")
            try:
                yield ClockState(preset=preset.name, mode="locked", detail=detail,
                                 values=values, status=ctl.status_text())
            except BaseException:
                with signals_ignored():
                    ctl.restore()
                raise
            with signals_ignored():
                try:
                    ctl.restore()
                except PomtError as exc:
                    raise ClockRestoreError(str(exc)) from None
