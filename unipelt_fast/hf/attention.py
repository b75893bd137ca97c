"""The "unipelt" attention function registered with transformers, and its BERT 4.x shim."""

from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .masks import layer_masks
from .root import SITE_ATTR

ATTN_NAME = "unipelt"


def _fallback_attention():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def unipelt_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """The "unipelt" attention function: prefix attention for the attention modules that
    apply_unipelt gave a prefix site, sdpa for everything else. Returns HF's (B, Lq, H, D)
    layout."""
    site = module.__dict__.get(SITE_ATTR)  # hf.root.Site: its prefix rows, gate and masks
    root = None if site is None else site.root
    if root is None or root.prefix is None:
        return _fallback_attention()(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    causal = bool(getattr(module, "is_causal", False))
    if attention_mask is None and kwargs.get("is_causal") is not None:
        causal = bool(kwargs["is_causal"])
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    position_bias = kwargs.get("position_bias")  # T5: (1 or B, H, Lq, Lk), no mask in it
    kpm, causal, key, value = layer_masks(
        root, attention_mask, causal, query, key, value, window, site.keys_of
    )
    pk, pv = root.layer_prefix(site.index)
    attn_bias = None
    if position_bias is not None:
        # Token keys keep their relative positions; prefix keys get 0. Under PEFT the bias
        # is frozen, and kernel backends take no bias gradient: detach for them.
        bias = position_bias[..., : key.shape[2]]  # a static cache's unwritten slots dropped
        if root.backend != "eager":
            bias = bias.detach()
        attn_bias = F.pad(bias, (pk.shape[2], 0))
    gate = root.gate_slots.pop(site.index, None)  # hooks.prefix_gate_pre_hook's
    B = query.shape[0]
    if gate is not None and gate.shape[0] != B:
        if B % gate.shape[0]:  # never drop the gate silently
            raise ValueError(
                f"unipelt attention: the prefix gate has {gate.shape[0]} rows for a batch of {B}"
            )
        gate = gate.repeat_interleave(B // gate.shape[0], 0)  # e.g. expanded beams
    out = ops.prefix_attention(
        query,
        key,
        value,
        pk.to(query.dtype) if not torch.is_autocast_enabled(query.device.type) else pk,
        pv.to(query.dtype) if not torch.is_autocast_enabled(query.device.type) else pv,
        prefix_index=root.prefix_index(B, query.device),
        prefix_gate=gate,
        key_padding_mask=kpm,
        causal=causal,
        softmax_scale=scaling,
        attn_bias=attn_bias,
        # HF passes its attention-probability dropout already 0 outside training; eval mode
        # stays exact even if a caller passes it anyway (as HF eager attention does).
        dropout_p=float(dropout) if module.training else 0.0,
        backend=root.backend,
    )
    # out has query's layout ((B, L, H, D) underneath for HF), so this copies nothing.
    return out.transpose(1, 2).contiguous(), None


def _uses_attention_interface(module: nn.Module) -> bool:
    """Does this attention module dispatch through transformers' attention registry? (BERT
    and RoBERTa do from transformers 5; on 4.x they compute attention themselves.)"""
    mod = sys.modules.get(type(module).__module__)
    return mod is not None and hasattr(mod, "ALL_ATTENTION_FUNCTIONS")


def _legacy_bert_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    past_key_values=None,
    output_attentions: bool = False,
    *args,
    **kwargs,
):
    """BertSelfAttention.forward for transformers 4.x (encoder self-attention), on
    :func:`unipelt_attention`. Returns (context, None) like the original."""
    if encoder_hidden_states is not None or past_key_values is not None:
        raise NotImplementedError("unipelt: legacy BERT attention with a cache/cross-attention")
    if output_attentions or head_mask is not None:
        raise NotImplementedError("unipelt: output_attentions / head_mask with the prefix")
    if getattr(self, "position_embedding_type", "absolute") != "absolute":
        raise NotImplementedError("unipelt: relative position embeddings with the prefix")
    B, L, _ = hidden_states.shape
    H, D = self.num_attention_heads, self.attention_head_size

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, L, H, D).transpose(1, 2)

    q, k, v = (
        heads(self.query(hidden_states)),
        heads(self.key(hidden_states)),
        heads(self.value(hidden_states)),
    )
    drop = getattr(self.dropout, "p", 0.0) if self.training else 0.0  # 4.x: nn.Dropout
    out, _ = unipelt_attention(self, q, k, v, attention_mask, scaling=D**-0.5, dropout=drop)
    return out.reshape(B, L, H * D), None


_registered = False


def _register() -> None:
    """Register the attention and mask functions with transformers (once per process)."""
    global _registered
    if _registered:
        return
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_NAME, unipelt_attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # older masking: models build their own 4-D masks, converted above
        pass
    else:
        sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]

        def unipelt_mask(*args, **kwargs):
            kwargs["allow_is_causal_skip"] = False  # keep padding visible to the converter
            return sdpa_mask(*args, **kwargs)

        AttentionMaskInterface.register(ATTN_NAME, unipelt_mask)
    _registered = True
