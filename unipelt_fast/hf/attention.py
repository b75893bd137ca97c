"""The "unipelt" attention function registered with transformers, and its BERT 4.x shim."""

from __future__ import annotations

import functools
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


# ---- The attention contract (docs/attention-contract.md) -----------------------------------
# Every keyword argument transformers passes the attention function is implemented, refused
# when it is on, or listed here as unable to change the result. Anything else is refused:
# an argument this package has never seen might change the attention (a soft cap, sinks),
# and dropping it would give silently different answers.

# Implemented by unipelt_attention (and by sdpa on the fallback path).
IMPLEMENTED_KWARGS: frozenset[str] = frozenset(
    {
        "dropout",  # attention-probability dropout (dropout_p; 0 outside training)
        "scaling",  # softmax_scale (None: 1/sqrt(head_dim))
        "is_causal",  # transformers 5's causality override; 4.x GPT-2's sdpa dispatch hint
        "position_bias",  # T5's relative-position bias (attn_bias; prefix keys get 0)
        # Sliding windows (Mistral, Qwen2/3, Gemma 2/3 local layers, gpt-oss), peft's way:
        # the op's window= over token keys, the prefix (positions 0..P-1) windowed by a bias.
        # On the sdpa fallback HF's mask carries the window.
        "sliding_window",
    }
)

# Accepted when off (None, False, or as documented per entry); refused when on, naming the
# feature and what to do. name -> (feature, what to do).
REFUSED_WHEN_ON: dict[str, tuple[str, str]] = {
    # softcap, s_aux and sinks: implemented on the prefix path (PREFIX_PATH_KWARGS), refused
    # here only on the sdpa fallback (modules without a prefix), since sdpa has neither.
    "softcap": (
        "attention logit soft-capping (Gemma 2's config.attn_logit_softcapping, T5Gemma, "
        "VaultGemma) in a module without a prefix (the sdpa fallback)",
        "give every attention layer the prefix (PrefixConfig.layers), or train this model "
        "without the prefix (UniPELTConfig(prefix=None))",
    ),
    "s_aux": (
        "attention sinks (gpt-oss's per-head sink logits) in a module without a prefix (the "
        "sdpa fallback)",
        "give every attention layer the prefix (PrefixConfig.layers), or train this model "
        "without the prefix (UniPELTConfig(prefix=None)): LoRA, adapters and BitFit do not "
        "touch attention",
    ),
    "sinks": (
        "attention sinks (per-head sink logits) in a module without a prefix (the sdpa "
        "fallback)",
        "give every attention layer the prefix (PrefixConfig.layers), or train without the "
        "prefix (UniPELTConfig(prefix=None))",
    ),
    "output_attentions": (
        "output_attentions=True (attention probabilities as an output)",
        "the prefix kernels never materialize the probabilities; call the model without "
        "output_attentions",
    ),
    "head_mask": (
        "a head mask (transformers 4.x head_mask)",
        "scale the heads' outputs yourself, or run without the prefix",
    ),
    "cu_seq_lens_q": (
        "packed (padding-free) sequences (cu_seq_lens_q, from DataCollatorWithFlattening)",
        "use padded batches with an attention_mask",
    ),
    "cu_seq_lens_k": (
        "packed (padding-free) sequences (cu_seq_lens_k)",
        "use padded batches with an attention_mask",
    ),
    "max_length_q": (
        "packed (padding-free) sequences (max_length_q)",
        "use padded batches with an attention_mask",
    ),
    "max_length_k": (
        "packed (padding-free) sequences (max_length_k)",
        "use padded batches with an attention_mask",
    ),
    "seq_idx": (
        "packed (padding-free) sequences (seq_idx)",
        "use padded batches with an attention_mask",
    ),
}

# REFUSED_WHEN_ON entries that the prefix path implements (ops.prefix_attention's softcap and
# sinks); only the sdpa fallback refuses them.
PREFIX_PATH_KWARGS: frozenset[str] = frozenset({"softcap", "s_aux", "sinks"})

# Arguments that cannot change the attention result, each with the reason.
IGNORED_KWARGS: dict[str, str] = {
    "position_ids": "positions are already in q and k (rotary/absolute) when the attention "
    "function runs; packed sequences they imply arrive as the 4-D mask, which is checked",
    "cache_position": "the cache is already updated: key/value arrive with every cached "
    "position, and the mask says which are real",
    "use_cache": "the cache is already updated before the attention function runs",
    "past_key_values": "the cache is already updated before the attention function runs",
    "past_key_value": "the cache is already updated before the attention function runs",
    "output_hidden_states": "read by the model's output capture, not by attention",
    "output_router_logits": "MoE router outputs, read by the model, not by attention",
    "num_items_in_batch": "the loss's normalization, read by the loss, not by attention",
    "deterministic": "flash-attention's deterministic-backward switch (ModernBERT's "
    "deterministic_flash_attn): it picks how the flash kernels reduce, not what they compute",
    "encoder_hidden_states": "BERT-like self-attention passes its (unused) cross-attention "
    "input; keys and values arrive already projected",
}


def _kwarg_is_off(name: str, value, key: torch.Tensor) -> bool:
    """Is this REFUSED_WHEN_ON argument off (it cannot change the result)?"""
    return value is None or value is False


def _check_attention_kwargs(
    module: nn.Module, key: torch.Tensor, kwargs: dict, prefix: bool = True
) -> None:
    """Refuse, before any launch, every argument this function would otherwise drop.

    ``prefix`` False: the sdpa fallback (a module without a prefix)."""
    for name, value in kwargs.items():
        if name in IMPLEMENTED_KWARGS or name in IGNORED_KWARGS:
            continue
        where = f"{type(module).__name__} (model_type {_model_type(module)!r})"
        if name in REFUSED_WHEN_ON:
            if _kwarg_is_off(name, value, key):
                continue
            if prefix and name in PREFIX_PATH_KWARGS:
                continue
            feature, todo = REFUSED_WHEN_ON[name]
            shown = "a tensor" if isinstance(value, torch.Tensor) else repr(value)
            raise NotImplementedError(
                f"unipelt attention: {where} passes {name}={shown}: {feature} is not "
                f"supported by the unipelt attention; {todo}. See docs/attention-contract.md"
            )
        raise NotImplementedError(
            f"unipelt attention: {where} passes {name!r}, an argument the unipelt attention "
            "does not know; it might change the attention result, so it is refused rather "
            "than dropped. Use a transformers version this package supports, or train without "
            "the prefix (UniPELTConfig(prefix=None)); to support it, see "
            "docs/attention-contract.md"
        )


def _model_type(module: nn.Module) -> str | None:
    return getattr(getattr(module, "config", None), "model_type", None)


@functools.cache
def _tf_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def prefix_window_bias(
    query: torch.Tensor, n_prefix: int, n_keys: int, window: int | None
) -> torch.Tensor | None:
    """peft's sliding window over the prefix, as an additive (1, 1, Lq, P + Lk) bias, or None
    when every query sees every prefix key (decided from shapes: no host read).

    peft feeds the prefix as cached keys at positions 0..P-1 and the tokens at P.., so HF's
    window (query at position P + t sees position s iff P + t - s < window) reaches the
    prefix too: prefix key p is visible to token query t = i + Lk - Lq iff P + t - p < window.
    The op's ``window=`` keeps prefix keys visible and windows token keys by the same rule
    (both shifted by P). Masked prefix columns get finfo(float32).min (finite: the online
    softmax needs it; float32 so that a half-precision sum cannot overflow to -inf), token
    columns 0. A sliding-window cache that dropped keys holds window - 1 of them before the
    queries, and then no prefix key is visible to any query whatever their true positions:
    the key indices are exact enough."""
    Lq = query.shape[2]
    P = n_prefix
    # the largest P + t - p: the last query (t = Lk - 1) against prefix key 0
    if window is None or P == 0 or P + n_keys - 1 < window:
        return None
    dev = query.device
    t = torch.arange(Lq, device=dev)[:, None] + (n_keys - Lq)
    p = torch.arange(P, device=dev)[None, :]
    bias = torch.zeros(Lq, P + n_keys, device=dev)
    bias[:, :P].masked_fill_(P + t - p >= window, torch.finfo(torch.float32).min)
    return bias[None, None]  # the op reads the broadcast dims with stride 0


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
        _check_attention_kwargs(module, key, kwargs, prefix=False)
        return _fallback_attention()(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    _check_attention_kwargs(module, key, kwargs)
    causal = bool(getattr(module, "is_causal", False))
    is_causal = kwargs.get("is_causal")
    # Without a mask is_causal decides (as in sdpa). With one, transformers 5 passes it only
    # as the caller's causality override (its mask follows it too); 4.x GPT-2 passes False
    # with every mask as an sdpa dispatch hint, and the mask decides (hf.masks converts it).
    if is_causal is not None and (attention_mask is None or _tf_major() >= 5):
        causal = bool(is_causal)
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if window is not None and not causal and window < key.shape[2]:
        # the op's window limits keys from below only (a causal model's); a bidirectional
        # one (ModernBERT's local layers: |i - j| < window) would be silently wrong
        raise NotImplementedError(
            f"unipelt attention: {type(module).__name__} (model_type {_model_type(module)!r}) "
            f"passes sliding_window={window} ({key.shape[2]} keys) on bidirectional attention: "
            "a two-sided sliding-window attention (ModernBERT's local layers) is not supported "
            "with a prefix; train this model without the prefix (UniPELTConfig(prefix=None)), "
            "or keep sequences within the window. See docs/attention-contract.md"
        )
    position_bias = kwargs.get("position_bias")  # T5: (1 or B, H, Lq, Lk), no mask in it
    kpm, causal, key, value = layer_masks(
        root, attention_mask, causal, query, key, value, site.keys_of
    )
    pk, pv = root.layer_prefix(site.index)
    # peft's prefix window is a causal model's (past keys at positions 0..P-1); a bidirectional
    # model's window reaching every token key (else refused above) leaves the prefix visible
    attn_bias = prefix_window_bias(query, pk.shape[2], key.shape[2], window) if causal else None
    if window is not None and window >= key.shape[2]:
        window = None  # no token key outside it: the op's fast path
    if position_bias is not None and (window is not None or attn_bias is not None):
        raise NotImplementedError(
            "unipelt attention: a relative position bias together with a sliding window "
            "(no transformers family passes both)"
        )
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
        # Gemma 2's cap on every logit, prefix included; gpt-oss's per-head sink logits.
        softcap=kwargs.get("softcap"),
        sinks=kwargs.get("s_aux", kwargs.get("sinks")),
        window=window,
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
