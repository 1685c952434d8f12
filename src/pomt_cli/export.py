"""ONNX export of a patched model, checked against PyTorch with ONNX Runtime before it is kept.

The graph has static shapes (one batch size, one image size): the token counts of every
block are fixed by the method's setting, which is what the latency profile measured. The
file carries, in its ``metadata_props``, the method, its setting, the tokens entering each
block, the opset, the versions and the difference to PyTorch that was measured.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pomt_cli import __version__, versions
from pomt_cli.errors import PomtError
from pomt_cli.formats.outputs import OutputSet
from pomt_cli.measure.timing import is_out_of_memory
from pomt_cli.models import state_dict_sha256
from pomt_cli.pruning import apply, geometry, planned_token_counts, remove
from pomt_cli.pruning.registry import get as get_method

#: Default largest difference between ONNX Runtime and PyTorch, relative to the largest
#: PyTorch output, per dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}

EXTRA_HINT = 'install the onnx extra: pip install -e ".[onnx]" (onnx, onnxruntime, onnxscript)'


def require_onnx() -> None:
    """Raise a one-line error naming the extra when onnx, onnxruntime or onnxscript is missing,
    or naming the torch needed when this one cannot export."""
    versions.require(versions.ONNX_EXPORT)
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise PomtError(f"{', '.join(missing)} not installed: {EXTRA_HINT}")


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError that ``exc`` is or wraps (``__cause__``, ``__context__``), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def export_graph(model: nn.Module, images: torch.Tensor, path: str | Path, *, opset: int, what: str,
                 dynamo: bool = True) -> None:
    """Write ``model`` run on ``images`` as an ONNX graph with static shapes to ``path``.

    ``dynamo`` picks torch's exporter: the dynamo one (``torch.export``), or the
    TorchScript tracer (``dynamo=False``), about ten times faster on a ViT.

    Raises:
        PomtError: the graph does not export; ``what`` names the model and method.
    """
    try:
        # The exporter prints its progress, warns about its internals and logs the tracebacks of
        # the opset conversions it tries (to stderr): keep all of it quiet.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            kwargs = {"external_data": False} if dynamo else {}
            torch.onnx.export(model, (images,), str(path), dynamo=dynamo, opset_version=opset, verbose=False,
                              **kwargs)
    except Exception as exc:  # the exporter fails in many types
        if (os_error := _os_error(exc)) is not None:
            raise os_error from None  # a full disk, not a graph that fails: the caller's write error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PomtError(f"{what} does not export to ONNX opset {opset}: {first[:200]}") from None


def difference(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """The largest absolute difference, and that relative to the largest ``expected`` magnitude."""
    actual, expected = actual.float(), expected.float()
    max_abs = float((actual - expected).abs().max())
    return max_abs, max_abs / max(float(expected.abs().max()), 1e-12)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote and measured."""

    path: Path
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    opset: int
    metadata: dict[str, str]
    export_s: float
    check_s: float


def check_output_file(output: str | Path) -> Path:
    """The output path, refused at once when its folder is missing or not writable, or it is a folder."""
    path = Path(output)
    try:
        folder = path.parent if str(path.parent) else Path(".")
        if path.suffix != ".onnx" and not path.is_dir():
            raise PomtError(f"--output {path}: give a file name ending in .onnx")
        if path.is_dir():
            raise PomtError(f"--output {path} is a folder: give a file name such as {path / 'model.onnx'}")
        if not folder.is_dir():
            raise PomtError(f"--output {path}: the folder {folder} does not exist: create it first")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PomtError(f"--output {path}: the folder {folder} is not writable: choose another")
    except OSError as exc:
        raise PomtError(f"--output {path}: {exc.strerror or exc}") from None
    return path


def export_onnx(
    model: nn.Module,
    output: str | Path,
    *,
    method: str = "none",
    r=0,
    layer: int = 3,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    opset: int = 18,
    tolerance: float | None = None,
    seed: int = 0,
    model_name: str | None = None,
    weights: str | None = None,
) -> ExportResult:
    """Export ``model`` patched with ``method`` to ONNX at ``output`` after checking it with ONNX Runtime.

    The file is written under a temporary name in ``output``'s folder and renamed into
    place only when ONNX Runtime's logits on a random batch lie within ``tolerance`` of
    PyTorch's; otherwise nothing is left behind. ``model`` is left unpatched, on the CPU.
    The file's metadata name the weights: ``weights`` (where they came from: ``pretrained``,
    ``bundled``, ``random`` or the checkpoint's path) and ``weights_sha256``, the SHA-256 of
    the unpatched model's state dict (:func:`pomt_cli.models.state_dict_sha256`).

    Raises:
        PomtError: a missing extra, an opset that onnx or ONNX Runtime does not know, a
            setting the model cannot take, a batch too large for memory, a graph that
            does not export, outputs that differ by more than ``tolerance``, or a
            ``tolerance`` that is negative or infinite.
    """
    require_onnx()
    versions.require_dtype_on("cpu", dtype)
    import onnx
    import onnxruntime as ort

    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise PomtError(f"opset {opset} is newer than onnx {onnx.__version__} knows: give at most {newest}")
    path = check_output_file(output)
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    if not 0 <= tolerance < math.inf:  # an infinite tolerance would keep any graph unchecked
        raise PomtError(f"--tolerance {tolerance:g} is not a finite number >= 0: give e.g. 1e-4 (the float32 "
                        "default), or leave it out")
    g = geometry(model)
    generator = torch.Generator().manual_seed(seed)
    try:
        images = torch.randn(batch_size, *g.input_size, generator=generator).to(dtype)
    except (TypeError, RuntimeError, MemoryError) as exc:  # too large for int64: TypeError
        if not (is_out_of_memory(exc) or "Overflow" in str(exc)):
            raise
        raise PomtError(f"a batch of {batch_size} images of {g.name} does not fit in memory: "
                        "give a smaller batch size") from None
    weights_sha = state_dict_sha256(model)
    try:
        apply(model, method, r=r, layer=layer)
    except ValueError as exc:
        raise PomtError(f"{method}: {exc}") from None
    counts = planned_token_counts(model)
    model = model.eval().to(device="cpu", dtype=dtype)
    measured: dict = {}

    def produce(tmp: Path) -> None:
        """Export to ``tmp``, check it with ONNX Runtime, and add the metadata."""
        with torch.no_grad():
            expected = model(images).float()
        began = time.perf_counter()
        export_graph(model, images, tmp, opset=opset, what=f"{g.name} with {method}")
        measured["export_s"] = time.perf_counter() - began
        began = time.perf_counter()
        try:
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own types (InvalidGraph, NotImplemented, Fail)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            first = re.sub(r"Load model from \S+ failed:", "", first)  # the temporary file's name
            raise PomtError(f"ONNX Runtime {ort.__version__} cannot load the graph of opset {opset} "
                            f"({first[:200]}): give a lower opset; the file was not kept") from None
        feed = {session.get_inputs()[0].name: images.float().numpy() if dtype == torch.bfloat16 else images.numpy()}
        actual = torch.from_numpy(session.run(None, feed)[0]).float()
        measured["check_s"] = time.perf_counter() - began
        max_abs, max_rel = difference(actual, expected)
        if not max_rel <= tolerance:
            raise PomtError(f"ONNX Runtime's outputs differ from PyTorch's by {max_rel:.2e} (relative to the largest "
                            f"logit), above the tolerance {tolerance:g}: the file was not kept")
        metadata = {
            "pomt_version": __version__, "torch_version": torch.__version__, "model": model_name or g.name,
            "method": method, "r": json.dumps(r), "layer": str(layer) if get_method(method).takes_layer else "",
            "tokens_per_block": json.dumps(counts), "batch_size": str(batch_size),
            "dtype": str(dtype).removeprefix("torch."), "input_size": json.dumps(list(g.input_size)),
            "opset": str(opset), "max_abs_diff": f"{max_abs:.3e}", "max_rel_diff": f"{max_rel:.3e}",
            "onnxruntime_version": ort.__version__, "weights": weights or "", "weights_sha256": weights_sha,
        }
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, metadata)
        onnx.save(proto, str(tmp))
        measured.update(max_abs=max_abs, max_rel=max_rel, metadata=metadata)

    try:
        with OutputSet(path.parent, path.stem, ("onnx",)) as files:
            files.write("onnx", produce)
            files.commit()
    finally:
        remove(model)
    return ExportResult(path=path, max_abs_diff=measured["max_abs"], max_rel_diff=measured["max_rel"],
                        tolerance=tolerance, opset=opset, metadata=measured["metadata"],
                        export_s=measured["export_s"], check_s=measured["check_s"])
