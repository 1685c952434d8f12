"""Which optional features the installed torch can run: one bound per feature.

pomt runs on torch 2.1 (a JetPack 6 Jetson's) and newer, but some features need more.
Each bound is the lowest torch where the feature was not seen to fail: it failed on
torch 2.1.2 and worked on 2.14.1, and no version between was tried, so a bound says
"newer than 2.1", unless torch's documentation names the version that brought what the
feature uses (ONNX export: 2.5). The features check here, before any work, and refuse in
one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pomt_cli.errors import PomtError

#: The newest torch these bounds were tested with (the development set of README's "Versions").
TESTED = "2.14"


@dataclass(frozen=True)
class Feature:
    """An optional feature that needs a torch newer than ``failed_on`` (where it was seen to fail)."""

    what: str
    failed_on: str
    instead: str
    documented: str | None = None
    """The lowest torch that torch's documentation names for what the feature uses, if any."""

    @property
    def minimum(self) -> tuple[int, int]:
        """The documented release, else the lowest not known to fail: the one after ``failed_on``."""
        if self.documented is not None:
            return release(self.documented)
        major, minor = release(self.failed_on)
        return major, minor + 1

    @property
    def needs(self) -> str:
        """The bound as a user reads it: ``torch 2.5 or newer``, ``torch newer than 2.1``."""
        return f"torch {self.documented} or newer" if self.documented else f"torch newer than {self.failed_on}"


#: ``torch.onnx.export(dynamo=...)``: missing on torch 2.1; PyTorch's ONNX tutorial
#: ("Introduction to ONNX") requires 2.5.0 or newer for it.
ONNX_EXPORT = Feature("ONNX export", "2.1", "upgrade torch, or time with --runtime eager", documented="2.5")
#: ``torch._dynamo.config.recompile_limit``, and dynamo taking the pruned block's
#: ``Module.__setattr__``: both missing on torch 2.1.
COMPILE = Feature("--runtime compile", "2.1", "use --runtime eager, or upgrade torch")
#: Half ``slow_conv2d`` and ``baddbmm`` on the CPU: missing on torch 2.1 (bfloat16 has them).
CPU_FLOAT16 = Feature("--dtype float16 on the CPU", "2.1", "use --dtype bfloat16 or float32, or upgrade torch")


def release(version: str) -> tuple[int, int]:
    """The major and minor release of a torch version: ``2.3.0a0+40ec155e58.nv24.03`` (a
    Jetson's pre-release build of 2.3) gives (2, 3)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise ValueError(f"not a torch version: {version!r}")
    return int(found[1]), int(found[2])


def supported(feature: Feature) -> bool:
    """Whether the installed torch reaches ``feature``'s :attr:`~Feature.minimum`."""
    return release(torch.__version__) >= feature.minimum


def require(feature: Feature) -> None:
    """Refuse ``feature`` in one line where the installed torch is too old for it.

    Raises:
        PomtError: ``feature`` needs a newer torch than this one.
    """
    if not supported(feature):
        raise PomtError(f"{feature.what} needs {feature.needs} (this is {torch.__version__}; "
                        f"tested with {TESTED}): {feature.instead}")


def require_dtype_on(device: torch.device | str, dtype: torch.dtype) -> None:
    """Refuse float16 on the CPU where torch has no half convolution there.

    Raises:
        PomtError: float16 on the CPU with a torch too old for it.
    """
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        require(CPU_FLOAT16)
