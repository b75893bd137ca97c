"""The public ops: one interface over the eager reference and the kernel backends.

One module per op (``ops/<op>.py``) holds its public function, its ``torch.library`` custom
ops (forward and backward, each with a fake) and their registered autograd, so
``torch.compile`` traces them without graph breaks. The calling convention between an op and
its backends is described in docs/ops.md.

The op modules share their names with the functions exported here; reach a module itself
through ``importlib.import_module("unipelt_fast.ops.<op>")``.
"""

from __future__ import annotations

from .bias_only_layer_norm import bias_only_layer_norm
from .bias_only_linear import bias_only_linear
from .gated_adapter import gated_adapter
from .prefix_attention import dropout_seed, prefix_attention

__all__ = [
    "bias_only_layer_norm",
    "bias_only_linear",
    "dropout_seed",
    "gated_adapter",
    "prefix_attention",
]
