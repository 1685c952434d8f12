"""The subcommands. Each module exposes ``register(app)``; COMMANDS lists them in help order."""

from __future__ import annotations

from collections.abc import Callable

import typer

COMMANDS: list[Callable[[typer.Typer], None]] = []

from pomt_cli.commands import profile  # noqa: E402
COMMANDS.append(profile.register)
from pomt_cli.commands import clocks  # noqa: E402
COMMANDS.append(clocks.register)
from pomt_cli.commands import estimate_accuracy  # noqa: E402
COMMANDS.append(estimate_accuracy.register)
from pomt_cli.commands import compute_r  # noqa: E402
COMMANDS.append(compute_r.register)
from pomt_cli.commands import bench  # noqa: E402
COMMANDS.append(bench.register)
from pomt_cli.commands import demo  # noqa: E402
COMMANDS.append(demo.register)
from pomt_cli.commands import export  # noqa: E402
COMMANDS.append(export.register)
