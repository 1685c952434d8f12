"""Runtimes: one workload as a no-argument call in eager PyTorch, torch.compile or ONNX Runtime.

The latency steps that POMT exploits belong to the kernels of the runtime that runs the
model, so the same timing engine (:func:`pomt_cli.measure.timing.measure`) times a workload in
each runtime. :func:`prepare` turns a workload (an ``nn.Module`` on the device: a patched
model, or :class:`KeptTokens` for the proxy) and its input into a :class:`Prepared`
whose ``fn()`` is one forward pass:

- ``eager``: the module's forward under ``torch.inference_mode``, the module as it is
  when called.
- ``compile``: ``torch.compile(copy, fullgraph=True, dynamic=False)`` of a copy of the
  module (later patches of the module do not touch it), warmed up on this input before
  it is returned; the warm-up's seconds are ``Prepared.setup_s``.
- ``onnxruntime``: the module exported with static shapes to an ONNX file in a cache
  folder (keyed by :func:`cache_key`), checked once against PyTorch on a random batch
  when it is exported (the tolerance of ``pomt export``), and reused while the key
  matches. The input and output are bound once to the session (I/O binding, on the CPU
  and on CUDA), so that ``fn()`` is ``run_with_iobinding`` alone: no copy or conversion
  is timed.

How profile and bench call it (the wiring step follows this). Both check the choice
first with ``check_runtime(runtime, device=..., options=...)`` (a missing extra, CUDA
graphs with compile or onnxruntime, an unavailable provider and an unsupported dtype
are one-line PomtErrors before anything runs or is written) and record
``runtime_info(runtime, options, device=...)`` in their metadata. Profile, per grid
point: the workload is ``KeptTokens(model, keep)`` for the proxy or the model patched
with ``pomt`` for the pomt workload; ``prepared = prepare(workload, images, runtime,
label=f"proxy n={n}" or task.label, weights=digest, options=options)`` with ``digest =
weights_digest(model)`` computed once per run, then ``measure(prepared.fn, ...)`` as
today, with ``warmup`` unchanged (compile was warmed by prepare); ``prepared.cached``
and ``prepared.setup_s`` feed the progress line. Bench: one ``prepare`` per (batch
size, setting) after ``s.apply_to(model)``, kept across rounds (compile and onnxruntime
do not depend on later patches; eager needs the setting applied before each measure, as
today). ``cuda_graphs`` stays an eager-only timing mode.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pomt_cli import versions
from pomt_cli.errors import PomtError
from pomt_cli.export import TOLERANCE, difference, export_graph, require_onnx
from pomt_cli.models import state_dict_sha256
from pomt_cli.names import PROVIDER_ALIASES, Runtime
from pomt_cli.formats.outputs import OutputSet
from pomt_cli.pruning.geometry import forward_kept, model_name


#: Providers that run on a CUDA device (their input and output live in its memory).
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

#: Providers that do not run a model on this machine's hardware: never picked by default.
REMOTE_PROVIDERS = ("AzureExecutionProvider",)

#: How an exported graph is written: the TorchScript tracer first (about 0.1 s for
#: digits-vit against 1.7 s for the dynamo exporter), the dynamo exporter if tracing fails.
EXPORTERS = ("torchscript", "dynamo")

#: The most graphs torch.compile keeps per forward while prepare warms one up (one per
#: grid point and setting; torch's default of 8 would fall back to eager beyond it).
RECOMPILE_LIMIT = 4096

#: Seeds the random batch an exported graph is checked on.
CHECK_SEED = 12_345


def recompile_limits(limit: int = RECOMPILE_LIMIT) -> dict[str, int]:
    """torch.compile's limits on the graphs kept per forward, by this torch's names for them:
    ``recompile_limit`` and ``accumulated_recompile_limit``, ``cache_size_limit`` and
    ``accumulated_cache_size_limit`` before (torch 2.2 to 2.5 have only those)."""
    if hasattr(torch._dynamo.config, "recompile_limit"):
        return {"recompile_limit": limit, "accumulated_recompile_limit": limit}
    return {"cache_size_limit": limit, "accumulated_cache_size_limit": limit}


def default_cache_dir() -> Path:
    """``$POMT_CACHE_DIR/onnx``, else ``$XDG_CACHE_HOME/pomt/onnx``, else ``~/.cache/pomt/onnx``."""
    if os.environ.get("POMT_CACHE_DIR"):
        return Path(os.environ["POMT_CACHE_DIR"]) / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pomt" / "onnx"


@dataclass(frozen=True)
class RuntimeOptions:
    """How a runtime is set up; the defaults are the CLI's.

    Attributes:
        providers: ONNX Runtime's execution providers in order of preference
            (``--ort-providers``, full names or ``cpu``/``cuda``/``tensorrt``); None: the
            available ones that run on the device, GPU first (:func:`resolve_providers`).
        cache_dir: the folder of exported graphs (None: :func:`default_cache_dir`).
        opset: the ONNX opset of exported graphs.
        tolerance: the largest ONNX Runtime or torch.compile vs eager PyTorch difference,
            relative to the largest logit (None: :data:`pomt_cli.export.TOLERANCE` of the dtype).
        compile_backend: torch.compile's backend.
        compile_warmup: calls that warm a compiled workload up before it is timed.
        cuda_graphs: whether the timing engine captures CUDA graphs (eager only).
    """

    providers: tuple[str, ...] | None = None
    cache_dir: Path | None = None
    opset: int = 18
    tolerance: float | None = None
    compile_backend: str = "inductor"
    compile_warmup: int = 2
    cuda_graphs: bool = False

    @property
    def folder(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()


@dataclass
class Prepared:
    """A workload ready to time: ``fn()`` is one forward pass and returns the logits.

    With onnxruntime the logits are one bound tensor, overwritten by each call.

    Attributes:
        fn: the call to hand to :func:`pomt_cli.measure.timing.measure`.
        runtime: what runs it.
        setup_s: seconds spent making it ready (compile: the warm-up; onnxruntime:
            export, check and session), not part of any timing.
        providers: onnxruntime: the session's providers, in order; else empty.
        path: onnxruntime: the graph's file; else None.
        cached: onnxruntime: the graph came from the cache (no export, no check).
        max_rel_diff: the checked difference to eager PyTorch: compile's, and onnxruntime's
            when exported now.
    """

    fn: Callable[[], torch.Tensor]
    runtime: Runtime
    setup_s: float = 0.0
    providers: tuple[str, ...] = ()
    path: Path | None = None
    cached: bool = False
    max_rel_diff: float | None = None
    _keep: list[Any] = field(default_factory=list, repr=False)


class KeptTokens(nn.Module):
    """The proxy workload as a module: ``model`` with only the prefix and the ``keep`` patch tokens.

    ``keep`` is a buffer, so the module exports and compiles as one static graph (see
    :func:`pomt_cli.pruning.forward_kept`).
    """

    def __init__(self, model: nn.Module, keep: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("keep", keep, persistent=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return forward_kept(self.model, images, self.keep)


#: Graphs exported by this process (tests read it to see that a cached graph was reused).
exports_done = 0


def _onnxruntime():
    """The onnxruntime module, or a one-line PomtError naming the extra."""
    require_onnx()
    import onnxruntime

    return onnxruntime


def available_providers() -> list[str]:
    """ONNX Runtime's providers on this machine (the onnx extra must be installed)."""
    return list(_onnxruntime().get_available_providers())


def resolve_providers(requested: Sequence[str] | None, device: torch.device | str) -> tuple[str, ...]:
    """The providers a session on ``device`` uses: ``requested`` checked, or the default.

    The default is every available provider that runs on the device, GPU first: on a
    CUDA device TensorRT, CUDA, then the CPU as a fallback for the ops they lack; on any
    other device the CPU only (the input lives in host memory).

    Raises:
        PomtError: a provider not available here (the message lists those that are), a
            GPU provider without a CUDA device, or a CUDA device with no GPU provider (a
            CPU-only onnxruntime).
    """
    device = torch.device(device)
    available = available_providers()
    if requested is None:
        usable = [p for p in available if p not in REMOTE_PROVIDERS]
        if device.type != "cuda":
            return ("CPUExecutionProvider",)
        if not any(p in GPU_PROVIDERS for p in usable):
            # The input and output live in GPU memory: a CPU session cannot bind them, and
            # timing the CPU would not measure the GPU the user asked for.
            raise PomtError(f"--runtime onnxruntime on {device}: this onnxruntime has no GPU provider (available: "
                            f"{', '.join(available)}); install onnxruntime-gpu, or use --device cpu")
        return tuple(sorted(usable, key=lambda p: GPU_PROVIDERS.index(p) if p in GPU_PROVIDERS else len(GPU_PROVIDERS)))
    names = [PROVIDER_ALIASES.get(p.lower(), p) for p in requested]
    if not names:
        raise PomtError(f"--ort-providers is empty: name one or more of {', '.join(available)}")
    for name in names:
        if name not in available:
            raise PomtError(f"--ort-providers {name} is not available here (available: {', '.join(available)}); "
                            "for CUDA or TensorRT install onnxruntime-gpu")
        if name in GPU_PROVIDERS and device.type != "cuda":
            raise PomtError(f"--ort-providers {name} runs on a GPU but the torch device is {device}: "
                            "use --device cuda, or --ort-providers cpu")
    if device.type == "cuda" and not any(n in GPU_PROVIDERS for n in names):
        raise PomtError(f"--ort-providers {','.join(names)} run on the CPU but the torch device is {device}: "
                        "add cuda, or use --device cpu")
    return tuple(dict.fromkeys(names))


def check_runtime(runtime: Runtime, *, device: torch.device | str, dtype: torch.dtype = torch.float32,
                  options: RuntimeOptions = RuntimeOptions()) -> None:
    """Refuse at once, with one line, a runtime that cannot run here as asked.

    Raises:
        PomtError: float16 on the CPU, compile or onnxruntime with a torch too old
            for them (:mod:`pomt_cli.versions`); CUDA graphs with compile or
            onnxruntime; compile with a backend torch does not have; onnxruntime without the extra, with an unavailable
            provider, or in a dtype its providers lack.
    """
    runtime = Runtime(runtime)
    device = torch.device(device)
    versions.require_dtype_on(device, dtype)
    if options.cuda_graphs and runtime is not Runtime.eager:
        raise PomtError(f"--cuda-graphs times eager PyTorch only: leave it out with --runtime {runtime.value}")
    if runtime is Runtime.compile:
        versions.require(versions.COMPILE)
        backends = torch._dynamo.list_backends(exclude_tags=())
        if options.compile_backend not in backends:
            raise PomtError(f"--compile-backend {options.compile_backend!r} is not a torch.compile backend here: use "
                            "inductor or eager (torch._dynamo.list_backends() lists the others)")
    if runtime is Runtime.onnxruntime:
        resolve_providers(options.providers, device)
        if dtype == torch.bfloat16 or (dtype == torch.float16 and device.type != "cuda"):
            raise PomtError(f"--runtime onnxruntime on {device.type} takes float32"
                            + (" or float16" if device.type == "cuda" else "")
                            + f", not {str(dtype).removeprefix('torch.')}: use --dtype float32")


def runtime_info(runtime: Runtime, options: RuntimeOptions = RuntimeOptions(), *,
                 device: torch.device | str = "cpu") -> dict[str, Any]:
    """What ran the timed calls, for a profile's or a bench report's metadata."""
    runtime = Runtime(runtime)
    info: dict[str, Any] = {"runtime": runtime.value, "torch_version": torch.__version__,
                            "onnxruntime_version": None, "providers": None, "opset": None,
                            "exporters": None, "compile_backend": None}
    if runtime is Runtime.compile:
        info["compile_backend"] = options.compile_backend
    if runtime is Runtime.onnxruntime:
        info.update(onnxruntime_version=_onnxruntime().__version__, opset=options.opset, exporters=list(EXPORTERS),
                    providers=list(resolve_providers(options.providers, device)))
    return info


def weights_digest(model: nn.Module) -> str:
    """A short hash of the weights (the first 16 hex digits of the state dict's SHA-256)."""
    return state_dict_sha256(model)[:16]


def _setting(module: nn.Module) -> dict[str, Any]:
    """What the graph of ``module`` depends on besides the weights: the patch, the kept tokens."""
    inner = module.model if isinstance(module, KeptTokens) else module
    config = getattr(inner, "pomt_config", None)
    setting: dict[str, Any] = {"class": type(module).__name__}
    if config is not None:
        setting.update(method=config["method"], per_block=config["per_block"], layer=config["layer"],
                       tokens=config["planned_tokens"])
    if isinstance(module, KeptTokens):
        setting["keep"] = hashlib.sha256(module.keep.detach().cpu().numpy().tobytes()).hexdigest()[:16]
    return setting


def cache_key(module: nn.Module, images: torch.Tensor, *, label: str, weights: str, opset: int) -> str:
    """The graph's file name in the cache: readable parts, then a hash of everything it depends on.

    The hash covers the model's name, the weights' digest, the input's shape and dtype,
    the workload's label and setting (method, tokens per block, kept tokens), the opset,
    the exporters and the torch version; a change in any of them makes a new file.
    """
    inner = module.model if isinstance(module, KeptTokens) else module
    name = model_name(inner)
    dtype = str(images.dtype).removeprefix("torch.")
    parts = {"model": name, "weights": weights, "shape": list(images.shape), "dtype": dtype, "label": label,
             "setting": _setting(module), "opset": opset, "exporters": EXPORTERS, "torch": torch.__version__}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    readable = "-".join([name, "b" + "x".join(str(s) for s in images.shape), dtype, f"opset{opset}"])
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in readable) + f"-{digest}.onnx"


def prepare(module: nn.Module, images: torch.Tensor, runtime: Runtime, *, label: str = "",
            weights: str | None = None, options: RuntimeOptions = RuntimeOptions()) -> Prepared:
    """``module`` on ``images`` as a no-argument call in ``runtime``, ready to time.

    ``module`` and ``images`` must be on the same device, in the same dtype; ``module``
    in eval mode. ``label`` names the workload (``pomt r=56 @3``, ``proxy n=40``) and
    ``weights`` is :func:`weights_digest` of the model (computed here when None): both
    key the ONNX cache.

    Raises:
        PomtError: see :func:`check_runtime`; a workload that torch.compile cannot take as
            one graph; a graph that does not export or whose outputs differ from PyTorch's.
    """
    runtime = Runtime(runtime)
    check_runtime(runtime, device=images.device, dtype=images.dtype, options=options)
    if runtime is Runtime.eager:
        def forward() -> torch.Tensor:
            with torch.inference_mode():
                return module(images)

        return Prepared(forward, runtime)
    if runtime is Runtime.compile:
        return _prepare_compiled(module, images, label, options)
    return _prepare_onnxruntime(module, images, label, weights, options)


def _prepare_compiled(module: nn.Module, images: torch.Tensor, label: str, options: RuntimeOptions) -> Prepared:
    """``torch.compile`` of a copy of ``module``, warmed up on ``images``, its logits checked
    against eager PyTorch's there (a compiler can be wrong in silence: inductor's CPU
    ``scatter_add`` on torch 2.5.1 and 2.6.0 put ToMe's logits 14% away, README's "Versions")."""
    # Inductor's C++ path logs "No CUDA runtime is found" on every CPU-only machine: not
    # news to a user who profiles the CPU, and it would land in the middle of a table.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    compiled = torch.compile(copy.deepcopy(module), fullgraph=True, dynamic=False, backend=options.compile_backend)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return compiled(images)

    what = f"{model_name(module.model if isinstance(module, KeptTokens) else module)} {label}".strip()
    began = time.perf_counter()
    try:
        with torch._dynamo.config.patch(recompile_limits()):
            for _ in range(max(1, options.compile_warmup)):
                logits = forward()
    except Exception as exc:  # dynamo and inductor fail in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PomtError(f"{what} does not compile as one graph (torch.compile fullgraph=True): {first[:160]}; "
                        "use --runtime eager or onnxruntime") from None
    with torch.inference_mode():
        expected = module(images)
    _, max_rel = difference(logits, expected)
    tolerance = TOLERANCE[images.dtype] if options.tolerance is None else options.tolerance
    if not max_rel <= tolerance:
        raise PomtError(f"{what}: torch.compile's outputs differ from eager PyTorch's by {max_rel:.2e} (relative to "
                        f"the largest logit, torch {torch.__version__}), above the tolerance {tolerance:g}: use "
                        "--runtime eager, or another torch")
    return Prepared(forward, Runtime.compile, setup_s=time.perf_counter() - began, max_rel_diff=max_rel,
                    _keep=[compiled])


def _bind(session, io, images: torch.Tensor, output: torch.Tensor) -> None:
    """Bind ``images`` and ``output`` (tensors that outlive the binding) to the session by address."""
    import numpy as np

    element = {torch.float32: np.float32, torch.float16: np.float16}[images.dtype]
    device_type = "cuda" if images.device.type == "cuda" else "cpu"
    device_id = (images.device.index or 0) if device_type == "cuda" else 0
    io.bind_input(session.get_inputs()[0].name, device_type, device_id, element, list(images.shape),
                  images.data_ptr())
    io.bind_output(session.get_outputs()[0].name, device_type, device_id, element, list(output.shape),
                   output.data_ptr())


def _session(path: Path, providers: tuple[str, ...], device: torch.device):
    """An ONNX Runtime session of ``path`` with ``providers``, on torch's CUDA stream where there is one."""
    ort = _onnxruntime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.log_severity_level = 3
    chosen: list = []
    for p in providers:
        if p in GPU_PROVIDERS and device.type == "cuda":
            # On torch's stream, the timing engine's CUDA events bracket the session's kernels.
            stream = torch.cuda.current_stream(device).cuda_stream
            chosen.append((p, {"device_id": str(device.index or 0), "user_compute_stream": str(stream)}))
        else:
            chosen.append(p)
    return ort.InferenceSession(str(path), sess_options=so, providers=chosen)


def _bound_call(session, images: torch.Tensor, out_shape: Sequence[int]) -> tuple[Callable[[], torch.Tensor], list]:
    """``session`` on ``images`` through an I/O binding: the call, and what must stay alive."""
    images = images.contiguous()
    output = torch.empty(tuple(out_shape), dtype=images.dtype, device=images.device)
    io = session.io_binding()
    _bind(session, io, images, output)

    def forward() -> torch.Tensor:
        session.run_with_iobinding(io)
        return output

    return forward, [images, output, io, session]


def _prepare_onnxruntime(module: nn.Module, images: torch.Tensor, label: str, weights: str | None,
                         options: RuntimeOptions) -> Prepared:
    """The cached (or newly exported and checked) graph of ``module`` in an ONNX Runtime session."""
    providers = resolve_providers(options.providers, images.device)
    inner = module.model if isinstance(module, KeptTokens) else module
    weights = weights or weights_digest(inner)
    folder = options.folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PomtError(f"cannot create the ONNX cache folder {folder} ({exc.strerror or exc}): "
                        "set POMT_CACHE_DIR to a writable folder") from None
    path = folder / cache_key(module, images, label=label, weights=weights, opset=options.opset)
    began = time.perf_counter()
    with torch.inference_mode():
        out_shape = module(images[:1]).shape[1:]
    out_shape = (images.shape[0], *out_shape)
    max_rel = None
    cached = path.is_file()
    if not cached:
        # The graph's lock: a second process exporting it waits, then finds it; the temporaries of
        # an export killed outright are removed.
        with OutputSet(folder, path.stem, (path.suffix[1:],), wait=True) as files:
            cached = path.is_file()
            if not cached:
                max_rel, session = _export_checked(module, images, files, out_shape, providers, label, options)
    if cached:
        session = _session(path, providers, images.device)
    forward, keep = _bound_call(session, images, out_shape)
    forward()  # the first run allocates and picks kernels: not part of any timing
    return Prepared(forward, Runtime.onnxruntime, setup_s=time.perf_counter() - began,
                    providers=tuple(session.get_providers()), path=path, cached=cached, max_rel_diff=max_rel,
                    _keep=keep)


def _export_checked(module: nn.Module, images: torch.Tensor, files: OutputSet, out_shape: Sequence[int],
                    providers: tuple[str, ...], label: str, options: RuntimeOptions) -> tuple[float, Any]:
    """Export ``module`` into ``files`` (its one graph) and commit it once it is checked; its difference to PyTorch,
    its session.

    The TorchScript tracer is tried first and the dynamo exporter if the tracer fails or
    its graph differs from PyTorch; nothing is committed when both fail.
    """
    inner = module.model if isinstance(module, KeptTokens) else module
    what = f"{model_name(inner)} {label}".strip()
    last = EXPORTERS[-1]
    for exporter in EXPORTERS[:-1]:
        with contextlib.suppress(PomtError):
            return _export_once(module, images, files, out_shape, providers, what, exporter, options)
    return _export_once(module, images, files, out_shape, providers, what, last, options)


def _export_once(module: nn.Module, images: torch.Tensor, files: OutputSet, out_shape: Sequence[int],
                 providers: tuple[str, ...], what: str, exporter: str, options: RuntimeOptions) -> tuple[float, Any]:
    """One exporter's try: the graph committed in ``files``, its checked difference and session; or PomtError."""
    global exports_done
    (suffix,) = files.suffixes
    tmp = files.temporary(suffix)
    with torch.no_grad():
        export_graph(module, images, tmp, opset=options.opset, what=what, dynamo=exporter == "dynamo")
    session = _session(tmp, providers, images.device)
    max_rel = _check(module, session, images, out_shape, options)
    files.commit()
    exports_done += 1
    return max_rel, session


def _check(module: nn.Module, session, images: torch.Tensor, out_shape: Sequence[int],
           options: RuntimeOptions) -> float:
    """The relative difference of the session to PyTorch on a random batch; PomtError above the tolerance."""
    generator = torch.Generator().manual_seed(CHECK_SEED)
    probe = torch.randn(images.shape, generator=generator).to(device=images.device, dtype=images.dtype)
    with torch.inference_mode():
        expected = module(probe)
    forward, _ = _bound_call(session, probe, out_shape)
    _, max_rel = difference(forward(), expected)
    tolerance = TOLERANCE[images.dtype] if options.tolerance is None else options.tolerance
    if not max_rel <= tolerance:
        raise PomtError(f"ONNX Runtime's outputs differ from PyTorch's by {max_rel:.2e} (relative to the largest "
                        f"logit), above the tolerance {tolerance:g}: the graph was not kept")
    return max_rel
