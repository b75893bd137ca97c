"""BitFit: freeze every weight, train the biases, on the bias-only ops."""

from __future__ import annotations

import functools
from collections.abc import Collection

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import BiasOnlyLayerNorm, BiasOnlyLinear


def _hf_conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep BitFit usable without it
        return None
    return Conv1D


# HF activation modules by class name (transformers.activations; names vary by version),
# each the same math as the named activation of bias_only_linear.
_HF_ACTIVATIONS = {
    "GELUActivation": "gelu",  # F.gelu, or its erf formula in python
    "NewGELUActivation": "gelu_tanh",  # the tanh formula written out
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "SiLUActivation": "silu",
}


def _activation_name(fn: object) -> str | None:
    """The bias_only_linear activation equal to ``fn``, or None when there is none."""
    if type(fn) in (nn.ReLU, nn.SiLU, nn.Tanh):
        return {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh"}[type(fn)]
    if type(fn) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(fn.approximate)
    if isinstance(fn, nn.Module):
        cls = type(fn)
        if cls.__module__ == "transformers.activations":
            return _HF_ACTIVATIONS.get(cls.__name__)
        return None
    if isinstance(fn, functools.partial):
        if fn.func is F.gelu and not fn.args and fn.keywords == {"approximate": "tanh"}:
            return "gelu_tanh"
        return None
    for f, name in ((F.gelu, "gelu"), (F.relu, "relu"), (F.silu, "silu"), (torch.tanh, "tanh")):
        if fn is f:
            return name
    return None


def _fuse_intermediate_activations(model: nn.Module, skip: Collection[int] = ()) -> None:
    """Move BERT-style ``intermediate_act_fn`` into the preceding BiasOnlyLinear.

    Only modules whose forward is BERT's ``dense -> intermediate_act_fn`` (the same code as
    BertIntermediate.forward: inherited, or "copied from" with identical bytecode), so the
    result is the same function; the activation then runs in the linear's fused passes.
    ``skip``: ids of intermediates left unfused (their dense gets LoRA, added before the
    activation).
    """
    try:
        from transformers.models.bert.modeling_bert import BertIntermediate
    except ImportError:
        return
    ref = BertIntermediate.forward.__code__
    for m in model.modules():
        code = getattr(getattr(type(m), "forward", None), "__code__", None)
        if code is None or (code.co_code, code.co_names) != (ref.co_code, ref.co_names):
            continue
        if id(m) in skip:
            continue
        dense = getattr(m, "dense", None)
        if not isinstance(dense, BiasOnlyLinear) or dense.activation not in (None, "identity"):
            continue
        name = _activation_name(getattr(m, "intermediate_act_fn", None))
        if name is not None:
            dense.activation = name
            m.intermediate_act_fn = nn.Identity()


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is stored quantized: not a plain floating tensor (bitsandbytes'
    Params4bit / Int8Params hold integers; torchao's weights are tensor subclasses). A
    sharded (DTensor) weight is judged by its local shard."""
    data = weight.data
    if hasattr(data, "to_local") and hasattr(data, "device_mesh"):  # DTensor (FSDP2)
        data = data.to_local()
    return not data.is_floating_point() or type(data) is not torch.Tensor


def bitfit(model: nn.Module, *, backend: str = "auto", fuse_activations: bool = True) -> nn.Module:
    """Freeze every parameter except the biases of nn.Linear, nn.LayerNorm and HF's Conv1D,
    swapping those modules for :class:`BiasOnlyLinear` / :class:`BiasOnlyLayerNorm` (the
    same Parameter objects, so tied weights and optimizers see the same tensors).

    With ``fuse_activations`` (default), the activation after a BERT-style intermediate
    dense (``BertIntermediate`` and its copies: RoBERTa, ELECTRA, ...) moves into that
    BiasOnlyLinear, so the kernels fuse it; the function computed is unchanged.

    A Linear whose weight is quantized (:func:`is_quantized`: bitsandbytes ``Linear4bit`` /
    ``Linear8bitLt``, a torchao-quantized ``nn.Linear``) stays as it is, its quantized weight
    frozen, and trains its bias through its own forward (which adds the bias after the
    quantized matmul): the bias-only kernels need a dense weight, and a dense copy of a
    quantized weight is what quantizing the base avoids.

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
            linear = isinstance(child, nn.Linear) and child.bias is not None
            if linear and is_quantized(child.weight):  # kept: its forward adds the bias
                child.bias.requires_grad_(True)
            elif linear:
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
    if fuse_activations:
        _fuse_intermediate_activations(model)
    return model
