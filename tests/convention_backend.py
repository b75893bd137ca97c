"""A pure-PyTorch implementation of the kernel calling convention (see docs/ops.md).

It lets CPU tests exercise the torch.library wiring (fake impls, registered autograd,
torch.compile tracing, opcheck) without any kernel. Backward recomputes with autograd.
"""

from __future__ import annotations

import importlib
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
def _pa_kwargs(a) -> dict:
    """The reference's keywords: every field but the kernel-only seed (no dropout here)."""
    if a.dropout_p > 0:
        raise NotImplementedError("prefix_attention: the convention backend has no dropout")
    kw = a._asdict()
    del kw["seed"]
    return kw


def pa_forward(a):
    kw = _pa_kwargs(a)
    out = reference.prefix_attention(**kw).contiguous()
    del kw["v"], kw["prefix_v"], kw["dropout_p"]
    lse = reference.prefix_attention_lse(**kw).float()
    return out, lse


def pa_backward(a, grad_out, out, lse):
    def f(q, k, v, pk, pv, gate, sinks):
        b = a._replace(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, prefix_gate=gate, sinks=sinks)
        return reference.prefix_attention(**_pa_kwargs(b))

    live = [a.q, a.k, a.v, a.prefix_k, a.prefix_v, a.prefix_gate, a.sinks]
    return _vjp(f, live, grad_out)


# ---- gated_adapter -------------------------------------------------------------------------
def ga_forward(a):
    out = reference.gated_adapter(**a._asdict()).contiguous()
    x, idx = a.x, a.adapter_index
    M = x.shape[0] * x.shape[1]
    z = reference.task_linear(x, a.w_down, a.b_down, idx).float().reshape(M, -1)
    s = (
        x.new_empty(0, dtype=torch.float32)
        if a.w_gate is None
        else reference.task_linear(x, a.w_gate, a.b_gate, idx).float().reshape(M)
    )
    return out, z, s


def ga_backward(a, grad_out, z, s):
    def f(x, wd, bd, wu, bu, wg, bg):
        res = None if a.residual is None else x.new_zeros(*x.shape[:-1], wu.shape[-2])
        return reference.gated_adapter(
            **a._replace(
                x=x, w_down=wd, b_down=bd, w_up=wu, b_up=bu, residual=res, w_gate=wg, b_gate=bg
            )._asdict()
        )

    return _vjp(f, [a.x, a.w_down, a.b_down, a.w_up, a.b_up, a.w_gate, a.b_gate], grad_out)


# ---- bias_only_linear ----------------------------------------------------------------------
def bl_forward(a):
    x, activation = a.x, a.activation
    pre = F.linear(x, a.weight, a.bias)
    y = reference.activation_fn(activation)(pre).contiguous()
    saved = x.new_empty(0) if activation in ("identity", "relu") else pre.contiguous()
    return y, saved


def bl_backward(a, grad_y, saved):
    activation = a.activation
    if activation == "identity":
        gp = grad_y
    elif activation == "relu":
        gp = grad_y * (saved > 0)
    else:
        (gp,) = _vjp(reference.activation_fn(activation), [saved], grad_y)
    return gp @ a.weight, gp.sum(0)


MODULES = {
    "prefix_attention": types.SimpleNamespace(forward=pa_forward, backward=pa_backward),
    "gated_adapter": types.SimpleNamespace(forward=ga_forward, backward=ga_backward),
    "bias_only_linear": types.SimpleNamespace(forward=bl_forward, backward=bl_backward),
}


def op_module(op: str):
    """The module ``unipelt_fast/ops/<op>.py`` (the package attribute of that name is the op)."""
    return importlib.import_module(f"unipelt_fast.ops.{op}")


def install(monkeypatch) -> None:
    """Route backend="triton" to this module on any device, for the current test."""
    from unipelt_fast import _backend

    monkeypatch.setattr(_backend, "kernel_impl", lambda op, backend: MODULES[op])
    monkeypatch.setattr(
        _backend,
        "resolve_backend",
        lambda backend, device, op, dtype=None: "eager" if backend == "eager" else "triton",
    )
