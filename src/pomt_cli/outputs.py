"""Output files: the one place that names them, and atomic writing.

Every command that writes files takes ``--output-dir`` and asks :func:`output_path` for
the names, so that a profile, an accuracy profile and a report of the same model, batch
size, dtype and device can be found next to each other. Files are written to a temporary
name in the same folder and renamed into place, so an interrupted run never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pomt_cli.errors import PomtError

KINDS = ("latency", "accuracy", "compute_r", "bench", "demo")


def _slug(text: str) -> str:
    """A file-name-safe form of a model, device or method name."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


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


def output_path(output_dir: str | Path, stem: str, suffix: str) -> Path:
    """``output_dir/stem.suffix`` (``suffix`` without the dot; ``plot.png`` adds a second part)."""
    return Path(output_dir) / f"{stem}.{suffix}"


def prepare_output_dir(output_dir: str | Path) -> Path:
    """Create ``output_dir`` if needed and check that files can be written there.

    Raises:
        PomtError: the folder cannot be created or written to.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise PomtError(f"--output-dir {path} is a file, not a folder: give a folder path")
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
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
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
    :func:`prepare_output_dir` creates the folder when the results are ready.

    Raises:
        PomtError: a file is in the way, or the folder (or its nearest existing parent)
            is not writable.
    """
    path = Path(output_dir)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise PomtError(f"--output-dir {path}: {probe} is a file, not a folder: give a folder path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PomtError(f"cannot write to --output-dir {path} ({probe} is not writable): choose a writable folder")
    return path
