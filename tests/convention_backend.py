"""A pure-PyTorch implementation of the kernel calling convention (see unipelt_fast/ops.py).

It lets CPU tests exercise the torch.library wiring (fake impls, registered autograd,
torch.compile tracing, opcheck) without any kernel. Backward recomputes with autograd.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from unipelt_fast import reference


def _vjp(fn, inputs, grad_out):
    """Gradients of fn(*inputs) for each non-None input (None stays None).

    torch.func.vjp, because a custom op's body runs below the autograd dispatch key, where
    torch.autograd.grad would see no graph.
    """
    live = [i for i, t in enumerate(inputs) if t is not None]

    def f(*ts):
        full = list(inputs)
        for i, t in zip(live, ts, strict=True):
            full[i] = t
        return fn(*full)

    _, pull = torch.func.vjp(f, *[inputs[i] for i in live])
    got = dict(zip(live, pull(grad_out), strict=True))
    return tuple(got.get(i) for i in range(len(inputs)))


# ---- prefix_attention ----------------------------------------------------------------------
def pa_forward(q, k, v, pk, pv, idx, gate, kpm, causal, scale, attn_bias=None):
    kw = dict(
        prefix_index=idx, prefix_gate=gate, key_padding_mask=kpm, causal=causal, softmax_scale=scale
    )
    kw["attn_bias"] = attn_bias
    out = reference.prefix_attention(q, k, v, pk, pv, **kw).contiguous()
    lse = reference.prefix_attention_lse(q, k, pk, **kw).float()
    return out, lse


def pa_backward(grad_out, q, k, v, pk, pv, idx, gate, kpm, out, lse, causal, scale, attn_bias=None):
    def f(q, k, v, pk, pv, gate):
        return reference.prefix_attention(
            q,
            k,
            v,
            pk,
            pv,
            prefix_index=idx,
            prefix_gate=gate,
            key_padding_mask=kpm,
            causal=causal,
            softmax_scale=scale,
            attn_bias=attn_bias,
        )

    return _vjp(f, [q, k, v, pk, pv, gate], grad_out)


# ---- gated_adapter -------------------------------------------------------------------------
def ga_forward(
    x, wd, bd, wu, bu, residual, wg, bg, gate_mask, gate_mode, activation, scaling, *,
    adapter_index=None,
):  # fmt: skip
    out = reference.gated_adapter(
        x,
        wd,
        bd,
        wu,
        bu,
        residual=residual,
        w_gate=wg,
        b_gate=bg,
        gate_mode=gate_mode,
        gate_mask=gate_mask,
        activation=activation,
        scaling=scaling,
        adapter_index=adapter_index,
    ).contiguous()
    M = x.shape[0] * x.shape[1]
    z = reference.task_linear(x, wd, bd, adapter_index).float().reshape(M, -1)
    s = (
        x.new_empty(0, dtype=torch.float32)
        if wg is None
        else reference.task_linear(x, wg, bg, adapter_index).float().reshape(M)
    )
    return out, z, s


def ga_backward(
    grad_out,
    x,
    wd,
    bd,
    wu,
    bu,
    residual_is_x,
    wg,
    bg,
    gate_mask,
    z,
    s,
    gate_mode,
    activation,
    scaling,
    *,
    adapter_index=None,
):
    def f(x, wd, bd, wu, bu, wg, bg):
        res = None if residual_is_x else x.new_zeros(*x.shape[:-1], wu.shape[-2])
        return reference.gated_adapter(
            x,
            wd,
            bd,
            wu,
            bu,
            residual=res,
            w_gate=wg,
            b_gate=bg,
            gate_mode=gate_mode,
            gate_mask=gate_mask,
            activation=activation,
            scaling=scaling,
            adapter_index=adapter_index,
        )

    return _vjp(f, [x, wd, bd, wu, bu, wg, bg], grad_out)


# ---- bias_only_linear ----------------------------------------------------------------------
def bl_forward(x, weight, bias, activation):
    pre = F.linear(x, weight, bias)
    y = reference.activation_fn(activation)(pre).contiguous()
    saved = x.new_empty(0) if activation in ("identity", "relu") else pre.contiguous()
    return y, saved


def bl_backward(grad_y, weight, saved, activation):
    if activation == "identity":
        gp = grad_y
    elif activation == "relu":
        gp = grad_y * (saved > 0)
    else:
        (gp,) = _vjp(reference.activation_fn(activation), [saved], grad_y)
    return gp @ weight, gp.sum(0)


MODULES = {
    "prefix_attention": types.SimpleNamespace(forward=pa_forward, backward=pa_backward),
    "gated_adapter": types.SimpleNamespace(forward=ga_forward, backward=ga_backward),
    "bias_only_linear": types.SimpleNamespace(forward=bl_forward, backward=bl_backward),
}


def install(monkeypatch) -> None:
    """Route backend="triton" to this module on any device, for the current test."""
    import unipelt_fast.ops as ops

    monkeypatch.setattr(ops, "kernel_impl", lambda op, backend: MODULES[op])
    monkeypatch.setattr(
        ops,
        "resolve_backend",
        lambda backend, device, op, dtype=None: "eager" if backend == "eager" else "triton",
    )
