"""Output files: the one place that names them, and atomic writing.

Every command that writes files takes ``--output-dir`` and asks :func:`output_path` for
the names, so that a profile, an accuracy profile and a report of the same model, batch
size, dtype and device can be found next to each other. Files are written to a temporary
name in the same folder and renamed into place, so an interrupted run never leaves a
half-written file under the final name; the files of one result are written as one
:class:`OutputSet`, so they appear together or not at all. Files get the mode the umask
gives (0644 under the usual 022).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from pomt_cli.errors import PomtError

KINDS = ("latency", "accuracy", "compute_r", "bench", "demo")


def _slug(text: str) -> str:
    """A file-name-safe form of a model, device, method or data set name.

    Letters and digits of any script are kept (``données`` stays ``données``); a name with
    none becomes ``x`` and a short hash of it, so that different names stay different.
    """
    slug = re.sub(r"(?:[^\w.+-]|_)+", "-", text).strip("-")
    return slug or "x" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def file_mode() -> int:
    """The mode a new file gets under this process's umask (``0o666 & ~umask``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def output_stem(
    kind: str,
    model: str,
    *,
    device: str | None = None,
    batch_size: int | Sequence[int] | None = None,
    dtype: str | None = None,
    img_size: int | None = None,
    extra: Sequence[str] = (),
) -> str:
    """The file stem shared by all files of one result, e.g. ``latency_deit_small_patch16_224_h100_bs1-4_float16``.

    Args:
        kind: one of :data:`KINDS`.
        model: the model's name (a timm name or ``digits-vit``).
        device: the device preset's name, when the result depends on the device.
        batch_size: one batch size or several.
        dtype: the dtype's name (``float16``...).
        img_size: the input size given with ``--img-size`` (``img224``); None: the model's default.
        extra: further parts, such as methods and r, already in the order to appear.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {KINDS}")
    parts = [kind, _slug(model)]
    if device:
        parts.append(_slug(device))
    if batch_size is not None:
        sizes = [batch_size] if isinstance(batch_size, int) else list(batch_size)
        parts.append("bs" + "-".join(str(b) for b in sizes))
    if dtype:
        parts.append(_slug(dtype))
    if img_size is not None:
        parts.append(f"img{img_size}")
    parts.extend(_slug(e) for e in extra)
    return "_".join(parts)


def layers_part(method: str, layers: Sequence[int]) -> str:
    """The part of a file name that names a method's layers: ``pomt-layer3``, or ``pomt-layers3-6`` for several."""
    if len(layers) == 1:
        return f"{method}-layer{layers[0]}"
    return f"{method}-layers" + "-".join(map(str, layers))


def output_path(output_dir: str | Path, stem: str, suffix: str) -> Path:
    """``output_dir/stem.suffix`` (``suffix`` without the dot; ``plot.png`` adds a second part)."""
    return Path(output_dir) / f"{stem}.{suffix}"


def prepare_output_dir(output_dir: str | Path) -> Path:
    """Create ``output_dir`` if needed and check that files can be written there.

    Raises:
        PomtError: the folder cannot be created or written to.
    """
    path = check_output_dir(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".pomt-write-test-"):
            pass
    except OSError as exc:
        raise PomtError(
            f"cannot write to --output-dir {path} ({exc.strerror or exc}): choose a writable folder"
        ) from None
    return path


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``.

    On an exception (Ctrl-C included) the temporary file is removed and ``path`` is left
    as it was.
    """
    final = Path(path)
    tmp = _temporary(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def check_output_dir(output_dir: str | Path) -> Path:
    """Check, without creating anything, that ``output_dir`` is or can become a writable folder.

    Commands call this before long work, so that a bad ``--output-dir`` fails at once;
    an :class:`OutputSet` creates the folder when the results are written.

    Raises:
        PomtError: a file is in the way, or the folder (or its nearest existing parent)
            is not writable.
    """
    path = Path(output_dir)
    probe = path
    try:
        while not probe.exists():
            if probe.parent == probe:
                break
            probe = probe.parent
    except OSError as exc:  # a name too long, a loop of links...
        raise PomtError(f"cannot use --output-dir {path}: {exc.strerror or exc}") from None
    if probe.exists() and not probe.is_dir():
        raise PomtError(f"--output-dir {path}: {probe} is a file, not a folder: give a folder path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PomtError(f"cannot write to --output-dir {path} ({probe} is not writable): choose a writable folder")
    return path


def _temporary_prefix(final: Path) -> str:
    """What the temporary names of ``final`` begin with: ``.NAME.`` (a hash for a long name)."""
    name = final.name if len(final.name.encode()) <= 200 else hashlib.sha256(final.name.encode()).hexdigest()[:16]
    return f".{name}."


def _temporary(final: Path) -> Path:
    """A new empty file next to ``final`` under a hidden temporary name, with the umask's mode."""
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=_temporary_prefix(final), suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    return Path(tmp_name)


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove what a killed writer of ``final`` left beside it; the paths removed.

    That is its temporaries ``.NAME.*.tmp``, their backups ``.NAME.*.tmp.old`` and the
    temporaries of those (``..NAME.*.tmp.*.tmp``). Only the holder of the names' lock
    may call this: another live writer's temporaries would go too.
    """
    prefix = _temporary_prefix(final)
    removed = []
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if name.startswith((prefix, "." + prefix)) and name.endswith((".tmp", ".tmp.old")):
            try:
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def write_error(final: Path, exc: BaseException) -> PomtError:
    if isinstance(exc, OSError):
        cause = exc.strerror or str(exc)
    else:
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return PomtError(f"cannot write {final} ({cause}): check the free space and permissions of its folder")


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while the block runs; deliver them after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in received[:1]:
            signal.raise_signal(sig)


class OutputSet:
    """The files of one result (a profile and its plot...), written as one unit.

    >>> with OutputSet(folder, stem, ("parquet", "png")) as files:
    ...     files.write("parquet", lambda tmp: frame.write_parquet(tmp))
    ...     files.write("png", lambda tmp: plot(frame, tmp))
    ...     files.commit()
    >>> files.path("parquet")

    Entering creates the folder (and its missing parents) and claims the names: the
    lock file ``.STEM.lock`` in the folder, held with ``fcntl.flock`` until the set is
    left. A second process that would write the same names is refused with a
    :class:`PomtError` (one line) instead of overwriting the first one's files.

    Each file is written to a temporary name in the folder; :meth:`commit` renames them
    all into place (signals are held back meanwhile), and should a rename fail it puts
    back the files it had replaced. Leaving the set without a commit (an error, Ctrl-C)
    removes the temporary files, and the folders the set created if they are empty:
    earlier files of the same names stay as they were.

    A process killed outright (SIGKILL, out of memory, power loss) runs none of that.
    Before its renames :meth:`commit` writes the journal ``.STEM.commit`` (the renames
    to do) and removes it after them. The next set of the same names, once it holds the
    lock, finishes the renames of a journal it finds (the killed set lands whole) and
    removes the temporary files a killed writer left.

    ``wait=True`` waits for a second process's lock instead of refusing (a cache, where
    both would write the same file).
    """

    def __init__(self, folder: str | Path, stem: str, suffixes: Sequence[str], *, wait: bool = False) -> None:
        self.folder = Path(folder)
        self.stem = stem
        self.suffixes = tuple(suffixes)
        self.wait = wait
        self._temporaries: dict[str, Path] = {}
        self._created: list[Path] = []
        self._lock_fd: int | None = None
        self.committed = False

    def path(self, suffix: str) -> Path:
        """The final path of the file with ``suffix``."""
        if suffix not in self.suffixes:
            raise ValueError(f"{suffix!r} is not one of this set's suffixes {self.suffixes}")
        return output_path(self.folder, self.stem, suffix)

    @property
    def paths(self) -> dict[str, Path]:
        return {suffix: self.path(suffix) for suffix in self.suffixes}

    @property
    def lock_file(self) -> Path:
        return self.folder / f".{self.stem}.lock"

    @property
    def journal_file(self) -> Path:
        return self.folder / f".{self.stem}.commit"

    def __enter__(self) -> OutputSet:
        check_output_dir(self.folder)
        try:
            self._make_folder()
            self._claim()
            self._recover()
        except BaseException:
            self._remove_created()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        for tmp in self._temporaries.values():
            tmp.unlink(missing_ok=True)
        self._temporaries.clear()
        if self._lock_fd is not None:
            try:
                self.lock_file.unlink(missing_ok=True)
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None
        if not self.committed:
            self._remove_created()

    def _make_folder(self) -> None:
        missing = []
        probe = self.folder
        while not probe.exists() and probe.parent != probe:
            missing.append(probe)
            probe = probe.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise PomtError(f"cannot create --output-dir {self.folder} ({exc.strerror or exc}): "
                                "choose a writable folder") from None
            self._created.append(folder)

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break
        self._created.clear()

    def _claim(self) -> None:
        """Take ``.STEM.lock`` (flock); the lock file is checked to be the one at the path after locking."""
        lock = self.lock_file
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
            except OSError as exc:
                raise PomtError(f"cannot write to --output-dir {self.folder} ({exc.strerror or exc}): "
                                "choose a writable folder") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BaseException as exc:
                if not isinstance(exc, OSError):  # Ctrl-C while waiting
                    os.close(fd)
                    raise
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise PomtError(f"cannot lock {lock} ({exc.strerror or exc})") from None
                raise PomtError(
                    f"another pomt run{f' (pid {holder})' if holder.isdigit() else ''} is writing "
                    f"{output_path(self.folder, self.stem, '*')}: wait for it to finish, or give another --output-dir"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed it between our open and our lock: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _recover(self) -> None:
        """Finish the renames of a killed commit's journal; remove a killed writer's temporaries."""
        journal = self.journal_file
        try:
            renames = json.loads(journal.read_text(encoding="utf-8"))["renames"] if journal.exists() else []
        except (OSError, ValueError, KeyError, TypeError):
            renames = []  # cut short by a kill before the first rename
        for pair in renames:
            names = [Path(n) for n in pair] if isinstance(pair, list) and len(pair) == 2 else []
            if len(names) != 2 or any(str(n) != n.name for n in names):
                continue
            tmp, final = self.folder / names[0], self.folder / names[1]
            if tmp.is_file() and tmp.name.startswith(_temporary_prefix(final)):
                try:
                    os.replace(tmp, final)
                except OSError as exc:
                    raise write_error(final, exc) from None
        journal.unlink(missing_ok=True)
        for final in (*self.paths.values(), journal):
            remove_stale_temporaries(final)

    def temporary(self, suffix: str) -> Path:
        """The temporary file (in the folder) that becomes ``path(suffix)`` at :meth:`commit`."""
        if self._lock_fd is None:
            raise RuntimeError("enter the OutputSet before writing to it")
        final = self.path(suffix)
        if suffix not in self._temporaries:
            try:
                self._temporaries[suffix] = _temporary(final)
            except OSError as exc:
                raise write_error(final, exc) from None
        return self._temporaries[suffix]

    def write(self, suffix: str, writer: Callable[[Path], object]) -> Path:
        """Call ``writer(temporary path)``; a failed write (disk full...) becomes one-line :class:`PomtError`."""
        tmp = self.temporary(suffix)
        try:
            writer(tmp)
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise write_error(self.path(suffix), exc) from None
        return self.path(suffix)

    def commit(self) -> dict[str, Path]:
        """Rename every file into place, together; returns the final paths."""
        unwritten = [s for s in self.suffixes if s not in self._temporaries]
        if unwritten:
            raise RuntimeError(f"commit before writing {unwritten}")
        replaced: list[tuple[Path, Path | None]] = []
        backups: list[Path] = []
        with _signals_deferred():
            renames = [[tmp.name, self.path(suffix).name] for suffix, tmp in self._temporaries.items()]
            try:  # a journal cut short by a kill is not JSON: no rename had begun, and none is done
                self.journal_file.write_text(json.dumps({"renames": renames}), encoding="utf-8")
            except OSError as exc:
                self.journal_file.unlink(missing_ok=True)
                raise write_error(self.journal_file, exc) from None
            try:
                for suffix, tmp in self._temporaries.items():
                    final = self.path(suffix)
                    backup = None
                    if final.exists():
                        backup = tmp.with_name(tmp.name + ".old")
                        try:
                            os.link(final, backup)
                            backups.append(backup)
                        except OSError:
                            backup = None
                    os.replace(tmp, final)
                    replaced.append((final, backup))
            except OSError as exc:
                for final, backup in reversed(replaced):
                    if backup is not None:
                        os.replace(backup, final)
                    else:
                        final.unlink(missing_ok=True)
                raise write_error(self.path(suffix), exc) from None
            finally:
                for backup in backups:
                    backup.unlink(missing_ok=True)
                self.journal_file.unlink(missing_ok=True)
            self._temporaries.clear()
            self.committed = True
        return self.paths


def write_set(folder: str | Path, stem: str, writers: dict[str, Callable[[Path], object]]) -> dict[str, Path]:
    """Write the files ``stem.SUFFIX`` of ``writers`` (suffix -> writer of a path) as one :class:`OutputSet`."""
    with OutputSet(folder, stem, tuple(writers)) as files:
        for suffix, writer in writers.items():
            files.write(suffix, writer)
        return files.commit()
