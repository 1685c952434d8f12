"""The one exception type that reaches the user as a one-line message with exit code 2.

:func:`describe_os_error` makes that line for an ``OSError`` (a full disk, a name too long).
"""

from __future__ import annotations

import os


class PomtError(Exception):
    """A problem with the user's input or environment.

    The message is one line that says what is wrong and what to do; the CLI prints it
    without a traceback and exits with code 2. Library code raises it for bad input that
    a user (not a programmer) can cause: a missing file, an infeasible budget, a grid that
    does not fit the model.
    """


class PruningError(PomtError, ValueError):
    """A model or setting that :func:`pomt_cli.pruning.apply` refuses, before it changes the model.

    Also a ``ValueError``, as these errors were before this class existed.
    """


def describe_os_error(exc: OSError, what: str = "") -> str:
    """One line naming the path and the cause: ``cannot write runs/x.parquet: No space left on device``."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None:
        target = os.fsdecode(exc.filename)
        if exc.filename2 is not None:
            target += f" -> {os.fsdecode(exc.filename2)}"
        return f"{what or 'cannot use'} {target}: {cause}"
    return f"{what}: {cause}" if what else cause
