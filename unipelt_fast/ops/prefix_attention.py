"""prefix_attention: the public op, its custom ops (forward, backward, fakes) and autograd.

Backend contract (every backend module, see docs/ops.md)::

    forward(a: PrefixAttentionArgs) -> (out, lse)
    backward(a, grad_out, out, lse) -> (dq, dk, dv, dprefix_k, dprefix_v, dprefix_gate, dsinks)

``a`` is canonical (:func:`_for_kernels`). out (B, H, Lq, D) in q's dtype, dense in q's
dimension order (returned contiguous, it is copied there); lse float32 (B, H, Lq) in units
the same backend's backward reads. grad_out and out have any strides. dq/dk/dv dense in
q's/k's/v's dimension order, dprefix_* (T, Hkv, P, D) summed deterministically per task,
dprefix_gate float32 (B, 2) or None, dsinks float32 (H,) or None (None without sinks).
No gradient for attn_bias. With dropout_p > 0, the same
seed gives the same keep-mask in forward and backward; lse is the un-dropped softmax's.
"""

from __future__ import annotations

import torch

from .. import _backend, composite, reference
from .._args import PrefixAttentionArgs, flatten, grads, op_schema, unflatten
from .._validation import check_backend_dtype, check_cuda_features, validate_prefix_attention
from ._common import (
    autocast,
    fake_in_layout_of,
    in_layout_of,
    or_empty,
    save_args,
    saved_args,
)

Tensor = torch.Tensor
Args = PrefixAttentionArgs


@torch.library.custom_op(
    "unipelt_fast::prefix_attention", mutates_args=(), schema=op_schema(Args, 2)
)
def _prefix_attention_op(*flat) -> tuple[Tensor, Tensor]:
    _, a, _, backend = unflatten(Args, flat)
    out, lse = _backend.kernel_impl("prefix_attention", backend).forward(a)
    return in_layout_of(a.q, out), lse


@_prefix_attention_op.register_fake
def _(*flat):
    _, a, _, _ = unflatten(Args, flat)
    B, H, Lq, _ = a.q.shape
    return fake_in_layout_of(a.q), a.q.new_empty(B, H, Lq, dtype=torch.float32)


@torch.library.custom_op(
    "unipelt_fast::prefix_attention_backward",
    mutates_args=(),
    schema=op_schema(Args, 7, before=("grad_out",), after=("out", "lse")),
)
def _prefix_attention_bwd_op(*flat) -> tuple[Tensor, ...]:
    (grad_out,), a, (out, lse), backend = unflatten(Args, flat, 1)
    impl = _backend.kernel_impl("prefix_attention", backend)
    dq, dk, dv, dpk, dpv, dg, ds = impl.backward(a, grad_out, out, lse)
    # dq/dk/dv in their inputs' layouts (what the fake says; triton writes them there), so
    # HF's transposed views take them back without a copy; the prefix grads contiguous.
    dq, dk, dv = in_layout_of(a.q, dq), in_layout_of(a.k, dk), in_layout_of(a.v, dv)
    return dq, dk, dv, dpk.contiguous(), dpv.contiguous(), or_empty(dg, lse), or_empty(ds, lse)


@_prefix_attention_bwd_op.register_fake
def _(*flat):
    _, a, (_, lse), _ = unflatten(Args, flat, 1)
    dg = or_empty(None, lse) if a.prefix_gate is None else torch.empty_like(a.prefix_gate)
    ds = or_empty(None, lse) if a.sinks is None else torch.empty_like(a.sinks)
    return (
        fake_in_layout_of(a.q),
        fake_in_layout_of(a.k),
        fake_in_layout_of(a.v),
        a.prefix_k.new_empty(a.prefix_k.shape),
        a.prefix_v.new_empty(a.prefix_v.shape),
        dg,
        ds,
    )


def dropout_seed(device: torch.device) -> Tensor:
    """The attention-dropout seed of a kernel call: an int64 (1,) tensor drawn on ``device``
    from torch's default generator there (``torch.manual_seed`` reproduces it), without a
    host sync; the kernels read it through its pointer."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _setup(ctx, inputs, output):
    _, a, _, ctx.backend = unflatten(Args, inputs)
    out, lse = output
    # The seed (8 bytes, only with dropout) regenerates the keep-mask: no mask is saved.
    save_args(ctx, a, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled (B, H, Lq) grad for lse per backward


def _backward(ctx, grad_out, _grad_lse):
    a, (out, lse) = saved_args(ctx)
    if grad_out is None:  # unreachable through out (lse is non-differentiable); be safe
        grad_out = torch.zeros_like(out)
    # grad_out keeps any strides (the HF path's dO is a transposed view): no copy.
    flat = flatten(a, ctx.backend, before=(grad_out,), after=(out, lse))
    dq, dk, dv, dpk, dpv, dg, ds = _prefix_attention_bwd_op(*flat)
    dg = None if a.prefix_gate is None else dg
    ds = None if a.sinks is None else ds
    return grads(a, q=dq, k=dk, v=dv, prefix_k=dpk, prefix_v=dpv, prefix_gate=dg, sinks=ds)


_prefix_attention_op.register_autograd(_backward, setup_context=_setup)


def _canonical_prefix(
    prefix_k: Tensor, prefix_v: Tensor, prefix_index: Tensor | None, batch: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Any layout -> (T, Hkv, P, D) plus an int64 (B,) index, as views (differentiable)."""
    if prefix_index is not None:
        return prefix_k, prefix_v, prefix_index.long()
    if prefix_k.dim() == 3:  # shared: one task, every example uses it
        idx = torch.zeros(batch, dtype=torch.long, device=prefix_k.device)
        return prefix_k.unsqueeze(0), prefix_v.unsqueeze(0), idx
    idx = torch.arange(batch, dtype=torch.long, device=prefix_k.device)  # one per example
    return prefix_k, prefix_v, idx


def _for_kernels(a: Args) -> Args:
    """The kernel form of validated arguments (views; differentiable where they were)."""
    B, H, Lq, D = a.q.shape
    pk, pv, idx = _canonical_prefix(a.prefix_k, a.prefix_v, a.prefix_index, B)
    bias = None
    if a.attn_bias is not None:  # a 4-D view, stride 0 on broadcast dims (nothing copied)
        bias = a.attn_bias.detach().expand(B, H, Lq, pk.shape[2] + a.k.shape[2])
    gate = None
    if a.prefix_gate is not None:  # (B,) or (B, 2) -> float32 (B, 2); autograd sums back
        gate = a.prefix_gate.float().reshape(B, -1).expand(B, 2).contiguous()
    scale = float(D**-0.5 if a.softmax_scale is None else a.softmax_scale)
    seed = dropout_seed(a.q.device) if a.dropout_p > 0 else None
    # (H,) -> dense float32 (the kernels read it so); autograd casts the gradient back.
    sinks = None if a.sinks is None else a.sinks.float().contiguous()
    return a._replace(
        sinks=sinks,
        prefix_k=pk,
        prefix_v=pv,
        prefix_index=idx,
        prefix_gate=gate,
        softmax_scale=scale,
        attn_bias=bias,
        seed=seed,
    )


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    *,
    prefix_index: Tensor | None = None,
    prefix_gate: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    attn_bias: Tensor | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    window: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Softmax attention over the concatenation [gated prefix ; tokens], without building it.

    Args:
        q: (B, H, Lq, D) queries, any strides.
        k, v: (B, Hkv, Lk, D) token keys and values; H % Hkv == 0 (GQA maps query head h
            to kv head h // (H // Hkv)).
        prefix_k, prefix_v: (Hkv, P, D) shared by the batch, (B, Hkv, P, D) one per example,
            or (T, Hkv, P, D) with ``prefix_index``. P may be 0.
        prefix_index: int64 (B,) task of each example, for the (T, Hkv, P, D) layout.
        prefix_gate: None, (B,) or (B, 2): multiplies each example's prefix keys (column 0)
            and prefix values (column 1); a (B,) gate does both. UniPELT's G_P.
        key_padding_mask: bool (B, Lk), True = real token. Masks token keys only.
        causal: token key j is visible to query i iff j <= i + (Lk - Lq). Prefix keys are
            always visible.
        softmax_scale: defaults to D ** -0.5 (T5 uses 1.0).
        attn_bias: None or a float tensor broadcastable to (B, H, Lq, P + Lk), q's dtype
            or float32, columns [prefix ; tokens] (e.g. T5's relative position bias, with
            zeros for the prefix columns). Added to the logits after the key gate has
            scaled the prefix logits and before the masks: logits = scale * q [g_k Pk ; K]^T
            + attn_bias. Keep it finite; mask with key_padding_mask/causal. Broadcast dims
            are read with stride 0, never materialised. The eager and torch backends
            differentiate it; kernel backends raise NotImplementedError for a bias that
            requires grad (T5's bias is frozen under PEFT).
        dropout_p: attention-probability dropout in [0, 1), over prefix and token keys,
            with 1/(1-p) rescaling (as HF eager/SDPA attention); applied whenever > 0, so
            pass 0 in eval. The mask comes from torch's default generator for q's device
            (``torch.manual_seed`` reproduces a call); triton regenerates it in backward
            (Philox), nothing is stored. The cuda backend raises NotImplementedError.
        softcap: logit soft-capping (Gemma 2): every logit s = scale * q.k (prefix and
            token) becomes softcap * tanh(s / softcap), before attn_bias is added and the
            masks apply (HF's order). None = off.
        sinks: (H,) float attention-sink logits (gpt-oss), one per query head: each row's
            softmax denominator gains exp(sinks[h]) (an extra column with a zero value),
            so the probabilities of the real keys sum to less than 1. Differentiated.
        window: sliding window over token keys: query i sees token key j iff
            (i + Lk - Lq) - j < window (bottom-right aligned as causal; HF's
            ``kv_idx > q_idx - sliding_window``). Combines with causal and
            key_padding_mask; prefix keys are always visible. None = off.
        backend: "auto", "eager", "torch", "triton" or "cuda".

    Returns:
        (B, H, Lq, D) in q's dtype. A query row with no visible key gives 0.
    """
    q, k, v, prefix_k, prefix_v = autocast(q, k, v, prefix_k, prefix_v)
    if attn_bias is not None and attn_bias.dtype != torch.float32:
        (attn_bias,) = autocast(q, attn_bias)[1:]
    a = validate_prefix_attention(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_gate, key_padding_mask, causal,
        softmax_scale, attn_bias, dropout_p, softcap, sinks, window,
    )  # fmt: skip
    be = _backend.resolve_backend(backend, q.device, "prefix_attention", q.dtype)
    if be == "cuda":
        check_cuda_features(a)
    check_backend_dtype(q.dtype, be, "prefix_attention")
    if be not in ("eager", "torch") and attn_bias is not None and attn_bias.requires_grad:
        if torch.is_grad_enabled():
            raise NotImplementedError(
                f"prefix_attention: backend={be!r} does not differentiate attn_bias; detach it "
                "or use backend='eager'"
            )
    if be in ("eager", "torch"):
        impl = reference if be == "eager" else composite
        kw = a._asdict()
        del kw["seed"]  # a kernel call's; eager and torch draw their own dropout mask
        return in_layout_of(q, impl.prefix_attention(**kw))  # the same layout everywhere
    out, _ = _prefix_attention_op(*flatten(_for_kernels(a), be))
    return out
