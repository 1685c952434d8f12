"""Building models: timm names, pretrained weights, local checkpoints."""

from __future__ import annotations

import hashlib
from pathlib import Path

import timm
import torch
from torch import nn

from pomt_cli.errors import PomtError


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` or ``.pth``/``.pt`` file (loaded with ``weights_only=True``).

    A ``.pth`` holding ``{"model": ...}`` or ``{"state_dict": ...}`` is unwrapped, and a
    ``module.`` prefix (DataParallel) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise PomtError(f"checkpoint {path} does not exist: give the path of a .safetensors or .pth file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files raise many different types
        raise PomtError(f"checkpoint {path} cannot be read ({type(exc).__name__}): is it a weights file?") from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PomtError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


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
) -> nn.Module:
    """A timm model in eval mode.

    Args:
        name: a timm model name, e.g. ``deit_small_patch16_224``.
        pretrained: load timm's pretrained weights (from the local cache or the hub).
        checkpoint: a local weights file, loaded after creation (strict).
        num_classes: override the head size (for checkpoints trained on other label sets).
    """
    if pretrained and checkpoint is not None:
        raise PomtError("give either --pretrained or --checkpoint, not both")
    if not timm.is_model(name):
        raise PomtError(f"unknown model {name!r}: give a timm model name such as deit_small_patch16_224")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:  # hub and cache failures come in many types
        if pretrained:
            raise PomtError(
                f"cannot load pretrained weights for {name} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                "put them in the Hugging Face cache or use --checkpoint PATH"
            ) from None
        raise
    if checkpoint is not None:
        state = load_state_dict(checkpoint)
        head = state.get("head.weight")
        if head is not None and num_classes is None and head.shape[0] != model.num_classes:
            model = timm.create_model(name, pretrained=False, num_classes=int(head.shape[0]))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise PomtError(f"checkpoint {checkpoint} does not fit {name}: {first[:200]}") from None
    return model.eval()
