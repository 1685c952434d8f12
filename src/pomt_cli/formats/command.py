"""The command line as pomt's files record it: ``pomt ARGS``, quoted as a shell reads it.

Standard library only: the command line computes it before any command imports the library.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence


def command_line(args: Sequence[str] | None = None) -> str:
    """``pomt ARGS`` as a shell would read it (default: this process's arguments)."""
    return shlex.join(["pomt", *(sys.argv[1:] if args is None else args)])
