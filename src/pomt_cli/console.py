"""Consoles that print text as it is: no rich markup, no emoji codes, no highlighting.

Paths, preset names, tool output and exception messages are user text: ``[/]`` in a path
or ``:100:`` in ``--tokens 250:100:4`` must print as written. Every console of the CLI
comes from :func:`plain_console`; styled text is built with :class:`rich.text.Text`.

A stream that cannot encode a character (an ASCII serial console, a latin-1 locale, a
Windows console) prints a readable ASCII substitute instead: ``±`` as ``+/-``, ``→`` as
``->``, anything else as its escape (``\\xe9``). Consoles put the substitutes in before rich
measures the text, so that tables keep their columns; :func:`substitute_unencodable`
makes standard output and error do it for everything else (help, Typer, rich's own
characters).
"""

from __future__ import annotations

import codecs
import sys
from typing import Any

from rich.console import Console
from rich.text import Text

#: ASCII for the non-ASCII characters that pomt and rich print.
SUBSTITUTES = {
    "\u00b1": "+/-", "\u00d7": "x", "\u2192": "->", "\u2212": "-", "\u2013": "-", "\u2014": "-",
    "\u03b1": "alpha", "\u0394": "d", "\u2026": "...", "\u2264": "<=", "\u2265": ">=", "\u00b5": "u",
    "\u2501": "-", "\u2578": "-", "\u257a": "-", "\u2500": "-",
}

#: The name of the codec error handler that writes :data:`SUBSTITUTES`.
ERRORS = "pomt-substitute"


def _substitute(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    text = error.object[error.start:error.end]
    return "".join(SUBSTITUTES.get(c) or c.encode("ascii", "backslashreplace").decode("ascii") for c in text), error.end


codecs.register_error(ERRORS, _substitute)


def substitute_unencodable() -> None:
    """Make standard output and error print a substitute for what their encoding lacks, not fail."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and hasattr(stream, "reconfigure") and stream.errors in ("strict", None):
            stream.reconfigure(errors=ERRORS)


def encodable(text: str, encoding: str) -> str:
    """``text`` with the characters of :data:`SUBSTITUTES` that ``encoding`` lacks replaced."""
    if text.isascii():
        return text
    try:
        text.encode(encoding)
        return text
    except UnicodeEncodeError:
        return text.encode(encoding, ERRORS).decode(encoding)
    except LookupError:
        return text


class PlainConsole(Console):
    """A rich console whose text arrives encodable in its stream's encoding (see the module's text)."""

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(encodable(text, self.encoding), **kwargs)


def plain_console(*, stderr: bool = False, soft_wrap: bool = False) -> Console:
    """A rich console that never interprets markup or emoji codes in what it prints."""
    return PlainConsole(stderr=stderr, highlight=False, markup=False, emoji=False, soft_wrap=soft_wrap)


def print_path(console: Console, label: str, path: object, after: str = "") -> None:
    """``label path after`` on one line that rich never breaks: a path must copy whole.

    A terminal narrower than the line wraps it on screen, but the text stays one line.
    """
    console.print(f"{label} {path}{after}", soft_wrap=True)
