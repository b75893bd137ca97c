"""unipelt-fast: fused kernels for UniPELT-style parameter-efficient fine-tuning.

Public ops (pinned signatures): :func:`prefix_attention`, :func:`gated_adapter`,
:func:`bias_only_linear`, plus :func:`bias_only_layer_norm`. Each takes
``backend=`` "auto" | "eager" | "triton" | "cuda".
"""

from ._backend import BACKENDS, get_backend, resolve_backend, set_backend, use_backend
from ._version import __version__
from .bitfit import bitfit
from .modules import (
    BiasOnlyLayerNorm,
    BiasOnlyLinear,
    Gate,
    GatedAdapter,
    PrefixEncoder,
    PrefixGate,
)
from .ops import bias_only_layer_norm, bias_only_linear, gated_adapter, prefix_attention

__all__ = [
    "BACKENDS",
    "BiasOnlyLayerNorm",
    "BiasOnlyLinear",
    "Gate",
    "GatedAdapter",
    "PrefixEncoder",
    "PrefixGate",
    "__version__",
    "bias_only_layer_norm",
    "bias_only_linear",
    "bitfit",
    "gated_adapter",
    "get_backend",
    "prefix_attention",
    "resolve_backend",
    "set_backend",
    "use_backend",
]
