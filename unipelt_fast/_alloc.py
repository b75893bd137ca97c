"""Output allocation for kernel launchers.

With ``UNIPELT_NAN_FILL=1`` (the test command sets it) outputs start as NaN instead of
uninitialised memory, so an element a kernel forgets to write fails every parity test.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

NAN_FILL = os.environ.get("UNIPELT_NAN_FILL", "0") == "1"


def new_output(
    shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``torch.empty``, or NaN-filled under ``UNIPELT_NAN_FILL=1``."""
    if NAN_FILL and dtype.is_floating_point:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def layout_order(ref: torch.Tensor) -> list[int]:
    """``ref``'s dims, outermost first: sorted by stride, largest first (ties keep their
    order). A (B, L, H, D) buffer seen as (B, H, L, D) gives [0, 2, 1, 3]."""
    return sorted(range(ref.dim()), key=lambda i: (-ref.stride(i), i))


def dense_strides(ref: torch.Tensor) -> tuple[int, ...]:
    """Strides of a dense tensor of ``ref``'s shape in ``ref``'s dimension order."""
    strides, n = [0] * ref.dim(), 1
    for i in reversed(layout_order(ref)):
        strides[i], n = n, n * ref.shape[i]
    return tuple(strides)


def new_output_like(ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``new_output`` of ``ref``'s shape, dense, in ``ref``'s dimension order (even where
    ``ref`` itself is not dense, e.g. a slice of a fused QKV projection), so that the
    caller's inverse permute + reshape costs no copy."""
    dt = dtype or ref.dtype
    t = torch.empty_strided(ref.shape, dense_strides(ref), dtype=dt, device=ref.device)
    return t.fill_(float("nan")) if NAN_FILL and dt.is_floating_point else t


def device_context(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA device, else nothing to enter."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_input_device(fn: F) -> F:
    """Run a launcher with its first tensor argument's GPU current: Triton launches on the
    current device, which for a model split over GPUs (device_map="auto") may be another."""

    @functools.wraps(fn)
    def launcher(*args, **kwargs):
        # The first tensor, looking inside an op's argument record (a NamedTuple) too.
        flat = (t for a in args for t in (a if isinstance(a, tuple) else (a,)))
        t = next(t for t in flat if isinstance(t, torch.Tensor))
        with device_context(t.device):
            return fn(*args, **kwargs)

    return launcher  # type: ignore[return-value]
