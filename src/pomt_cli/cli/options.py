"""Options shared by the commands, each defined once (name, default, help, range), and the parsers of their text.

Every name they need comes from a module of the standard library, typer and rich alone
(:mod:`pomt_cli.names`, :mod:`pomt_cli.defaults`, :mod:`pomt_cli.options`...), so that
``--help``, completion and a refused option answer without importing torch.
"""

from __future__ import annotations

import math
import unicodedata
from enum import Enum
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from pomt_cli.defaults import MODEL_HELP
from pomt_cli.devices.bundled import preset_names
from pomt_cli.errors import PomtError
from pomt_cli.names import ESTIMATORS, METHODS, PROVIDER_ALIASES, WORKLOADS, Runtime
from pomt_cli.options import SEED_MAX, Dtype, TokenRange

T = TypeVar("T")

#: The built-in token-reduction methods (``--help`` lists them; another value fails at parse time).
Method = Enum("Method", {name: name for name in METHODS}, type=str)
#: The accuracy estimators: ``random`` and every reducing method.
Estimator = Enum("Estimator", {name: name for name in ESTIMATORS}, type=str)
#: What ``pomt profile`` times: the all-blocks proxy or the POMT-patched model.
Workload = Enum("Workload", {name: name for name in WORKLOADS}, type=str)


def presets_text() -> str:
    """The bundled presets, as a help text lists them."""
    return ", ".join(preset_names())


#: The largest value a list option takes: torch sizes and indices are 64-bit, and no batch
#: or block comes near 2**31.
INT_LIST_MAX = 2**31 - 1


def parse_int_list(text: str, option: str, minimum: int = 1) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]``; every value at least ``minimum`` and at most
    :data:`INT_LIST_MAX`, none repeated.

    Raises:
        PomtError: a value that is no integer, out of range, or repeated.
    """
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise PomtError(f"{option} {text!r}: {part!r} is not an integer; give e.g. 1,4,16") from None
        if value < minimum:
            raise PomtError(f"{option} {text!r}: {value} is below {minimum}; give values >= {minimum}")
        if value > INT_LIST_MAX:
            raise PomtError(f"{option} {text!r}: {value} is above {INT_LIST_MAX}; give smaller values")
        values.append(value)
    if len(set(values)) != len(values):
        raise PomtError(f"{option} {text!r} repeats a value; give each value once")
    return values


def parse_layers(text: str | None) -> list[int] | None:
    """``--layer 1,3`` -> ``[1, 3]`` (the model's range is checked once the model is built)."""
    return None if text is None else parse_int_list(text, "--layer", minimum=-(2**31))


def parse_tokens(text: TokenRange | str) -> TokenRange:
    """``START:STOP:STRIDE`` -> :class:`TokenRange` (the model's bounds are checked once it is built)."""
    if isinstance(text, TokenRange):
        return text
    parts = text.split(":")
    if len(parts) != 3:
        raise typer.BadParameter(f"{text!r} is not START:STOP:STRIDE; give e.g. 197:17:20")
    try:
        start, stop, stride = (int(p) for p in parts)
    except ValueError:
        raise typer.BadParameter(f"{text!r} must hold three integers START:STOP:STRIDE") from None
    if stride <= 0:
        raise typer.BadParameter(f"{text!r}: STRIDE must be positive, got {stride}")
    return TokenRange(start=start, stop=stop, stride=stride)


def parse_providers(text: str | None) -> list[str] | None:
    """``--ort-providers cuda,cpu`` -> ``["cuda", "cpu"]`` (checked against those available by the pipeline)."""
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise PomtError(f"--ort-providers {text!r} names no provider: give e.g. cpu or cuda,cpu")
    return names


def parse_runtimes(values: list[str] | None) -> list[Runtime]:
    """``--runtime eager,onnxruntime --runtime compile`` -> the runtimes in order, each once.

    Raises:
        typer.BadParameter: a name that is no runtime, or one named twice.
    """
    names = [part.strip() for value in values or [] for part in value.split(",")]
    known = [r.value for r in Runtime]
    runtimes: list[Runtime] = []
    for name in names:
        if name not in known:
            raise typer.BadParameter(f"{name!r} is not one of {', '.join(known)}; give e.g. eager,onnxruntime")
        if Runtime(name) in runtimes:
            raise typer.BadParameter(f"{name} is named twice; give each runtime once")
        runtimes.append(Runtime(name))
    return runtimes


def seconds(value: float) -> float:
    """The callback of a ``--budget`` in seconds: positive and finite."""
    if not value > 0:
        raise typer.BadParameter(f"{value:g} must be positive")
    if not math.isfinite(value):
        raise typer.BadParameter(f"{value:g} is not a finite number of seconds; give e.g. 1")
    return value


def user_path(value: Path | None) -> Path | None:
    """The callback of a path option: a leading ``~`` the shell left alone (the path was quoted,
    or came from a variable or a script) is the home folder, as the shell would have made it,
    never a folder named ``~``.
    """
    if value is None or not str(value).startswith("~"):
        return value
    try:
        return value.expanduser()
    except RuntimeError:
        raise typer.BadParameter(f"{value}: the home folder is unknown ($HOME is not set); give the full path") from None


def output_path(value: Path | None) -> Path | None:
    """The callback of an output path: :func:`user_path`, refused where it holds a control character
    (a newline or a tab would break the one line that names each file written)."""
    path = user_path(value)
    if path is not None and any(unicodedata.category(c) == "Cc" for c in str(path)):
        raise typer.BadParameter(f"{str(path)!r} holds a control character (a newline, a tab...): give a name "
                                 "without one")
    return path


def preset_path(value: str | None) -> str | None:
    """The callback of ``--device``: a preset's name as given, a path with its ``~`` expanded."""
    path = user_path(None if value is None else Path(value))
    return None if path is None else str(path)


def _fraction(value: float) -> float:
    if not 0 < value < 1:
        raise typer.BadParameter(f"{value:g} must lie between 0 and 1, e.g. 0.01 for 1%")
    return value


ModelOption = Annotated[str, typer.Option("--model", show_default=False, help=MODEL_HELP)]
DeviceOption = Annotated[str | None, typer.Option(
    "--device", callback=preset_path, help=f"Device preset ({presets_text()}) or a preset .toml file (default: nvidia with CUDA, else cpu).")]
TorchDeviceOption = Annotated[str | None, typer.Option(
    "--torch-device", help="Override the preset's torch device (cpu, cuda, cuda:1, mps).")]
DtypeOption = Annotated[Dtype, typer.Option("--dtype", help="The dtype the model runs in.")]
BatchSizesOption = Annotated[str, typer.Option("--batch-size", help="Batch sizes, comma-separated: 1,4,16,64.")]
TokensOption = Annotated[TokenRange | None, typer.Option(
    "--tokens", parser=parse_tokens, metavar="START:STOP:STRIDE",
    help="Grid of kept tokens n, both ends inclusive (default: every n the model and method reach).")]
PretrainedOption = Annotated[bool, typer.Option("--pretrained", help="Load timm's pretrained weights.")]
CheckpointOption = Annotated[Path | None, typer.Option("--checkpoint", callback=user_path, help="Weights from a .safetensors or .pth file.")]
AllowRandomOption = Annotated[bool, typer.Option(
    "--allow-random-weights", help="Measure accuracy with random weights anyway (it means nothing).")]
ImgSizeOption = Annotated[int | None, typer.Option(
    "--img-size", help="Input size in pixels, a multiple of the patch size (default: the model's; e.g. 224 for "
    "DINOv2, whose timm default is 518).")]
LimitOption = Annotated[int | None, typer.Option(
    "--limit", help="A deterministic class-balanced subset of this many images.")]


class ClassOrderChoice(str, Enum):
    name = "name"
    natural = "natural"


ClassOrderOption = Annotated[ClassOrderChoice | None, typer.Option(
    "--class-order", help="How class folders are numbered: name (sorted as strings, torchvision's ImageFolder) or "
    "natural (c2 before c10, timm's train.py). Needed only where the two differ.")]
CudaGraphsOption = Annotated[bool, typer.Option(
    "--cuda-graphs", help="Capture the forward pass in a CUDA graph and time replays (no launch overhead).")]
RelPrecisionOption = Annotated[float, typer.Option(
    "--rel-precision", callback=_fraction,
    help="Stop timing once the 95% CI of the median is within this fraction.")]
ProfileBudgetOption = Annotated[float, typer.Option(
    "--budget", callback=seconds,
    help="Seconds of timing per grid point, warm-up included (the timed calls get half of it at least).")]
BenchBudgetOption = Annotated[float, typer.Option(
    "--budget", callback=seconds,
    help="Seconds of timing per method and round, warm-up included (the timed calls get half of it at least).")]


def seed_option(help: str) -> object:
    """``--seed`` (0 to :data:`SEED_MAX`) with what it seeds in this command."""
    return Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help=help)]


SeedOption = seed_option("Seeds the inputs and every random order.")
ThreadsOption = Annotated[int | None, typer.Option(
    "--threads", min=1, help="CPU threads for torch (default: torch's choice).")]
LockClocksOption = Annotated[bool, typer.Option(
    "--lock-clocks/--no-lock-clocks", help="Lock the device's clocks while timing (restored after).")]
OutputDirOption = Annotated[Path, typer.Option("--output-dir", callback=output_path, help="Folder for the files written.")]
RuntimeOption = Annotated[Runtime, typer.Option(
    "--runtime", help="What runs the timed forward passes: eager PyTorch, torch.compile (fullgraph, warmed up per "
    "shape) or ONNX Runtime (one exported graph per shape, cached; needs the onnx extra).")]
RuntimesOption = Annotated[list[str], typer.Option(
    "--runtime", metavar="R[,R...]", callback=parse_runtimes,
    help="What runs the timed forward passes: eager PyTorch, compile (torch.compile, fullgraph, warmed up per "
    "shape) or onnxruntime (one exported graph per shape, cached; needs the onnx extra). Several, comma-separated "
    "or repeated, are timed side by side in the same rounds (default: eager).")]
OrtProvidersOption = Annotated[str | None, typer.Option(
    "--ort-providers", metavar="P[,P...]",
    help=f"For --runtime onnxruntime: execution providers in order ({', '.join(PROVIDER_ALIASES)} or full names; "
    "default: those available for the device).")]
CompileBackendOption = Annotated[str, typer.Option(
    "--compile-backend", help="For --runtime compile: torch.compile's backend (inductor, or eager to check that "
    "the model compiles as one graph without generating code).")]


def given(ctx: typer.Context, name: str, value: T) -> T | None:
    """``value`` where the user gave the option ``name``, else None (its default is then the library's)."""
    source = ctx.get_parameter_source(name)  # by name: typer may bring its own copy of click's enum
    return None if source is None or source.name == "DEFAULT" else value
