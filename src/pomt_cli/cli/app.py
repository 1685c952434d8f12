"""The ``pomt`` Typer app and :func:`main`: options -> typed settings -> a pipeline -> rendering.

Each subcommand lives in ``pomt_cli.cli.<name>`` and is registered here. Commands parse
their options into the settings of a :mod:`pomt_cli.pipelines` function, call it and
render its result; the library computes. Every user error reaches :func:`main` as a
:class:`~pomt_cli.errors.PomtError`, a click usage error or an ``OSError`` (a name too
long, a full disk, a folder without permission) and is printed as one line on standard
error, as written (no markup), with exit code 2. SIGTERM ends a command like Ctrl-C
does, through its ``finally`` blocks (a profile saves its points), with one line,
``terminated``, and exit code 143 (Ctrl-C: ``aborted``, 130).
Warnings of the libraries are printed after a command that succeeds, one line each.
A terminal that cannot print a character gets a readable substitute (``+/-`` for ``±``).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Annotated

import typer
from rich.text import Text

from pomt_cli import __version__
from pomt_cli.cli import bench, clocks, compute_r, demo, estimate_accuracy, export, profile, refine
from pomt_cli.console import plain_console, substitute_unencodable
from pomt_cli.devices.signals import Terminated, sigterm_raises
from pomt_cli.errors import PomtError, describe_os_error
from pomt_cli.formats.command import command_line

app = typer.Typer(
    name="pomt",
    help="Prune Vision Transformer tokens where the device's latency curve says it pays.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help: it wraps to the terminal (whole at 80 columns, option names never cut) and
    # shows flags without a value placeholder; rich renders the commands' output.
    rich_markup_mode=None,
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
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, metavar="", help="Print the version and exit.")] = False,
) -> None:
    """Prune Vision Transformer tokens where the device's latency curve says it pays."""


# In help order.
for _command in (profile, clocks, estimate_accuracy, compute_r, refine, bench, demo, export):
    _command.register(app)


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
    substitute_unencodable()
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        _run(args)
    except BrokenPipeError:
        _reader_gone()


def _reader_gone() -> None:
    """Exit with code 1 and no traceback: the reader of the output (``| head``) has closed it.

    Rich's consoles do the same for what they print. Standard output is pointed at the null
    device first, so that flushing it at exit cannot fail again.
    """
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)


def _run(args: list[str]) -> None:
    try:
        # Outside standalone mode Typer returns the exit code of typer.Exit (and 130 for
        # Ctrl-C) instead of exiting; commands return None.
        with warnings.catch_warnings(record=True) as caught, sigterm_raises():
            # The command line travels to the commands as the context's object; the files record it.
            code = app(args=args, standalone_mode=False, prog_name="pomt", obj=command_line(args))
    except PomtError as exc:
        fail(str(exc))
    except BrokenPipeError:
        raise
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
    except Terminated as exc:
        err_console.print("terminated")
        sys.exit(exc.code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    for line in _warning_lines(caught):
        err_console.print(line)
    if code == 130:
        err_console.print("aborted")
    if isinstance(code, int) and code:
        sys.exit(code)
