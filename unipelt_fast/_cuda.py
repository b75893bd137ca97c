"""CUDA C++ fallback (backend="cuda"): JIT build and per-op wrappers.

Placeholder until issue 6 lands: nothing is built, and every op raises NotImplementedError.
"""

from __future__ import annotations


def is_built() -> bool:
    """True when the extension is already compiled (never starts a build)."""
    return False


def op_module(op: str):
    """The object exposing ``forward``/``backward`` for ``op``, or None when not written."""
    return None
