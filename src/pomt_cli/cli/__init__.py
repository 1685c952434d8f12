"""The ``pomt`` command line: the Typer app, shared options and one module per command."""

import warnings

# Older timm releases (1.0.3 and 1.0.9 among them) call torch.jit.interface when imported, and
# recent torch answers with a FutureWarning on every run: noise about two libraries'
# internals, not about the command. Set here, before the app imports timm; the library
# (pomt_cli.pruning...) leaves its users' warning filters alone.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)

from pomt_cli.cli.app import app, main  # noqa: E402

__all__ = ["app", "main"]
