"""The ``pomt`` command line: options -> validated config -> library call -> rendering.

Each subcommand lives in ``pomt_cli.commands.<name>`` and is registered here. Commands
parse and render; the library computes. Every user error reaches :func:`main` as a
:class:`~pomt_cli.errors.PomtError`, a click usage error or an ``OSError`` (a name too
long, a full disk, a folder without permission) and is printed as one line on standard
error, as written (no markup), with exit code 2. SIGTERM ends a command like Ctrl-C
does, through its ``finally`` blocks (a profile saves its points), with exit code 143.
Warnings of the libraries are printed after a command that succeeds, one line each.
"""

from __future__ import annotations

import sys
import warnings

import typer
from rich.text import Text

from pomt_cli import __version__
from pomt_cli.console import plain_console
from pomt_cli.devices.signals import sigterm_raises
from pomt_cli.errors import PomtError
from pomt_cli.formats.outputs import describe_os_error
from pomt_cli.formats.common import set_command_line

app = typer.Typer(
    name="pomt",
    help="Prune Vision Transformer tokens where the device's latency curve says it pays.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Typer may vendor click (typer._click) or use click itself: take the exception types from
# wherever its BadParameter lives.
_click_errors = sys.modules[typer.BadParameter.__module__]
_UsageError = _click_errors.UsageError
_ClickException = _click_errors.ClickException
_NoArgsIsHelp = getattr(_click_errors, "NoArgsIsHelpError", ())

err_console = plain_console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pomt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    # An empty metavar: a flag takes no value, so its help shows no type.
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, metavar="", help="Print the version and exit."
    ),
) -> None:
    """Prune Vision Transformer tokens where the device's latency curve says it pays."""


def _register() -> None:
    from pomt_cli.commands import COMMANDS

    for register in COMMANDS:
        register(app)


_register()


def fail(message: str) -> None:
    """Print ``error: message`` as one line on standard error and exit with code 2."""
    line = " ".join(str(message).split("\n"))
    err_console.print(Text.assemble(("error:", "bold red"), " ", line))
    sys.exit(2)


def _warning_lines(caught: list[warnings.WarningMessage]) -> list[str]:
    lines = []
    for w in caught:
        text = " ".join(str(w.message).split())[:300]
        line = f"warning: {text} ({w.category.__name__})"
        if line not in lines:
            lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``pomt`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    set_command_line(args)
    try:
        # Outside standalone mode Typer returns the exit code of typer.Exit (and 130 for
        # Ctrl-C) instead of exiting; commands themselves return None.
        with warnings.catch_warnings(record=True) as caught, sigterm_raises():
            code = app(args=args, standalone_mode=False, prog_name="pomt")
    except PomtError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(describe_os_error(exc))
    except _NoArgsIsHelp as exc:
        typer.echo(exc.ctx.get_help() if exc.ctx else "")
        sys.exit(0)
    except _UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "pomt"
        fail(f"{exc.format_message()} (see `{command} --help`)")
    except _ClickException as exc:
        fail(exc.format_message())
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    for line in _warning_lines(caught):
        err_console.print(line)
    if code == 130:
        err_console.print("aborted")
    if isinstance(code, int) and code:
        sys.exit(code)
