"""Backend selection: which implementation runs an op.

"eager"  -- the plain-PyTorch reference (the spec), any device.
"torch"  -- composites of fused torch ops (``unipelt_fast/composite.py``), any device: prefix
            attention through SDPA; the other ops as eager. The CPU default.
"triton" -- the fused Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
"cuda"   -- the CUDA C++ fallback, JIT-built with ninja on first use.
"auto"   -- see :func:`resolve_backend`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "eager", "torch", "triton", "cuda")

# Which issue delivers each (backend, op) pair: named in NotImplementedError messages.
_ISSUE = {
    ("triton", "prefix_attention"): "issue 3",
    ("triton", "gated_adapter"): "issue 4",
    ("triton", "bias_only_linear"): "issue 5",
    ("triton", "bias_only_layer_norm"): "issue 5",
    ("cuda", "prefix_attention"): "issue 6",
    ("cuda", "gated_adapter"): "issue 6",
    ("cuda", "bias_only_linear"): "issue 6",
    ("cuda", "bias_only_layer_norm"): "issue 6",
}

_default_backend: str | None = None  # set_backend(); None means "read UNIPELT_BACKEND"


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide default used when an op is called with backend="auto".

    ``None`` restores the default (the ``UNIPELT_BACKEND`` environment variable, else "auto").
    """
    global _default_backend
    _default_backend = None if name is None else _check_name(name, "backend")


def get_backend() -> str:
    """The process-wide default backend ("auto" unless set)."""
    if _default_backend is not None:
        return _default_backend
    return _check_name(os.environ.get("UNIPELT_BACKEND", "auto") or "auto", "UNIPELT_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily set the process-wide default backend."""
    global _default_backend
    old = _default_backend
    set_backend(name)
    try:
        yield
    finally:
        _default_backend = old


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_import_error() -> str | None:
    """None when triton imports, else the reason it does not."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as e:  # noqa: BLE001 - any import failure means "no triton"
        return f"{type(e).__name__}: {e}"
    return None


def cuda_extension_built() -> bool:
    """True when the CUDA fallback is already built (never triggers a build)."""
    try:
        from . import _cuda
    except ImportError:
        return False
    return bool(getattr(_cuda, "is_built", lambda: False)())


def resolve_backend(
    backend: str, device: torch.device, op: str, dtype: torch.dtype | None = None
) -> str:
    """Turn a requested backend into the one that runs, or raise saying why it cannot.

    "auto" (after applying :func:`set_backend` / ``UNIPELT_BACKEND``):
    CUDA tensors -> triton if it imports, else the CUDA extension if built, else eager;
    CPU tensors -> triton when ``TRITON_INTERPRET=1``, else torch. float64 inputs (which
    only the eager reference supports) always resolve to eager under "auto".
    """
    _check_name(backend, "backend")
    if backend == "auto":
        backend = get_backend()
    if backend == "auto":
        if dtype == torch.float64:
            return "eager"
        if device.type == "cuda":
            if triton_import_error() is None:
                return "triton"
            if cuda_extension_built():
                return "cuda"
            return "eager"
        if device.type == "cpu":
            if triton_interpret() and triton_import_error() is None:
                return "triton"
            return "torch"
        return "eager"
    if backend == "triton":
        err = triton_import_error()
        if err is not None:
            raise RuntimeError(
                f"{op}: backend='triton' needs triton, which failed to import ({err})"
            )
        if device.type == "cpu" and not triton_interpret():
            raise RuntimeError(
                f"{op}: triton on CPU tensors needs TRITON_INTERPRET=1 (set it before importing "
                "triton), or use backend='eager'"
            )
        if device.type not in ("cuda", "cpu"):
            raise RuntimeError(f"{op}: backend='triton' supports CUDA tensors, got {device.type}")
    if backend == "cuda" and device.type != "cuda":
        raise RuntimeError(f"{op}: backend='cuda' needs CUDA tensors, got {device.type} tensors")
    return backend


def kernel_impl(op: str, backend: str):
    """The module implementing ``op`` for a kernel backend; it exposes ``forward``/``backward``.

    The calling convention of each op's ``forward``/``backward`` is documented in
    ``unipelt_fast/ops.py`` and is shared by the triton and cuda backends.
    """
    if backend == "triton":
        try:
            mod = importlib.import_module(f"unipelt_fast.kernels.{op}")
        except ModuleNotFoundError as e:
            if e.name != f"unipelt_fast.kernels.{op}":
                raise
            mod = None
    elif backend == "cuda":
        from . import _cuda

        mod = _cuda.op_module(op)
    else:
        raise ValueError(f"no kernel module for backend {backend!r}")
    if mod is None or not hasattr(mod, "forward") or not hasattr(mod, "backward"):
        issue = _ISSUE.get((backend, op), "a later issue")
        raise NotImplementedError(
            f"{op}: the {backend} kernels are not written yet ({issue}); use backend='eager'"
        )
    return mod
