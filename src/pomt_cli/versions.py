"""Which optional features the installed torch can run: one bound per feature.

pomt runs on torch 2.1 (a JetPack 6 Jetson's) and newer, but some features need more.
The bounds are measured: each feature was run, its gate bypassed, on the tests' tiny
models with torch 2.1.2, 2.2.2, 2.3.1, 2.4.1, 2.5.1, 2.6.0, 2.7.1 and 2.14.1 (README's
"Versions"). A feature that failed on one release and worked on the next needs that next
one; one that failed on a release and was not tried between it and 2.14 would need a
torch newer than it. Where torch's documentation names a later release than the one measured (ONNX
export: 2.5), that one is the bound. The features check here, before any work, and
refuse in one line.
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
    """An optional feature: it failed on torch ``failed_on`` (the newest release seen to fail)."""

    what: str
    failed_on: str
    instead: str
    worked_on: str | None = None
    """The release after ``failed_on``, where it was seen to work; None where none was tried."""
    documented: str | None = None
    """The lowest torch that torch's documentation names for what the feature uses, if any."""

    @property
    def minimum(self) -> tuple[int, int]:
        """The documented release, else the release seen to work after ``failed_on``, else
        the lowest not known to fail: the one after ``failed_on``."""
        if self.documented is not None:
            return release(self.documented)
        if self.worked_on is not None:
            return release(self.worked_on)
        major, minor = release(self.failed_on)
        return major, minor + 1

    @property
    def needs(self) -> str:
        """The bound as a user reads it: ``torch 2.5 or newer``, ``torch newer than 2.5``."""
        bound = self.documented or self.worked_on
        return f"torch {bound} or newer" if bound else f"torch newer than {self.failed_on}"


#: ``torch.onnx.export(dynamo=..., external_data=...)``: torch 2.1 to 2.3 lack ``dynamo``,
#: 2.4 lacks ``external_data`` (measured); PyTorch's ONNX tutorial ("Introduction to ONNX")
#: requires 2.5.0 or newer. On 2.5.1 pomt's export and ``--runtime onnxruntime`` match eager.
ONNX_EXPORT = Feature("ONNX export", "2.4", "upgrade torch, or time with --runtime eager", worked_on="2.5",
                      documented="2.5")
#: Dynamo stops at the pruned block's ``Module.__setattr__`` (``pomt_tokens``) on torch
#: 2.1 to 2.4 (and 2.1 lacks ``recompile_limit`` under any name); on 2.5.1 and 2.6.0
#: inductor's CPU ``scatter_add`` adds wrong values, so ToMe's logits land 14% away from
#: eager (the CUDA one was not tried). On 2.7.1 every method compiles in float32 with
#: inductor and with the eager backend, its logits within 1e-6 of eager PyTorch's.
COMPILE = Feature("--runtime compile", "2.6", "use --runtime eager, or upgrade torch", worked_on="2.7")
#: Half ``LayerNorm`` (2.2), half ``slow_conv2d`` and ``baddbmm`` (2.1) are missing on
#: the CPU; torch 2.3.1 runs every method in half (bfloat16 runs on all).
CPU_FLOAT16 = Feature("--dtype float16 on the CPU", "2.2", "use --dtype bfloat16 or float32, or upgrade torch",
                      worked_on="2.3")


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
