"""unipelt-fast: fused kernels for UniPELT-style parameter-efficient fine-tuning.

Public ops (pinned signatures): :func:`prefix_attention`, :func:`gated_adapter`,
:func:`bias_only_linear`, plus :func:`bias_only_layer_norm`. Each takes
``backend=`` "auto" | "eager" | "triton" | "cuda".

UniPELT for Hugging Face models: :func:`apply_unipelt` with a :class:`UniPELTConfig`,
:func:`trainable_report`, :func:`save_unipelt` / :func:`load_unipelt`, :func:`eject`,
:func:`gate_report` / :func:`plot_gates` (what the gates chose).
peft / adapters checkpoints: :func:`from_peft`, :func:`save_peft`, :func:`from_adapters`.
"""

from . import _clone_kernels  # noqa: F401  (binds unipelt_fast.kernels in a clone)
from ._backend import BACKENDS, get_backend, resolve_backend, set_backend, use_backend
from ._version import __version__
from .bitfit import bitfit
from .checkpoint import UniPELTCheckpointError, load_unipelt, save_unipelt
from .config import AdapterConfig, LoRAConfig, PrefixConfig, PromptConfig, UniPELTConfig
from .gates import GateReport, gate_report, plot_gates
from .hf import apply_unipelt, eject, set_active_task, trainable_report
from .interop import InteropError, from_adapters, from_peft, save_peft
from .lora import GatedLoRA
from .modules import (
    BiasOnlyLayerNorm,
    BiasOnlyLinear,
    Gate,
    GatedAdapter,
    PrefixEncoder,
    PrefixGate,
)
from .ops import bias_only_layer_norm, bias_only_linear, gated_adapter, prefix_attention
from .prompt import SoftPrompt

__all__ = [
    "AdapterConfig",
    "BACKENDS",
    "GateReport",
    "GatedLoRA",
    "InteropError",
    "LoRAConfig",
    "PrefixConfig",
    "PromptConfig",
    "SoftPrompt",
    "UniPELTCheckpointError",
    "UniPELTConfig",
    "apply_unipelt",
    "eject",
    "from_adapters",
    "from_peft",
    "gate_report",
    "load_unipelt",
    "plot_gates",
    "save_peft",
    "save_unipelt",
    "set_active_task",
    "trainable_report",
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
