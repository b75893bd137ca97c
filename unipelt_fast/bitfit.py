"""BitFit: freeze every weight, train the biases, on the bias-only ops."""

from __future__ import annotations

import torch.nn as nn

from .modules import BiasOnlyLayerNorm, BiasOnlyLinear


def _hf_conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep BitFit usable without it
        return None
    return Conv1D


def bitfit(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Freeze every parameter except the biases of nn.Linear, nn.LayerNorm and HF's Conv1D,
    swapping those modules for :class:`BiasOnlyLinear` / :class:`BiasOnlyLayerNorm` (the
    same Parameter objects, so tied weights and optimizers see the same tensors).

    Modules without a bias (e.g. a tied lm_head) are left as they are, frozen. Returns the
    model, changed in place.
    """
    conv1d = _hf_conv1d_type()
    for p in model.parameters():
        p.requires_grad_(False)
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            new: nn.Module | None = None
            if isinstance(child, nn.Linear) and child.bias is not None:
                new = BiasOnlyLinear.from_linear(child, backend=backend)
            elif conv1d is not None and isinstance(child, conv1d) and child.bias is not None:
                new = BiasOnlyLinear(child.weight, child.bias, transposed=True, backend=backend)
            elif (
                isinstance(child, nn.LayerNorm)
                and child.weight is not None
                and child.bias is not None
                and len(child.normalized_shape) == 1
            ):
                new = BiasOnlyLayerNorm.from_layer_norm(child, backend=backend)
            if new is not None:
                swaps.append((parent, name, new))
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return model
