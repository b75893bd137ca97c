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
import os
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("auto", "eager", "torch", "triton", "cuda")

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
        import triton  # noqa: F401
        import triton.language  # noqa: F401
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


# ---- the registry: (op, kernel backend) -> the module implementing it ---------------------
# Each entry is a small named loader, so a reader (and a tool) can follow op -> kernels. The
# imports are deferred: triton may be missing, and the cuda extension is built on first use.
# Every implementation keeps one contract (docs/ops.md): ``forward(args) -> outputs`` and
# ``backward(args, grad, *saved) -> grads``, args being the op's record (unipelt_fast._args).
# "eager" (reference.py) and "torch" (composite.py) run under torch autograd instead.


def _triton_prefix_attention():
    from .kernels import prefix_attention

    return prefix_attention


def _triton_gated_adapter():
    from .kernels import gated_adapter

    return gated_adapter


def _triton_bias_only_linear():
    from .kernels import bias_only_linear

    return bias_only_linear


def _triton_bias_only_layer_norm():
    from .kernels import bias_only_layer_norm

    return bias_only_layer_norm


def _cuda_prefix_attention():
    from . import _cuda

    return _cuda.prefix_attention


def _cuda_gated_adapter():
    from . import _cuda

    return _cuda.gated_adapter


def _cuda_bias_only_linear():
    from . import _cuda

    return _cuda.bias_only_linear


def _cuda_bias_only_layer_norm():
    from . import _cuda

    return _cuda.bias_only_layer_norm


REGISTRY: dict[tuple[str, str], Callable[[], object]] = {
    ("prefix_attention", "triton"): _triton_prefix_attention,
    ("gated_adapter", "triton"): _triton_gated_adapter,
    ("bias_only_linear", "triton"): _triton_bias_only_linear,
    ("bias_only_layer_norm", "triton"): _triton_bias_only_layer_norm,
    ("prefix_attention", "cuda"): _cuda_prefix_attention,
    ("gated_adapter", "cuda"): _cuda_gated_adapter,
    ("bias_only_linear", "cuda"): _cuda_bias_only_linear,
    ("bias_only_layer_norm", "cuda"): _cuda_bias_only_layer_norm,
}


def kernel_impl(op: str, backend: str):
    """The implementation of ``op`` on a kernel backend ("triton" or "cuda"), from
    :data:`REGISTRY`; it exposes ``forward`` and ``backward`` (contract: docs/ops.md)."""
    if backend not in ("triton", "cuda"):
        raise ValueError(f"{op}: no kernel implementation for backend {backend!r}")
    loader = REGISTRY.get((op, backend))
    impl = None
    if loader is not None:
        try:
            impl = loader()
        except ModuleNotFoundError as e:
            # Only the implementation itself missing means "not written"; a missing
            # dependency inside it (e.g. triton) is a real error and propagates.
            if e.name is None or not e.name.endswith(f".{op}"):
                raise
    if impl is None or not hasattr(impl, "forward") or not hasattr(impl, "backward"):
        raise NotImplementedError(
            f"{op}: the {backend} backend has no implementation of {op}; use backend='eager'"
        )
    return impl
