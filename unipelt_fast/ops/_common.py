"""Helpers shared by the op modules: autocast, output layouts, and the generic autograd
plumbing that saves and rebuilds an argument record (so no op restates its arguments)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._alloc import dense_strides, new_output_like

Tensor = torch.Tensor
EMPTY = (0,)


def autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under autocast (on the first tensor's device), cast floating inputs to the autocast
    dtype: custom ops are not autocast-aware, and validation rejects mixed dtypes."""
    first = tensors[0]
    # Meta tensors (shape inference) have no autocast: asking would raise before validation.
    if not isinstance(first, Tensor) or first.device.type == "meta":
        return tensors
    if not torch.is_autocast_enabled(first.device.type):
        return tensors
    dt = torch.get_autocast_dtype(first.device.type)
    return tuple(
        t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dt else t
        for t in tensors
    )


def or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """A custom op cannot return None for a Tensor: an empty (0,) tensor stands for it."""
    return like.new_empty(EMPTY) if t is None else t


def fake_like(t: Tensor | None, like: Tensor) -> Tensor:
    """The fake of a gradient shaped like ``t`` (empty (0,) where ``t`` is None)."""
    return like.new_empty(EMPTY) if t is None else torch.empty_like(t)


def in_layout_of(q: Tensor, out: Tensor) -> Tensor:
    """``out`` laid out like ``new_output_like(q)`` (the fake's strides), copied only if not."""
    if out.stride() == dense_strides(q):
        return out
    return new_output_like(q).copy_(out)


def fake_in_layout_of(t: Tensor) -> Tensor:
    return torch.empty_strided(t.shape, dense_strides(t), dtype=t.dtype, device=t.device)


def save_args(ctx, args: NamedTuple, *outputs: Tensor, unsaved: tuple[str, ...] = ()) -> None:
    """Keep ``args`` and ``outputs`` for backward: tensor fields through save_for_backward,
    the others on ctx. A tensor field named in ``unsaved`` is not kept (backward sees an
    empty placeholder in its place, or None where it was None)."""
    kept, layout = [], []
    for name, val in zip(args._fields, args, strict=True):
        if isinstance(val, Tensor):
            kept.append(val.new_empty(EMPTY) if name in unsaved else val)
            layout.append((True, None))
        else:
            layout.append((False, val))
    ctx.uf_record, ctx.uf_layout = type(args), layout
    ctx.save_for_backward(*kept, *outputs)


def saved_args(ctx) -> tuple[NamedTuple, tuple[Tensor, ...]]:
    """(args, outputs) as :func:`save_args` kept them."""
    saved = iter(ctx.saved_tensors)
    vals = [next(saved) if is_tensor else val for is_tensor, val in ctx.uf_layout]
    return ctx.uf_record(*vals), tuple(saved)
