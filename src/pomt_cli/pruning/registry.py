"""The token-reduction methods by name: what each declares, and the table that finds them.

A method is one module that subclasses :class:`Method` and decorates it with
:func:`register`; :func:`~pomt_cli.pruning.apply`, bench, the accuracy estimators, export
and the CLI choices all look methods up here. The built-in ones, in this order: ``none``,
``pomt``, ``tome``, ``topk`` (imported by ``pomt_cli.pruning``).
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pomt_cli.errors import PruningError
from pomt_cli.pruning.geometry import TokenGeometry


@dataclass(frozen=True)
class BlockPlan:
    """What one block does: ``method`` with ``r`` tokens removed (0: nothing)."""

    method: str
    r: int
    num_prefix: int
    #: POMT's scoring: "kernel" (fused attention, and one Triton kernel for the attention
    #: received, in float16/bfloat16 on CUDA; elsewhere, or where Triton is missing or its
    #: first-call check fails, the same as "lean"), "lean" (fused attention,
    #: log-probabilities a chunk at a time), "explicit" (the full softmax matrix, as the
    #: paper's code; what exported, traced and compiled graphs get), or "auto": kernel in
    #: float16/bfloat16, where lean was measured faster than explicit (H200 and CPU,
    #: docs/PERFORMANCE.md), explicit in float32, where it was not.
    scoring: str = "auto"
    #: POMT's reduction (keep the best tokens, append the mean of the rest): whether it may
    #: run as one Triton kernel (CUDA, or Triton's interpreter; without gradients; where its
    #: first-call check passed). False: tensor operations (sorts, gathers, a mean).
    prune_kernel: bool = True
    #: ToMe: whether the model has a class token (A's unmerged tokens then stay in position order).
    class_token: bool = True
    #: Tokens the plan expects to enter the block (0: any). A model whose token count
    #: changed after ``apply`` (timm's ``set_input_size``) is refused, not run on a stale plan.
    tokens: int = 0
    #: Whether the block takes and returns token sizes (a merging method: ToMe).
    sizes: bool = False
    #: Whether an earlier block merged tokens, so this block needs their sizes.
    sizes_needed: bool = False


class Method(ABC):
    """A token-reduction method: its setting, schedule and limits, names, and block reduction.

    A setting is ``r`` (an int, or what :meth:`schedule` accepts) and, for a method with
    :attr:`takes_layer`, a block ``layer``. Override :meth:`schedule` and :meth:`reduce`;
    they are abstract, so a method lacking one cannot be registered; the rest has defaults
    that suit a method removing tokens by pruning.
    """

    #: The name users type (``--method``, ``--estimator``) and files record.
    name: ClassVar[str]
    #: The name in messages ("POMT", "Top-K").
    title: ClassVar[str]
    #: Whether the setting has a block ``layer`` (labels, file names and options show it).
    takes_layer: ClassVar[bool] = False
    #: Whether :func:`~pomt_cli.pruning.apply` patches the model (False: the unpatched model).
    reduces: ClassVar[bool] = True
    #: bench's r when no option gives one; None: the method needs -r or --r-from.
    bench_r: ClassVar[int | None] = 8
    #: Whether the method merges tokens into ones that stand for several, whose sizes the
    #: later blocks need (ToMe's proportional attention); the sizes then pass from block to block.
    merges: ClassVar[bool] = False

    @abstractmethod
    def schedule(self, g: TokenGeometry, r, layer: int) -> list[int]:
        """Tokens requested to be removed in each block, from the setting.

        Raises:
            PruningError: a setting the method does not take; the message says what it takes.
        """

    def cap(self, requested: list[int], g: TokenGeometry) -> list[int]:
        """The tokens each block really removes (a method may lower what was requested)."""
        return requested

    @abstractmethod
    def reduce(
        self, block: nn.Module, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        size: torch.Tensor | None, plan: BlockPlan,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention sub-layer and the reduction, between timm's attention and MLP.

        Args:
            block: the timm ``Block`` (its ``attn``, ``ls1``, ``drop_path1``).
            x: (B, N, C) tokens entering the block.
            q, k, v: (B, H, N, D) of ``block.attn`` on ``block.norm1(x)``.
            size: (B, N, 1) token sizes, or None (only ToMe's merging makes them).
            plan: this block's plan (``plan.r`` tokens to remove).

        Returns:
            ``(x, size)``: x + attention, with ``plan.r`` tokens removed, and the sizes.
        """

    def estimator_setting(self, g: TokenGeometry, removed: int, layer: int) -> dict:
        """Keyword arguments of ``apply`` that remove ``removed`` tokens (accuracy estimators).

        By default spread as evenly as possible over all blocks (:func:`spread`).
        """
        return {"r": spread(removed, g.num_patches, g.num_blocks, halving=False)}

    def fewest_tokens(self, g: TokenGeometry) -> int:
        """The fewest tokens the method can leave on the model."""
        return g.num_prefix + 1

    def label(self, r, layer: int) -> str:
        """The setting in tables: ``tome r=8``, ``topk r=[8,4]``, ``pomt r=56 @3``."""
        text = r if isinstance(r, int) else "[" + ",".join(str(v) for v in r) + "]"
        return f"{self.name} r={text}" + (f" @{layer}" if self.takes_layer else "")

    def slug(self, r, layer: int) -> str:
        """The setting in file names: ``tome-r8``, ``topk-r8x4``, ``pomt-r56-l3``."""
        text = r if isinstance(r, int) else "x".join(str(v) for v in r)
        return f"{self.name}-r{text}" + (f"-l{layer}" if self.takes_layer else "")


_METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make the method findable by its ``name``.

    Raises:
        ValueError: a method of that name is registered already.
    """
    if cls.name in _METHODS:
        raise ValueError(f"a method named {cls.name!r} is registered already")
    _METHODS[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Forget the method ``name`` (models it patched must be removed first).

    Raises:
        PruningError: no such method; the message lists the known ones.
    """
    del _METHODS[get(name).name]


def names() -> tuple[str, ...]:
    """The registered methods' names, in the order they were registered."""
    return tuple(_METHODS)


def get(name: str) -> Method:
    """The method called ``name``.

    Raises:
        PruningError: no such method; the message lists the known ones.
    """
    try:
        return _METHODS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise PruningError(f"unknown method {name!r}: use one of {', '.join(_METHODS)}") from None


def as_int(value, what: str) -> int:
    """``value`` as a Python int: an int or an integer scalar (NumPy, a 0-d integer tensor).

    Raises:
        PruningError: a bool, a float (even 3.0), a string or anything else.
    """
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise PruningError(f"{what} must be an int, got {value!r}")


def as_r(r):
    """A method's ``r`` in plain Python: an int, a list of ints (from any sequence or array of
    integers), or a tuple as given (ToMe's ``(r, inflection)``; the method checks it).

    Raises:
        PruningError: r is none of these (a bool, a float, a string, None, a list of floats).
    """
    if isinstance(r, tuple):
        return r
    if not isinstance(r, (bool, str, bytes)) and r is not None:
        try:
            return operator.index(r)
        except TypeError:
            pass
        try:
            values = list(r)
        except TypeError:
            values = None
        if values is not None:
            return [as_int(v, f"r[{i}]") for i, v in enumerate(values)]
    raise PruningError(f"r must be an int or a list of ints (one per block; ToMe also takes (r, inflection)), "
                       f"got {r!r}")


def spread(total: int, num_patches: int, num_blocks: int, *, halving: bool) -> list[int]:
    """Tokens to remove in each block so that ``total`` go over ``num_blocks`` blocks.

    Each block removes ``ceil(left / blocks left)`` (the earlier blocks take the
    remainder). With ``halving`` (ToMe: at most half of the non-prefix tokens merge in a
    block), a block removes more when fewer would leave the later blocks unable to reach
    the target.

    Args:
        total: tokens to remove, at most ``num_patches - 1``.
        num_patches: non-prefix tokens entering the first block.
        num_blocks: blocks.
        halving: cap each block at half of its non-prefix tokens.

    Raises:
        PruningError: the target cannot be reached.
    """
    final = num_patches - total
    if total < 0 or final < 1:
        raise PruningError(f"cannot remove {total} of {num_patches} patch tokens and keep at least one")
    if halving and num_patches > final * 2**num_blocks:
        raise PruningError(f"halving {num_blocks} times cannot bring {num_patches} patch tokens down to {final}")
    per_block: list[int] = []
    tokens = num_patches
    for i in range(num_blocks):
        left, blocks_left = tokens - final, num_blocks - i
        r = -(-left // blocks_left)
        if halving:
            r = max(r, tokens - final * 2 ** (blocks_left - 1))
        per_block.append(r)
        tokens -= r
    return per_block
