"""pomt: prune Vision Transformer tokens where the device's latency curve says it pays."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pomt")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.1.0"

__all__ = ["__version__"]
