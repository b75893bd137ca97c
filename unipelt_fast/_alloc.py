"""Output allocation for kernel launchers.

With ``UNIPELT_NAN_FILL=1`` (the test command sets it) outputs start as NaN instead of
uninitialised memory, so an element a kernel forgets to write fails every parity test.
"""

from __future__ import annotations

import os

import torch

NAN_FILL = os.environ.get("UNIPELT_NAN_FILL", "0") == "1"


def new_output(
    shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``torch.empty``, or NaN-filled under ``UNIPELT_NAN_FILL=1``."""
    if NAN_FILL and dtype.is_floating_point:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)
