"""argparse for the scripts around the product (``scripts/``): bad input is one line, exit code 2.

argparse's own refusal is a usage block and a second line; ``OneLineParser`` prints one
``error: ...`` line instead, as ``pomt`` does, and ``number`` checks a value's range while
it is parsed, before a script reads or writes anything.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn


def refuse(message: str) -> NoReturn:
    """Bad input: one line on standard error, exit code 2."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line that points at ``--help``."""

    def error(self, message: str) -> NoReturn:
        refuse(f"{message}; see {self.prog} --help")


def number(kind: type[int] | type[float], *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None) -> Callable[[str], int | float]:
    """An argparse ``type=``: a finite ``kind`` within ``minimum``..``maximum`` (or ``> above``)."""
    wanted = "a whole number" if kind is int else "a number"
    limits = [f">= {minimum:g}" if minimum is not None else "", f"> {above:g}" if above is not None else "",
              f"<= {maximum:g}" if maximum is not None else ""]
    need = f"{wanted} {' and '.join(x for x in limits if x)}".strip()

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}: give {need}") from None
        if (not math.isfinite(value) or (minimum is not None and value < minimum)
                or (maximum is not None and value > maximum) or (above is not None and value <= above)):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {need}")
        return value

    parse.__name__ = kind.__name__
    return parse
