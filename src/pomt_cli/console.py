"""Consoles that print text as it is: no rich markup, no emoji codes, no highlighting.

Paths, preset names, tool output and exception messages are user text: ``[/]`` in a path
or ``:100:`` in ``--tokens 250:100:4`` must print as written. Every console of the CLI
comes from :func:`plain_console`; styled text is built with :class:`rich.text.Text`.
"""

from __future__ import annotations

from rich.console import Console


def plain_console(*, stderr: bool = False, soft_wrap: bool = False) -> Console:
    """A rich console that never interprets markup or emoji codes in what it prints."""
    return Console(stderr=stderr, highlight=False, markup=False, emoji=False, soft_wrap=soft_wrap)


def print_path(console: Console, label: str, path: object, after: str = "") -> None:
    """``label path after`` on one line that rich never breaks: a path must copy whole.

    A terminal narrower than the line wraps it on screen, but the text stays one line.
    """
    console.print(f"{label} {path}{after}", soft_wrap=True)
