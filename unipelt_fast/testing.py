"""Helpers for parity tests: per-dtype tolerances and relative-norm comparison.

Kernels are compared with a float64 run of the eager reference on the same inputs, by
relative norm error ``||actual - expected|| / ||expected||``.
"""

from __future__ import annotations

import torch

# Relative-norm tolerance by the dtype the op ran in.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 4e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    """The relative-norm tolerance for results computed in ``dtype``."""
    try:
        return TOLERANCE[dtype]
    except KeyError:
        raise ValueError(f"no tolerance defined for {dtype}") from None


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (absolute norm when expected is 0)."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(
    actual: torch.Tensor | None,
    expected: torch.Tensor | None,
    dtype: torch.dtype,
    name: str = "",
    factor: float = 1.0,
) -> None:
    """Assert relative-norm closeness within ``factor * tolerance(dtype)``."""
    if expected is None or actual is None:
        if (actual is None) != (expected is None):
            raise AssertionError(f"{name}: one of actual/expected is None")
        return
    err = rel_err(actual, expected)
    tol = factor * tolerance(dtype)
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype})")
