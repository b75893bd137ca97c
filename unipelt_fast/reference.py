"""Eager PyTorch reference for every op: the spec that each backend is checked against.

Plain, readable PyTorch. Inputs are assumed valid (the public ops validate first).
Attention math runs in at least float32 so fp16/bf16 inputs get a reference-quality result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def activation_fn(name: str | None):
    """The elementwise activation called ``name`` (None means identity)."""
    return {
        None: lambda t: t,
        "identity": lambda t: t,
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "silu": F.silu,
        "tanh": torch.tanh,
    }[name]


def select_prefix(
    prefix: torch.Tensor, prefix_index: torch.Tensor | None, batch: int
) -> torch.Tensor:
    """Each example's prefix, (B, Hkv, P, D), from any of the three layouts."""
    if prefix_index is not None:
        # (T, Hkv, P, D) -> (B, Hkv, P, D). Out-of-range indices are clamped, as in every
        # kernel (validation rejects them only where reading them needs no device sync).
        return prefix[prefix_index.long().clamp(0, prefix.shape[0] - 1)]
    if prefix.dim() == 3:
        return prefix.unsqueeze(0).expand(batch, *prefix.shape)  # shared by the batch
    return prefix  # already one per example


def split_prefix_gate(prefix_gate: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key gate, value gate), each (B,): a (B,) gate serves both."""
    g = prefix_gate.reshape(batch, -1)
    return g[:, 0], g[:, -1]


def token_key_visibility(
    batch: int,
    lq: int,
    lk: int,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    device: torch.device,
    window: int | None = None,
) -> torch.Tensor:
    """Bool (B, 1, Lq, Lk): may query i see token key j (prefix keys are always visible).
    Both causal and window are bottom-right aligned: query i sits at key position
    i + (Lk - Lq), so with Lq < Lk the last query aligns with the last key (HF's decoding)."""
    vis = torch.ones(batch, 1, lq, lk, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        vis = vis & key_padding_mask[:, None, None, :]
    i = torch.arange(lq, device=device)[:, None] + (lk - lq)  # the query's key position
    j = torch.arange(lk, device=device)[None, :]
    if causal:
        vis = vis & (j <= i)
    if window is not None:  # the window keys ending at the query: i - j < window
        vis = vis & (i - j < window)
    return vis


def capped_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's logit soft-capping, softcap * tanh(logits / softcap) (identity for None).
    Applied to the scaled q.k logits, before attn_bias and the masks, as HF's
    eager_attention_forward does (its mask is added after the cap)."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


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
    dropout_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """softmax(cap(q [g_k*Pk ; K]^T * scale) + bias) [g_v*Pv ; V] with token-only masks;
    empty rows give 0.

    ``softcap``: cap(s) = softcap * tanh(s / softcap) on every logit (prefix and token),
    after the scale and the key gate, before ``attn_bias`` and the masks (HF Gemma 2).
    ``sinks`` (H,): one logit per query head that joins each row's softmax denominator as
    an extra column with a zero value (gpt-oss): probs = softmax([logits ; sink])[:-1].
    A row with no visible key still gives 0. ``window``: token key j is visible to query i
    iff (i + Lk - Lq) - j < window (see token_key_visibility); prefix keys always are.

    ``attn_bias`` (broadcastable to (B, H, Lq, P + Lk); columns [prefix ; tokens]) is added
    after the key gate has scaled the prefix logits and before the masks, so the gate never
    scales the bias and a masked key stays masked whatever its bias.

    ``dropout_p`` > 0 drops attention probabilities (prefix and token keys alike) and scales
    the kept ones by 1 / (1 - dropout_p), as HF's eager attention does. The keep-mask is
    ``dropout_mask`` (bool, broadcastable to (B, H, Lq, P + Lk)) when given, e.g. a triton
    call's from ``kernels.prefix_attention.dropout_keep_mask``; otherwise a Bernoulli(1 - p)
    draw from torch's generator."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    acc = torch.promote_types(q.dtype, torch.float32)

    pk = select_prefix(prefix_k, prefix_index, B).to(acc)
    pv = select_prefix(prefix_v, prefix_index, B).to(acc)
    P = pk.shape[2]
    if prefix_gate is not None:
        gk, gv = split_prefix_gate(prefix_gate.to(acc), B)
        pk = pk * gk[:, None, None, None]
        pv = pv * gv[:, None, None, None]

    keys = torch.cat([pk, k.to(acc)], dim=2)
    values = torch.cat([pv, v.to(acc)], dim=2)
    group = H // Hkv  # GQA: query head h reads kv head h // group (HF's repeat_kv)
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)

    logits = torch.matmul(q.to(acc), keys.transpose(-1, -2)) * scale  # (B, H, Lq, P+Lk)
    logits = capped_logits(logits, softcap)
    if attn_bias is not None:
        logits = logits + attn_bias.to(acc)
    tok_vis = token_key_visibility(B, Lq, Lk, key_padding_mask, causal, q.device, window)
    visible = torch.cat([tok_vis.new_ones(B, 1, Lq, P), tok_vis], dim=-1)
    logits = logits.masked_fill(~visible, float("-inf"))
    if sinks is not None:  # the sink column: always visible, its value is 0
        sink_col = sinks.to(acc)[None, :, None, None].expand(B, H, Lq, 1)
        logits = torch.cat([logits, sink_col], dim=-1)
        visible = torch.cat([visible.expand(B, H, Lq, P + Lk), visible.new_ones(B, H, Lq, 1)], -1)
    # A row with no visible key outputs 0. Zeroing its logits first keeps softmax (and its
    # backward) free of NaN; the probabilities are then zeroed.
    row_ok = visible.any(dim=-1, keepdim=True)
    logits = torch.where(row_ok, logits, torch.zeros_like(logits))
    probs = torch.softmax(logits, dim=-1) * row_ok
    if sinks is not None:
        probs = probs[..., :-1]  # the sink's probability goes nowhere
    if dropout_p > 0:
        keep = dropout_mask
        if keep is None:
            keep = torch.bernoulli(torch.full_like(probs, 1.0 - dropout_p)).bool()
        probs = torch.where(keep, probs / (1.0 - dropout_p), torch.zeros_like(probs))
    return torch.matmul(probs, values).to(q.dtype)


def prefix_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    prefix_k: torch.Tensor,
    *,
    prefix_index: torch.Tensor | None = None,
    prefix_gate: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Row log-sum-exp (natural log) of the scaled logits, (B, H, Lq); -inf for empty rows.
    With ``sinks`` the sink logit is one of the row's terms (so a row is never empty).

    Kernels save this for backward; it is exposed so their saved state can be checked too.
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    acc = torch.promote_types(q.dtype, torch.float32)
    pk = select_prefix(prefix_k, prefix_index, B).to(acc)
    if prefix_gate is not None:
        pk = pk * split_prefix_gate(prefix_gate.to(acc), B)[0][:, None, None, None]
    keys = torch.cat([pk, k.to(acc)], dim=2).repeat_interleave(H // Hkv, dim=1)
    logits = capped_logits(torch.matmul(q.to(acc), keys.transpose(-1, -2)) * scale, softcap)
    if attn_bias is not None:
        logits = logits + attn_bias.to(acc)
    tok_vis = token_key_visibility(B, Lq, Lk, key_padding_mask, causal, q.device, window)
    visible = torch.cat([tok_vis.new_ones(B, 1, Lq, pk.shape[2]), tok_vis], dim=-1)
    logits = logits.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        logits = torch.cat([logits, sinks.to(acc)[None, :, None, None].expand(B, H, Lq, 1)], -1)
    return torch.logsumexp(logits, dim=-1)


def task_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapter_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias``: shared (out, in) weights, or with ``adapter_index`` (B,) each
    example b of a (B, L, in) x uses its task's row of (T, out, in) weights and (T, out) bias."""
    if adapter_index is None:
        return F.linear(x, weight, bias)
    idx = adapter_index.long()
    y = torch.bmm(x, weight[idx].transpose(1, 2))  # (B, L, in) @ (B, in, out)
    return y if bias is None else y + bias[idx].unsqueeze(1)


def adapter_gate(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    b_gate: torch.Tensor | None,
    gate_mode: str,
    gate_mask: torch.Tensor | None,
    adapter_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gate g, broadcastable against x: (..., 1) per token, or (B, 1, 1) for "mean".

    "mean" averages sigmoid(logit) over the sequence dim; with ``gate_mask`` only over real
    tokens. An example with no real token gets g = 0 (its output is the residual).
    """
    g = torch.sigmoid(task_linear(x, w_gate, b_gate, adapter_index))  # (..., 1)
    if gate_mode == "token":
        return g
    if gate_mask is None:
        return g.mean(dim=-2, keepdim=True)
    m = gate_mask.unsqueeze(-1)
    # where, not g * m: a NaN/inf in an excluded (padding) token must not reach the mean.
    total = torch.where(m, g, torch.zeros_like(g)).sum(dim=-2, keepdim=True)
    return total / m.sum(dim=-2, keepdim=True).clamp_min(1).to(g.dtype)


def gated_adapter(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    *,
    residual: torch.Tensor | None = None,
    w_gate: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
    gate_mode: str = "token",
    gate_mask: torch.Tensor | None = None,
    activation: str = "relu",
    scaling: float = 1.0,
    adapter_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """residual + g * scaling * (act(x @ w_down.T + b_down) @ w_up.T + b_up).

    With ``adapter_index`` (B,), the weights are stacked per task (leading dim T) and each
    example uses its own task's: exactly what running that example alone would give.
    """
    idx = adapter_index
    h = activation_fn(activation)(task_linear(x, w_down, b_down, idx))
    u = task_linear(h, w_up, b_up, idx)
    out = u * scaling
    if w_gate is not None:
        out = out * adapter_gate(x, w_gate, b_gate, gate_mode, gate_mask, idx)
    return (x if residual is None else residual) + out


def bias_only_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, activation: str | None = None
) -> torch.Tensor:
    """act(x @ weight.T + bias), with the weight frozen."""
    return activation_fn(activation)(F.linear(x, weight, bias))


def bias_only_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dim with a frozen gamma (weight) and a trainable beta (bias)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
