"""The public ops: one interface over the eager reference and the kernel backends.

Each op validates its inputs (shared by every backend), picks a backend, then either runs
the eager reference (plain PyTorch autograd) or a ``torch.library`` custom op whose forward
and backward call the kernel backend. The custom ops carry fake (meta) implementations and
registered autograd, so ``torch.compile`` traces them without graph breaks.

Kernel calling convention
-------------------------
A kernel backend module (``unipelt_fast.kernels.<op>`` for triton, ``_cuda.op_module(op)``
for cuda) exposes ``forward`` and ``backward``. Inputs arrive validated and canonical:

prefix_attention
    ``forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_gate, key_padding_mask,
    causal, softmax_scale[, attn_bias=][, dropout_p=, seed=]) -> (out, lse)``
      q (B, H, Lq, D); k, v (B, Hkv, Lk, D); prefix_k, prefix_v (T, Hkv, P, D); all with
      any strides. prefix_index int64 (B,) in [0, T). prefix_gate None or float32 (B, 2)
      contiguous, columns (key gate, value gate). key_padding_mask None or bool (B, Lk).
      attn_bias, passed (as a keyword) only when the caller gave one: a (B, H, Lq, P + Lk)
      view in q's dtype or float32, stride 0 on broadcast dims (never materialised; read
      it with its strides), columns [prefix ; tokens]. It is added to the logits after
      the key gate scaled the prefix logits, before the masks; it never requires grad.
      dropout_p, seed, passed (as keywords) only when dropout_p > 0: the attention-dropout
      probability in (0, 1) and an int64 (1,) tensor on q's device, drawn by
      :func:`dropout_seed` from torch's generator (read it on the device: no host sync).
      The same (seed, dropout_p) must give the same keep-mask in forward and backward;
      lse stays that of the un-dropped softmax. A backend without dropout raises
      NotImplementedError naming dropout (cuda does, before any launch).
      out: (B, H, Lq, D), q's dtype, dense in q's dimension order
      (``_alloc.new_output_like(q)``: for HF's (B, L, H, D)-strided q, ``out.transpose(1, 2)``
      is contiguous). A backend may return it contiguous instead; the op then copies it
      into that layout (the triton backend writes it there directly). lse: float32
      (B, H, Lq), in units the same backend's backward understands.
    ``backward(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_gate,
    key_padding_mask, out, lse, causal, softmax_scale[, attn_bias=][, dropout_p=, seed=]) ->
    (dq, dk, dv, dprefix_k, dprefix_v, dprefix_gate)``
      grad_out (B, H, Lq, D) and out (as forward returned it) with any strides (a backend
      that needs them contiguous copies them). dq, dk, dv: dense in q's, k's, v's
      dimension order (a backend returning them contiguous gets them copied into that
      layout; triton writes them there). dprefix_* are (T, Hkv, P, D), summed
      deterministically over the examples (and query heads) that used each task.
      dprefix_gate float32 (B, 2), or None when prefix_gate is None. attn_bias as in
      forward (no gradient is returned for it).

gated_adapter
    ``forward(x, w_down, b_down, w_up, b_up, residual, w_gate, b_gate, gate_mask,
    gate_mode, activation, scaling, *, adapter_index=None) -> (out, z, s)``
      x (B, L, d) any strides; residual None (meaning x) or (B, L, d_out), where d_out =
      w_up's rows (d when residual is None). Biases, w_gate, b_gate, gate_mask may be None;
      gate_mask only with gate_mode "mean".
      adapter_index None (weights w_down (r, d), b_down (r,), w_up (d, r), b_up (d,),
      w_gate (1, d), b_gate (1,)) or int64 (B,), the task of each example, with the same
      weights stacked per task: (T, r, d), (T, r), (T, d_out, r), (T, d_out), (T, 1, d),
      (T, 1).
      Its range was checked under the same rule as prefix_index; a backend must still
      never read out of bounds for an out-of-range entry (clamp or guard). A backend
      without mixed-task support raises NotImplementedError naming adapter_index.
      out: (B, L, d_out) contiguous, x's dtype. z: float32 (B*L, r), the pre-activation
      bottleneck x @ w_down.T + b_down. s: float32 (B*L,) gate logits, or (0,) with no gate.
    ``backward(grad_out, x, w_down, b_down, w_up, b_up, residual_is_x, w_gate, b_gate,
    gate_mask, z, s, gate_mode, activation, scaling, *, adapter_index=None) -> (dx,
    dw_down, db_down, dw_up, db_up, dw_gate, db_gate)``
      grad_out (B, L, d_out) contiguous. dx (B, L, d) includes grad_out when
      residual_is_x. A gradient is None where its parameter is None. (d residual is
      grad_out itself, handled here.)
      With adapter_index the weight gradients have the stacked shapes, each task's summed
      deterministically over the examples that used it (zero for an unused task).

bias_only_linear
    ``forward(x, weight, bias, activation) -> (y, pre)``
      x (M, K); weight (N, K) frozen; bias (N,); activation a name ("identity" for none).
      y (M, N) contiguous; pre: the pre-activation x @ weight.T + bias, (M, N) in x's
      dtype, for gelu/gelu_tanh/silu/tanh; (0,) for identity and relu. x is never saved.
    ``backward(grad_y, weight, saved, activation) -> (dx, dbias)``
      saved is pre for gelu/gelu_tanh/silu/tanh, y for relu (act'(pre) = y > 0), and
      (0,) for identity. dbias is reduced deterministically. No weight gradient is ever
      computed.

bias_only_layer_norm
    ``forward(x, weight, bias, eps) -> (y, mean, rstd)``
      x (M, N); weight (N,) frozen gamma; bias (N,) trainable beta. y (M, N) contiguous in
      x's dtype; mean, rstd float32 (M,).
    ``backward(grad_y, x, weight, mean, rstd) -> (dx, dbias)``
      grad_y contiguous. dbias reduced deterministically; d gamma is never computed.
"""

from __future__ import annotations

import torch

from . import composite, reference
from ._alloc import dense_strides, new_output_like
from ._backend import kernel_impl, resolve_backend
from ._validation import (
    check_activation,
    check_backend_dtype,
    validate_bias_only_layer_norm,
    validate_bias_only_linear,
    validate_gated_adapter,
    validate_prefix_attention,
)

Tensor = torch.Tensor
_EMPTY = (0,)


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under autocast (on the first tensor's device), cast floating inputs to the autocast
    dtype: custom ops are not autocast-aware, and validation rejects mixed dtypes."""
    first = tensors[0]
    # Meta tensors (shape inference) have no autocast: asking would raise before validation.
    if not isinstance(first, Tensor) or first.device.type == "meta":
        return tensors
    if not torch.is_autocast_enabled(first.device.type):
        return tensors
    dt = torch.get_autocast_dtype(first.device.type)
    return tuple(
        t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dt else t
        for t in tensors
    )


def _none_if_empty(t: Tensor, keep: bool) -> Tensor | None:
    return t if keep else None


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY) if t is None else t


# --------------------------------------------------------------------------------------------
# prefix_attention
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("unipelt_fast::prefix_attention", mutates_args=())
def _prefix_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    prefix_index: Tensor,
    prefix_gate: Tensor | None,
    key_padding_mask: Tensor | None,
    causal: bool,
    softmax_scale: float,
    backend: str,
    attn_bias: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    impl = kernel_impl("prefix_attention", backend)
    out, lse = impl.forward(
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_index,
        prefix_gate,
        key_padding_mask,
        causal,
        softmax_scale,
        **_bias_kw(attn_bias),
        **_dropout_kw(dropout_p, seed),
    )
    return _in_layout_of(q, out), lse


def _in_layout_of(q: Tensor, out: Tensor) -> Tensor:
    """``out`` laid out like ``new_output_like(q)`` (the fake's strides), copied only if not."""
    if out.stride() == dense_strides(q):
        return out
    return new_output_like(q).copy_(out)


def _fake_in_layout_of(t: Tensor) -> Tensor:
    return torch.empty_strided(t.shape, dense_strides(t), dtype=t.dtype, device=t.device)


@_prefix_attention_op.register_fake
def _(
    q,
    k,
    v,
    prefix_k,
    prefix_v,
    prefix_index,
    prefix_gate,
    key_padding_mask,
    causal,
    softmax_scale,
    backend,
    attn_bias=None,
    dropout_p=0.0,
    seed=None,
):
    B, H, Lq, D = q.shape
    return _fake_in_layout_of(q), q.new_empty(B, H, Lq, dtype=torch.float32)


@torch.library.custom_op("unipelt_fast::prefix_attention_backward", mutates_args=())
def _prefix_attention_bwd_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    prefix_index: Tensor,
    prefix_gate: Tensor | None,
    key_padding_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    softmax_scale: float,
    backend: str,
    attn_bias: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = kernel_impl("prefix_attention", backend)
    dq, dk, dv, dpk, dpv, dg = impl.backward(
        grad_out,
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_index,
        prefix_gate,
        key_padding_mask,
        out,
        lse,
        causal,
        softmax_scale,
        **_bias_kw(attn_bias),
        **_dropout_kw(dropout_p, seed),
    )
    # dq/dk/dv in their inputs' layouts (what the fake says; triton writes them there), so
    # HF's transposed views take them back without a copy; the prefix grads contiguous.
    dq, dk, dv = _in_layout_of(q, dq), _in_layout_of(k, dk), _in_layout_of(v, dv)
    return dq, dk, dv, dpk.contiguous(), dpv.contiguous(), _or_empty(dg, lse)


@_prefix_attention_bwd_op.register_fake
def _(
    grad_out,
    q,
    k,
    v,
    prefix_k,
    prefix_v,
    prefix_index,
    prefix_gate,
    key_padding_mask,
    out,
    lse,
    causal,
    softmax_scale,
    backend,
    attn_bias=None,
    dropout_p=0.0,
    seed=None,
):
    dg = lse.new_empty(_EMPTY) if prefix_gate is None else torch.empty_like(prefix_gate)
    return (
        _fake_in_layout_of(q),
        _fake_in_layout_of(k),
        _fake_in_layout_of(v),
        prefix_k.new_empty(prefix_k.shape),
        prefix_v.new_empty(prefix_v.shape),
        dg,
    )


def _bias_kw(attn_bias: Tensor | None) -> dict[str, Tensor]:
    # Passed only when given, so a backend written before attn_bias keeps working without.
    return {} if attn_bias is None else {"attn_bias": attn_bias}


def _dropout_kw(dropout_p: float, seed: Tensor | None) -> dict:
    # Passed only with dropout, so p = 0 calls every backend exactly as before.
    return {} if dropout_p == 0 else {"dropout_p": dropout_p, "seed": seed}


def dropout_seed(device: torch.device) -> Tensor:
    """The attention-dropout seed of a kernel call: an int64 (1,) tensor drawn on ``device``
    from torch's default generator there (``torch.manual_seed`` reproduces it), without a
    host sync; the kernels read it through its pointer."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _prefix_attention_setup(ctx, inputs, output):
    q, k, v, pk, pv, idx, gate, kpm, causal, scale, backend, bias, drop_p, seed = inputs
    out, lse = output
    # The seed (8 bytes, only with dropout) regenerates the keep-mask: no mask is saved.
    ctx.save_for_backward(q, k, v, pk, pv, idx, gate, kpm, out, lse, bias, seed)
    ctx.causal, ctx.scale, ctx.backend, ctx.dropout_p = causal, scale, backend, drop_p
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled (B, H, Lq) grad for lse per backward


def _prefix_attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, pk, pv, idx, gate, kpm, out, lse, bias, seed = ctx.saved_tensors
    if grad_out is None:  # unreachable through out (lse is non-differentiable); be safe
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dpk, dpv, dg = _prefix_attention_bwd_op(
        grad_out,  # any strides (the HF path's dO is a transposed view): no copy
        q,
        k,
        v,
        pk,
        pv,
        idx,
        gate,
        kpm,
        out,
        lse,
        ctx.causal,
        ctx.scale,
        ctx.backend,
        bias,
        ctx.dropout_p,
        seed,
    )
    dg = None if gate is None else dg
    return dq, dk, dv, dpk, dpv, None, dg, None, None, None, None, None, None, None


_prefix_attention_op.register_autograd(
    _prefix_attention_backward, setup_context=_prefix_attention_setup
)


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
        backend: "auto", "eager", "torch", "triton" or "cuda".

    Returns:
        (B, H, Lq, D) in q's dtype. A query row with no visible key gives 0.
    """
    q, k, v, prefix_k, prefix_v = _autocast(q, k, v, prefix_k, prefix_v)
    if attn_bias is not None and attn_bias.dtype != torch.float32:
        (attn_bias,) = _autocast(q, attn_bias)[1:]
    validate_prefix_attention(
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_index,
        prefix_gate,
        key_padding_mask,
        causal,
        softmax_scale,
        attn_bias,
        dropout_p,
    )
    be = resolve_backend(backend, q.device, "prefix_attention", q.dtype)
    dropout_p = float(dropout_p)
    if dropout_p > 0 and be == "cuda":
        raise NotImplementedError(
            "prefix_attention: backend='cuda' does not implement attention dropout "
            "(dropout_p > 0); use backend='triton', 'torch' or 'eager', or dropout_p=0"
        )
    check_backend_dtype(q.dtype, be, "prefix_attention")
    if be not in ("eager", "torch") and attn_bias is not None and attn_bias.requires_grad:
        if torch.is_grad_enabled():
            raise NotImplementedError(
                f"prefix_attention: backend={be!r} does not differentiate attn_bias; detach it "
                "or use backend='eager'"
            )
    if be in ("eager", "torch"):
        impl = reference if be == "eager" else composite
        out = impl.prefix_attention(
            q,
            k,
            v,
            prefix_k,
            prefix_v,
            prefix_index=prefix_index,
            prefix_gate=prefix_gate,
            key_padding_mask=key_padding_mask,
            causal=causal,
            softmax_scale=softmax_scale,
            attn_bias=attn_bias,
            dropout_p=dropout_p,
        )
        return _in_layout_of(q, out)  # the same layout on every backend
    B, H, Lq, D = q.shape
    pk, pv, idx = _canonical_prefix(prefix_k, prefix_v, prefix_index, B)
    bias = None
    if attn_bias is not None:  # a 4-D view, stride 0 on broadcast dims (nothing copied)
        bias = attn_bias.detach().expand(B, H, Lq, pk.shape[2] + k.shape[2])
    gate = None
    if prefix_gate is not None:  # (B,) or (B, 2) -> float32 (B, 2); autograd sums back
        gate = prefix_gate.float().reshape(B, -1).expand(B, 2).contiguous()
    scale = float(D**-0.5 if softmax_scale is None else softmax_scale)
    seed = dropout_seed(q.device) if dropout_p > 0 else None
    out, _ = _prefix_attention_op(
        q, k, v, pk, pv, idx, gate, key_padding_mask, causal, scale, be, bias, dropout_p, seed
    )
    return out


# --------------------------------------------------------------------------------------------
# gated_adapter
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("unipelt_fast::gated_adapter", mutates_args=())
def _gated_adapter_op(
    x: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    residual: Tensor | None,
    w_gate: Tensor | None,
    b_gate: Tensor | None,
    gate_mask: Tensor | None,
    adapter_index: Tensor | None,
    gate_mode: str,
    activation: str,
    scaling: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    impl = kernel_impl("gated_adapter", backend)
    return impl.forward(
        x,
        w_down,
        b_down,
        w_up,
        b_up,
        residual,
        w_gate,
        b_gate,
        gate_mask,
        gate_mode,
        activation,
        scaling,
        adapter_index=adapter_index,
    )


@_gated_adapter_op.register_fake
def _(
    x,
    w_down,
    b_down,
    w_up,
    b_up,
    residual,
    w_gate,
    b_gate,
    gate_mask,
    adapter_index,
    gate_mode,
    activation,
    scaling,
    backend,
):
    B, L, d = x.shape
    r = w_down.shape[-2]
    s_len = 0 if w_gate is None else B * L
    return (
        x.new_empty(B, L, w_up.shape[-2]),
        x.new_empty(B * L, r, dtype=torch.float32),
        x.new_empty(s_len, dtype=torch.float32),
    )


@torch.library.custom_op("unipelt_fast::gated_adapter_backward", mutates_args=())
def _gated_adapter_bwd_op(
    grad_out: Tensor,
    x: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    residual_is_x: bool,
    w_gate: Tensor | None,
    b_gate: Tensor | None,
    gate_mask: Tensor | None,
    adapter_index: Tensor | None,
    z: Tensor,
    s: Tensor,
    gate_mode: str,
    activation: str,
    scaling: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = kernel_impl("gated_adapter", backend)
    grads = impl.backward(
        grad_out,
        x,
        w_down,
        b_down,
        w_up,
        b_up,
        residual_is_x,
        w_gate,
        b_gate,
        gate_mask,
        z,
        s,
        gate_mode,
        activation,
        scaling,
        adapter_index=adapter_index,
    )
    return tuple(_or_empty(g, z) for g in grads)


@_gated_adapter_bwd_op.register_fake
def _(
    grad_out,
    x,
    w_down,
    b_down,
    w_up,
    b_up,
    residual_is_x,
    w_gate,
    b_gate,
    gate_mask,
    adapter_index,
    z,
    s,
    gate_mode,
    activation,
    scaling,
    backend,
):
    like = lambda t: z.new_empty(_EMPTY) if t is None else torch.empty_like(t)
    return (
        torch.empty_like(x),
        like(w_down),
        like(b_down),
        like(w_up),
        like(b_up),
        like(w_gate),
        like(b_gate),
    )


def _gated_adapter_setup(ctx, inputs, output):
    (
        x,
        w_down,
        b_down,
        w_up,
        b_up,
        residual,
        w_gate,
        b_gate,
        gate_mask,
        adapter_index,
        gate_mode,
        activation,
        scaling,
        backend,
    ) = inputs
    _, z, s = output
    # x plus O(M * r): the bottleneck pre-activation z and gate logits s, never full-size.
    ctx.save_for_backward(
        x, w_down, b_down, w_up, b_up, w_gate, b_gate, gate_mask, adapter_index, z, s
    )
    ctx.residual_is_x = residual is None
    ctx.has = (b_down is not None, b_up is not None, w_gate is not None, b_gate is not None)
    ctx.args = (gate_mode, activation, scaling, backend)
    ctx.mark_non_differentiable(z, s)
    ctx.set_materialize_grads(False)  # else every backward fills zero grads for z and s


def _gated_adapter_backward(ctx, grad_out, _gz, _gs):
    x, w_down, b_down, w_up, b_up, w_gate, b_gate, gate_mask, idx, z, s = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    dx, dwd, dbd, dwu, dbu, dwg, dbg = _gated_adapter_bwd_op(
        grad_out,
        x,
        w_down,
        b_down,
        w_up,
        b_up,
        ctx.residual_is_x,
        w_gate,
        b_gate,
        gate_mask,
        idx,
        z,
        s,
        *ctx.args,
    )
    has_bd, has_bu, has_wg, has_bg = ctx.has
    d_residual = None if ctx.residual_is_x else grad_out
    return (
        dx,
        dwd,
        _none_if_empty(dbd, has_bd),
        dwu,
        _none_if_empty(dbu, has_bu),
        d_residual,
        _none_if_empty(dwg, has_wg),
        _none_if_empty(dbg, has_bg),
        None,
        None,
        None,
        None,
        None,
        None,
    )


_gated_adapter_op.register_autograd(_gated_adapter_backward, setup_context=_gated_adapter_setup)


def _as_blf(t: Tensor) -> Tensor:
    """(..., d) -> a (B, L, d) view where possible (token-gate rows need no batch structure)."""
    if t.dim() == 3:
        return t
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 1:
        return t.view(1, 1, -1)
    return t.reshape(1, -1, t.shape[-1])


def gated_adapter(
    x: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    *,
    residual: Tensor | None = None,
    w_gate: Tensor | None = None,
    b_gate: Tensor | None = None,
    gate_mode: str = "token",
    gate_mask: Tensor | None = None,
    activation: str = "relu",
    scaling: float = 1.0,
    adapter_index: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """``residual + g * scaling * (act(x @ w_down.T + b_down) @ w_up.T + b_up)``.

    Args:
        x: (..., d). w_down: (r, d), w_up: (d_out, r) (nn.Linear layout); either bias may be
            None. d_out is d unless a residual of another width is given.
        residual: (..., d_out); defaults to x (LoRA passes the base projection's output).
        w_gate, b_gate: (1, d) and (1,): gate logits ``x @ w_gate.T + b_gate``. No w_gate: g = 1.
        gate_mode: "token" (sigmoid per token, the paper) or "mean" (sigmoid averaged over the
            sequence dim -2 of a (B, L, d) x, the reference code).
        gate_mask: bool (B, L), True = real token: "mean" averages over real tokens only; an
            example with none gets g = 0.
        activation: relu, gelu, gelu_tanh, silu, tanh or identity.
        scaling: a constant multiplier.
        adapter_index: int64 (B,) task of each example of a (B, L, d) x (mixed-task batch):
            then every weight is stacked per task, w_down (T, r, d), b_down (T, r), w_up
            (T, d, r), b_up (T, d), w_gate (T, 1, d), b_gate (T, 1), and each example uses
            its own task's, exactly as if it ran alone. One launch whatever the tasks;
            weight gradients are summed per task over the examples that used it.
        backend: "auto", "eager", "torch", "triton" or "cuda".
    """
    x, w_down, b_down, w_up, b_up, residual, w_gate, b_gate = _autocast(
        x, w_down, b_down, w_up, b_up, residual, w_gate, b_gate
    )
    validate_gated_adapter(
        x,
        w_down,
        b_down,
        w_up,
        b_up,
        residual,
        w_gate,
        b_gate,
        gate_mode,
        gate_mask,
        activation,
        scaling,
        adapter_index,
    )
    be = resolve_backend(backend, x.device, "gated_adapter", x.dtype)
    check_backend_dtype(x.dtype, be, "gated_adapter")
    if be in ("eager", "torch"):  # the torch backend runs this op as eager
        return reference.gated_adapter(
            x,
            w_down,
            b_down,
            w_up,
            b_up,
            residual=residual,
            w_gate=w_gate,
            b_gate=b_gate,
            gate_mode=gate_mode,
            gate_mask=gate_mask,
            activation=activation,
            scaling=scaling,
            adapter_index=adapter_index,
        )
    if w_gate is None:
        gate_mode = "token"
    x3 = _as_blf(x)
    res3 = None if residual is None else _as_blf(residual)
    idx = None if adapter_index is None else adapter_index.long()
    out, _, _ = _gated_adapter_op(
        x3,
        w_down,
        b_down,
        w_up,
        b_up,
        res3,
        w_gate,
        b_gate,
        gate_mask,
        idx,
        gate_mode,
        activation,
        float(scaling),
        be,
    )
    return out.view(*x.shape[:-1], w_up.shape[-2])


# --------------------------------------------------------------------------------------------
# bias_only_linear
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("unipelt_fast::bias_only_linear", mutates_args=())
def _bias_only_linear_op(
    x: Tensor, weight: Tensor, bias: Tensor, activation: str, backend: str
) -> tuple[Tensor, Tensor]:
    return kernel_impl("bias_only_linear", backend).forward(x, weight, bias, activation)


@_bias_only_linear_op.register_fake
def _(x, weight, bias, activation, backend):
    M, N = x.shape[0], weight.shape[0]
    pre = x.new_empty(_EMPTY) if activation in ("identity", "relu") else x.new_empty(M, N)
    return x.new_empty(M, N), pre


@torch.library.custom_op("unipelt_fast::bias_only_linear_backward", mutates_args=())
def _bias_only_linear_bwd_op(
    grad_y: Tensor, weight: Tensor, saved: Tensor, activation: str, backend: str
) -> tuple[Tensor, Tensor]:
    return kernel_impl("bias_only_linear", backend).backward(grad_y, weight, saved, activation)


@_bias_only_linear_bwd_op.register_fake
def _(grad_y, weight, saved, activation, backend):
    return grad_y.new_empty(grad_y.shape[0], weight.shape[1]), grad_y.new_empty(weight.shape[0])


def _bias_only_linear_setup(ctx, inputs, output):
    _, weight, _, activation, backend = inputs
    y, pre = output
    # Never x: only the weight (frozen, already alive) and what act' needs. relu's
    # derivative reads the output itself, so it saves y instead of a pre-activation.
    saved = y if activation == "relu" else pre
    ctx.save_for_backward(weight, saved)
    ctx.args = (activation, backend)
    ctx.mark_non_differentiable(pre)
    ctx.set_materialize_grads(False)  # else every backward fills an (M, N) zero grad for pre


def _bias_only_linear_backward(ctx, grad_y, _grad_pre):
    weight, saved = ctx.saved_tensors
    dx, dbias = _bias_only_linear_bwd_op(grad_y.contiguous(), weight, saved, *ctx.args)
    return dx, None, dbias, None, None


_bias_only_linear_op.register_autograd(
    _bias_only_linear_backward, setup_context=_bias_only_linear_setup
)


def bias_only_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    *,
    activation: str | None = None,
    backend: str = "auto",
) -> Tensor:
    """``act(x @ weight.T + bias)`` for BitFit: gradients reach x and bias, never the weight.

    Args:
        x: (..., d_in). weight: (d_out, d_in), frozen (ValueError if it requires grad).
        bias: (d_out,). activation: None, relu, gelu, gelu_tanh, silu, tanh or identity.
        backend: "auto", "eager", "torch", "triton" or "cuda".
    """
    x, weight, bias = _autocast(x, weight, bias)
    validate_bias_only_linear(x, weight, bias, activation)
    act = check_activation(activation, "bias_only_linear", allow_none=True)
    be = resolve_backend(backend, x.device, "bias_only_linear", x.dtype)
    check_backend_dtype(x.dtype, be, "bias_only_linear")
    if be in ("eager", "torch"):  # the torch backend runs this op as eager
        return reference.bias_only_linear(x, weight, bias, activation=activation)
    y, _ = _bias_only_linear_op(x.reshape(-1, x.shape[-1]), weight, bias, act, be)
    return y.view(*x.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------------------------
# bias_only_layer_norm
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("unipelt_fast::bias_only_layer_norm", mutates_args=())
def _bias_only_layer_norm_op(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return kernel_impl("bias_only_layer_norm", backend).forward(x, weight, bias, eps)


@_bias_only_layer_norm_op.register_fake
def _(x, weight, bias, eps, backend):
    M = x.shape[0]
    f32 = torch.float32
    return x.new_empty(x.shape), x.new_empty(M, dtype=f32), x.new_empty(M, dtype=f32)


@torch.library.custom_op("unipelt_fast::bias_only_layer_norm_backward", mutates_args=())
def _bias_only_layer_norm_bwd_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, backend: str
) -> tuple[Tensor, Tensor]:
    impl = kernel_impl("bias_only_layer_norm", backend)
    return impl.backward(grad_y, x, weight, mean, rstd)


@_bias_only_layer_norm_bwd_op.register_fake
def _(grad_y, x, weight, mean, rstd, backend):
    return torch.empty_like(x), weight.new_empty(weight.shape)


def _bias_only_layer_norm_setup(ctx, inputs, output):
    x, weight, _, _, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.backend = backend
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero grads filled for mean and rstd


def _bias_only_layer_norm_backward(ctx, grad_y, _gm, _gr):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dbias = _bias_only_layer_norm_bwd_op(
        grad_y.contiguous(), x, weight, mean, rstd, ctx.backend
    )
    return dx, None, dbias, None, None


_bias_only_layer_norm_op.register_autograd(
    _bias_only_layer_norm_backward, setup_context=_bias_only_layer_norm_setup
)


def bias_only_layer_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> Tensor:
    """LayerNorm over the last dim for BitFit: gamma (``weight``) frozen, beta (``bias``)
    trained. Gradients reach x and bias; d gamma is never computed.

    Args:
        x: (..., d). weight: (d,), must not require grad (ValueError). bias: (d,).
        eps: added to the variance. backend: "auto", "eager", "torch", "triton" or "cuda".
    """
    x, weight, bias = _autocast(x, weight, bias)
    validate_bias_only_layer_norm(x, weight, bias, eps)
    be = resolve_backend(backend, x.device, "bias_only_layer_norm", x.dtype)
    check_backend_dtype(x.dtype, be, "bias_only_layer_norm")
    if be in ("eager", "torch"):  # the torch backend runs this op as eager
        return reference.bias_only_layer_norm(x, weight, bias, eps)
    y, _, _ = _bias_only_layer_norm_op(x.reshape(-1, x.shape[-1]), weight, bias, float(eps), be)
    return y.view(x.shape)
