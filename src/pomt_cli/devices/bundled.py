"""The device presets that come with pomt (``configs/devices/*.toml``): their folder and names.

Standard library only, so that ``--help`` lists the presets without importing torch or
pydantic; :mod:`pomt_cli.devices.presets` reads and validates them.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def bundled_dir() -> Path:
    """The folder of the bundled presets."""
    return Path(str(importlib.resources.files("pomt_cli") / "configs" / "devices"))


def preset_names() -> list[str]:
    """Names of the bundled presets, sorted."""
    return sorted(p.stem for p in bundled_dir().glob("*.toml"))
