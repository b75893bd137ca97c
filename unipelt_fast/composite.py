"""The ``torch`` backend: composites of fused torch ops, fast on a CPU (not the spec).

prefix_attention runs ``F.scaled_dot_product_attention`` on ``[gated prefix ; tokens]``
with an explicit boolean mask, so torch's fused attention kernel runs in the inputs' dtype
and never builds the fp32 probability matrix the eager reference does (twice). The other
ops are the eager reference itself (already a single fused torch call or close to it).
Autograd is torch's own. Inputs arrive validated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .reference import select_prefix, split_prefix_gate, token_key_visibility


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    prefix_index: torch.Tensor | None = None,
    prefix_gate: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Same result as ``reference.prefix_attention`` (rows with no visible key give 0).
    An ``attn_bias`` becomes SDPA's float mask (masked keys -inf), which SDPA materialises.
    ``dropout_p`` is SDPA's own attention dropout (its mask, from torch's generator).
    ``window`` joins SDPA's boolean mask. SDPA has no logit soft-cap and no sink column, so
    with ``softcap`` or ``sinks`` this runs the reference's math (autograd differentiates it)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    pk = select_prefix(prefix_k, prefix_index, B)
    pv = select_prefix(prefix_v, prefix_index, B)
    P = pk.shape[2]
    # No key at all (SDPA would give NaN): the reference's zeros; and what SDPA cannot do.
    if P + Lk == 0 or softcap is not None or sinks is not None:
        return reference.prefix_attention(
            q, k, v, prefix_k, prefix_v, prefix_index=prefix_index, prefix_gate=prefix_gate,
            key_padding_mask=key_padding_mask, causal=causal, softmax_scale=softmax_scale,
            attn_bias=attn_bias, dropout_p=dropout_p, softcap=softcap, sinks=sinks,
            window=window,
        )  # fmt: skip
    if prefix_gate is not None:
        gk, gv = split_prefix_gate(prefix_gate.to(q.dtype), B)
        pk = pk * gk[:, None, None, None]
        pv = pv * gv[:, None, None, None]
    keys = torch.cat([pk, k], dim=2)
    values = torch.cat([pv, v], dim=2)

    mask = empty = None
    if key_padding_mask is not None or causal or window is not None:
        tok = token_key_visibility(B, Lq, Lk, key_padding_mask, causal, q.device, window)
        if P == 0:  # only then can a row see no key: let SDPA see all, zero the row after
            empty = ~tok.any(dim=-1, keepdim=True)  # (B, 1, Lq, 1)
            tok = tok | empty
        mask = torch.cat([tok.new_ones(B, 1, Lq, P), tok], dim=-1)
    if attn_bias is not None:  # additive float mask: the bias, -inf where masked
        bias = attn_bias.to(q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale,
        enable_gqa=H != Hkv,
    )  # fmt: skip
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out
