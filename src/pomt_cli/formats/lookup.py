"""Finding profiles in a folder: the newest latency and accuracy pair for compute-r."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import polars as pl

from pomt_cli.errors import PomtError
from pomt_cli.formats.accuracy import AccuracyMeta
from pomt_cli.formats.common import GEOMETRY_FIELDS, METADATA_KEY, ProfileMeta, read_checked
from pomt_cli.formats.latency import LatencyMeta


#: Candidates of each kind named in a message of :func:`find_profile_pair`.
LISTED_CANDIDATES = 4


#: The metadata record of each profile kind.
META_MODELS: dict[str, type[ProfileMeta]] = {"latency": LatencyMeta, "accuracy": AccuracyMeta}


class ProfileFile(NamedTuple):
    """A profile found in a folder: its path, its metadata, and when it was written."""

    path: Path
    meta: LatencyMeta | AccuracyMeta
    written: tuple[str, float]  # (the metadata's ``created``, the file's mtime): newest sorts last

    @property
    def geometry(self) -> tuple:
        return tuple(getattr(self.meta, f) for f in GEOMETRY_FIELDS)

    @property
    def interrupted(self) -> bool:
        """A latency profile whose run stopped before its end (``complete`` recorded false)."""
        return isinstance(self.meta, LatencyMeta) and self.meta.recorded("complete") is False

    def describe(self) -> str:
        return f"{self.path.name} ({self.meta.model}, N={self.meta.num_tokens})"


def _profile_file(path: Path) -> ProfileFile | None:
    """The metadata of a pomt profile, or None for any other or unreadable file (only the footer is read)."""
    try:
        data = json.loads(pl.read_parquet_metadata(path)[METADATA_KEY])
        meta = META_MODELS[data["kind"]].model_validate(data)
        mtime = path.stat().st_mtime
    except Exception:  # not Parquet, not pomt's, damaged: not a candidate
        return None
    created = meta.created if "created" in meta.model_fields_set else ""  # the default would be now
    return ProfileFile(path, meta, (created, mtime))


def _profiles(folder: str | Path, kind: str) -> list[ProfileFile]:
    """Every profile of one kind in ``folder`` (not its subfolders), interrupted ones too, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [f for path in sorted(folder.glob("*.parquet")) if (f := _profile_file(path)) is not None]
    return sorted((f for f in found if f.meta.kind == kind), key=lambda f: f.written, reverse=True)


def find_profiles(folder: str | Path, kind: str) -> list[ProfileFile]:
    """The profiles of one kind in ``folder`` (not its subfolders), newest first.

    A latency profile that was interrupted (``complete`` false) is left out: ``--resume``
    finishes it first (:func:`interrupted_profiles` lists those).
    """
    return [f for f in _profiles(folder, kind) if not f.interrupted]


def interrupted_profiles(folder: str | Path) -> list[Path]:
    """The latency profiles in ``folder`` whose run was interrupted, newest first."""
    return [f.path for f in _profiles(folder, "latency") if f.interrupted]


def _listing(files: list[ProfileFile]) -> str:
    shown = ", ".join(f.describe() for f in files[:LISTED_CANDIDATES])
    return shown + (f" and {len(files) - LISTED_CANDIDATES} more" if len(files) > LISTED_CANDIDATES else "")


def find_profile_pair(folder: str | Path, latency: str | Path | None = None,
                      accuracy: str | Path | None = None) -> tuple[Path, Path]:
    """The latency and accuracy profiles for compute-r: given ones kept, missing ones found in ``folder``.

    With neither given: the newest latency profile and the newest accuracy profile, which
    must share the model and token geometry (:data:`GEOMETRY_FIELDS`). With one given: the
    newest profile of the other kind with its geometry.

    Raises:
        PomtError: a kind has no profile in ``folder``, none matches, or the newest of the
            two kinds disagree (the message lists the candidates and how to choose).
    """
    folder = Path(folder)
    if latency is not None and accuracy is not None:
        return Path(latency), Path(accuracy)
    wanted = {"latency": "--latency", "accuracy": "--accuracy"}
    commands = {"latency": "pomt profile", "accuracy": "pomt estimate-accuracy"}
    candidates = {kind: find_profiles(folder, kind) for kind in wanted if {"latency": latency,
                                                                           "accuracy": accuracy}[kind] is None}
    for kind, files in candidates.items():
        if not files:
            raise PomtError(f"no {kind} profile in {folder} (--output-dir): run `{commands[kind]}` first, "
                            f"give {wanted[kind]} FILE, or --output-dir the folder that holds it")
    if latency is not None or accuracy is not None:
        given, kind = (latency, "accuracy") if latency is not None else (accuracy, "latency")
        other = {"latency": "accuracy", "accuracy": "latency"}[kind]
        _, meta = read_checked(given, META_MODELS[other])  # a missing or damaged file fails with its own message
        mine = ProfileFile(Path(given), meta, ("", 0.0))
        match = [f for f in candidates[kind] if f.geometry == mine.geometry]
        if not match:
            raise PomtError(f"no {kind} profile in {folder} matches {wanted[other]} {given} "
                            f"({mine.meta.model}, N={mine.meta.num_tokens}); candidates: "
                            f"{_listing(candidates[kind])}: give {wanted[kind]} FILE or run `{commands[kind]}` "
                            "for that model")
        return (Path(given), match[0].path) if kind == "accuracy" else (match[0].path, Path(given))
    newest_latency, newest_accuracy = candidates["latency"][0], candidates["accuracy"][0]
    if newest_latency.geometry == newest_accuracy.geometry:
        return newest_latency.path, newest_accuracy.path
    pairs = {f.geometry for f in candidates["latency"]} & {f.geometry for f in candidates["accuracy"]}
    problem = ("the newest latency and accuracy profiles are of different models or token geometries"
               if pairs else "no latency profile matches an accuracy profile in model and token geometry")
    raise PomtError(f"{problem} in {folder}: latency {_listing(candidates['latency'])}; accuracy "
                    f"{_listing(candidates['accuracy'])}: choose with --latency FILE and/or --accuracy FILE")
