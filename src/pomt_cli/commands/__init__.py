"""The subcommands. Each module exposes ``register(app)``; COMMANDS lists them in help order."""

from __future__ import annotations

from collections.abc import Callable

import typer

COMMANDS: list[Callable[[typer.Typer], None]] = []
