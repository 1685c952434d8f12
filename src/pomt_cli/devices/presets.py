"""Device presets: configs/devices/*.toml validated as pydantic models, by name or path."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from pomt_cli.devices.bundled import bundled_dir, preset_names
from pomt_cli.errors import PomtError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib


PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


BUILTIN_VARIABLES = frozenset({"gpu", "state_dir"})


class ClockRead(BaseModel):
    """A command whose output gives values, by the named groups of ``pattern``."""

    model_config = ConfigDict(extra="forbid", strict=True)

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

    model_config = ConfigDict(extra="forbid", strict=True)

    needs_root: bool = True
    requires_path: str | None = Field(
        None, description="a file that exists only where the clocks can be controlled (cpufreq, a Jetson's L4T)"
    )
    requires_message: str | None = Field(
        None, description="what a missing requires_path means, e.g. 'this machine is not a Jetson'"
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
                    for name in PLACEHOLDER.findall(arg):
                        if name not in allowed:
                            raise ValueError(
                                f"clocks.{section}: {{{name}}} in {arg!r} is not one of {sorted(allowed)}"
                            )
        return self

    def uses(self, name: str) -> bool:
        """Whether any command refers to ``{name}``."""
        commands = [r.argv for r in self.read] + self.lock + self.restore + self.status
        return any(name in PLACEHOLDER.findall(arg) for argv in commands for arg in argv)


class DevicePreset(BaseModel):
    """One device: its display name, torch device and clock control."""

    model_config = ConfigDict(extra="forbid", strict=True)

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


def load_preset(name_or_path: str | Path) -> DevicePreset:
    """A bundled preset by name (``orin``, ``h100``...) or a preset from a TOML file.

    Raises:
        PomtError: unknown name (the message lists the known ones), unreadable file,
            invalid TOML or a preset that does not validate.
    """
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".toml") or os.sep in text or path.is_file()):
        path = bundled_dir() / f"{text}.toml"
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
    if path.parent != bundled_dir():
        preset._device_arg = text
    return preset


def default_preset_name() -> str:
    """The preset for "this machine": ``nvidia`` where CUDA is available, else ``cpu``."""
    return "nvidia" if torch.cuda.is_available() else "cpu"
