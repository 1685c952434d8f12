"""Building models: timm names, pretrained weights, local checkpoints."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import textwrap
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit
from typing import Literal

import timm
import torch
from torch import nn

from pomt_cli import digits
from pomt_cli.defaults import DEFAULT_MODEL
from pomt_cli.errors import PomtError
from pomt_cli.formats.common import pomt_file_kind
from pomt_cli.pruning.geometry import TokenGeometry, geometry

WeightsSource = Literal["pretrained", "checkpoint", "bundled", "random"]

#: Seconds the look-up of the hub's host may take before the hub counts as unreachable.
HUB_LOOKUP_S = 3.0


def model_line(name: str) -> str:
    """The first line a command prints: which model it uses, and whether that is the default."""
    if name == DEFAULT_MODEL:
        return f"model: {name} (the default; --model NAME for another)"
    return f"model: {name}"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` or ``.pth``/``.pt`` file (loaded with ``weights_only=True``).

    A ``.pth`` holding ``{"model": ...}`` or ``{"state_dict": ...}`` is unwrapped, and a
    ``module.`` prefix (DataParallel) is stripped.
    """
    path = Path(path)
    if path.is_dir():
        raise PomtError(f"checkpoint {path} is a folder: give the path of a .safetensors or .pth file")
    if not path.is_file():
        raise PomtError(f"checkpoint {path} does not exist: give the path of a .safetensors or .pth file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files raise many different types
        if (kind := pomt_file_kind(path)) is not None:
            raise PomtError(f"checkpoint {path} is {kind}, not weights: give a .safetensors or .pth file") from None
        raise PomtError(f"checkpoint {path} cannot be read ({type(exc).__name__}): is it a weights file?") from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PomtError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _mismatch(exc: RuntimeError) -> str:
    """torch's "Error(s) in loading state_dict" as one line: what is missing, unexpected or of another shape."""
    parts = []
    for line in str(exc).splitlines()[1:]:
        line = " ".join(line.split())
        if line:
            parts.append(line if len(line) <= 160 else line[:157] + "...")
    return "; ".join(parts)[:480] or str(exc).splitlines()[0][:200]


def state_dict_sha256(model: nn.Module) -> str:
    """A SHA-256 over the model's state dict (names, shapes, dtypes and bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
) -> nn.Module:
    """A timm model in eval mode.

    Args:
        name: a timm model name, e.g. ``deit_small_patch16_224``, or ``digits-vit`` (bundled).
        pretrained: load timm's pretrained weights (from the local cache or the hub).
            ``digits-vit`` always starts from its bundled weights.
        checkpoint: a local weights file, loaded after creation (strict).
        num_classes: override the head size (for checkpoints trained on other label sets).
        img_size: input height and width in pixels (default: the model's); a positive
            multiple of the patch size. timm resamples pretrained position embeddings to
            it, and a checkpoint's are resampled the same way.

    Raises:
        PomtError: unknown model, bad image size, weights that cannot be loaded.
    """
    if pretrained and checkpoint is not None:
        raise PomtError("give either --pretrained or --checkpoint, not both")
    if img_size is not None and img_size < 1:
        raise PomtError(f"--img-size {img_size} must be positive, a multiple of the model's patch size")
    if name == digits.NAME:
        model = _create_digits_vit(checkpoint, num_classes)
        if img_size is not None and img_size != model.patch_embed.img_size[0]:
            raise PomtError(f"{digits.NAME} takes {model.patch_embed.img_size[0]} px images only: leave out --img-size")
        return model
    if not timm.is_model(name):
        raise PomtError(f"unknown model {name!r}: give a timm model name such as deit_small_patch16_224")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if pretrained:
        model = _create_pretrained(name, kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    _check_patch_multiple(model, img_size)
    if checkpoint is not None:
        state = load_state_dict(checkpoint)
        head = state.get("head.weight")
        if head is not None and num_classes is None and head.shape[0] != model.num_classes:
            model = timm.create_model(name, pretrained=False, **{**kwargs, "num_classes": int(head.shape[0])})
        state = _resample_position_embedding(model, state)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise PomtError(f"checkpoint {checkpoint} does not fit {name}: {_mismatch(exc)}") from None
    return model.eval()


def _hub_unreachable() -> str | None:
    """The hub's host (``HF_ENDPOINT``'s) when its name cannot be looked up within
    :data:`HUB_LOOKUP_S`; None when it can, or where the hub client alone can tell (offline
    mode already set, a proxy)."""
    from huggingface_hub import constants

    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if constants.HF_HUB_OFFLINE or any(os.environ.get(key) for key in proxies):
        return None
    host = urlsplit(constants.ENDPOINT).hostname
    if not host:
        return None
    found = threading.Event()

    def look_up() -> None:
        with suppress(OSError, UnicodeError):
            socket.getaddrinfo(host, None)
            found.set()

    threading.Thread(target=look_up, daemon=True).start()  # getaddrinfo has no timeout of its own
    return None if found.wait(HUB_LOOKUP_S) else host


@contextmanager
def _quiet_hub(offline: bool) -> Iterator[None]:
    """The hub client without its log lines (retries), warnings and progress bars; with
    ``offline``, in its offline mode (as ``HF_HUB_OFFLINE=1``: the local cache only)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    logger = logging.getLogger("huggingface_hub")
    level, was_offline, bars_off = logger.level, constants.HF_HUB_OFFLINE, are_progress_bars_disabled()
    logger.setLevel(logging.ERROR + 10)
    constants.HF_HUB_OFFLINE = was_offline or offline
    disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        constants.HF_HUB_OFFLINE = was_offline
        if not bars_off:
            enable_progress_bars()


def _create_pretrained(name: str, kwargs: dict) -> nn.Module:
    """``timm.create_model(name, pretrained=True)``, quietly; from the cache alone, at once,
    where the hub's host cannot be looked up.

    Raises:
        PomtError: the weights could not be loaded (one line).
    """
    unreachable = _hub_unreachable()
    try:
        with _quiet_hub(offline=unreachable is not None):
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # hub and cache failures come in many types
        if unreachable and (isinstance(exc, OSError) or type(exc).__module__.startswith("huggingface_hub")):
            raise PomtError(
                f"cannot load pretrained weights for {name}: the Hugging Face hub ({unreachable}) cannot be reached "
                "and they are not in its local cache: fill the cache where the hub can be reached and set "
                "HF_HUB_OFFLINE=1, or use --checkpoint PATH"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PomtError(
            f"cannot load pretrained weights for {name} ({type(exc).__name__}: "
            f"{textwrap.shorten(first, 160, placeholder=' ...')}); "
            "put them in the Hugging Face cache (offline, HF_HUB_OFFLINE=1 reads only the cache, without "
            "waiting for the network) or use --checkpoint PATH"
        ) from None


def _check_patch_multiple(model: nn.Module, img_size: int | None) -> None:
    patch_embed = getattr(model, "patch_embed", None)
    if img_size is None or patch_embed is None:
        return
    patch = int(patch_embed.patch_size[0])
    if img_size % patch:
        lower = max(patch, img_size // patch * patch)
        raise PomtError(
            f"--img-size {img_size} is not a multiple of the model's patch size {patch}: give e.g. {lower} or {lower + patch}"
        )


def _resample_position_embedding(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's position embedding resampled to the model's grid (timm's function), when it differs."""
    pos = state.get("pos_embed")
    own = getattr(model, "pos_embed", None)
    if pos is None or own is None or pos.shape == own.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    resampled = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix)
    return {**state, "pos_embed": resampled}


def _create_digits_vit(checkpoint: str | Path | None, num_classes: int | None) -> nn.Module:
    """The bundled digits-vit with its committed weights, or with ``checkpoint``'s."""
    if num_classes is not None and num_classes != digits.ARCHITECTURE["num_classes"]:
        raise PomtError(f"{digits.NAME} classifies {digits.ARCHITECTURE['num_classes']} digits, not {num_classes} classes")
    model = digits.build_digits_vit()
    path = digits.CHECKPOINT if checkpoint is None else Path(checkpoint)
    try:
        model.load_state_dict(load_state_dict(path), strict=True)
    except RuntimeError as exc:
        raise PomtError(f"checkpoint {path} does not fit {digits.NAME}: {_mismatch(exc)}") from None
    return model.eval()


def weights_source(name: str, *, pretrained: bool, checkpoint: str | Path | None) -> WeightsSource:
    """Where :func:`create_model` takes the weights from for these options."""
    if checkpoint is not None:
        return "checkpoint"
    if name == digits.NAME:
        return "bundled"
    return "pretrained" if pretrained else "random"


def check_num_classes(model: nn.Module, num_classes: int, data: str) -> None:
    """Check that the model's classifier head has one output per class of the data set.

    Raises:
        PomtError: the head has a different size (or the model has no classifier).
    """
    head = int(getattr(model, "num_classes", 0) or 0)
    if head == 0:
        raise PomtError(
            f"the model has no classifier head (num_classes=0), so it cannot classify {data}: "
            "give --checkpoint PATH with weights that include a head trained on these classes"
        )
    if head != num_classes:
        raise PomtError(
            f"the model's head has {head} classes but {data} has {num_classes}: "
            "give a checkpoint trained on these classes, or a data set with one folder per model class"
        )


def vit_geometry(model: nn.Module) -> TokenGeometry:
    """The token geometry of a supported ViT.

    Raises:
        PomtError: the model is not one of the ViTs the pruning core supports.
    """
    try:
        return geometry(model)
    except ValueError as exc:
        raise PomtError(str(exc)) from None
