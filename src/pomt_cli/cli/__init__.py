"""The ``pomt`` command line: the Typer app, shared options and one module per command."""

from pomt_cli.cli.app import app, main

__all__ = ["app", "main"]
