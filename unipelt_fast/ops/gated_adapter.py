"""gated_adapter: the public op, its custom ops (forward, backward, fakes) and autograd.

Backend contract (every backend module, see docs/ops.md)::

    forward(a: GatedAdapterArgs) -> (out, z, s)
    backward(a, grad_out, z, s) -> (dx, dw_down, db_down, dw_up, db_up, dw_gate, db_gate)

``a`` is canonical (:func:`_for_kernels`): x (B, L, d) any strides; residual None (x) or
(B, L, d_out); with adapter_index (int64 (B,)) every weight is stacked per task. An
out-of-range task must never be read out of bounds (clamp or guard); a backend without
mixed-task support raises NotImplementedError naming adapter_index. out (B, L, d_out)
contiguous in x's dtype; z float32 (B*L, r), the pre-activation bottleneck; s float32 (B*L,)
gate logits, or (0,) with no gate. In backward, residual is None when it was x (then dx
includes grad_out), else an empty placeholder; grad_out is contiguous; a gradient is None
where its parameter is None; per-task weight gradients are summed deterministically.
"""

from __future__ import annotations

import torch

from .. import _backend, reference
from .._args import GatedAdapterArgs, flatten, grads, op_schema, unflatten
from .._validation import check_backend_dtype, validate_gated_adapter
from ._common import autocast, fake_like, or_empty, save_args, saved_args

Tensor = torch.Tensor
Args = GatedAdapterArgs


@torch.library.custom_op("unipelt_fast::gated_adapter", mutates_args=(), schema=op_schema(Args, 3))
def _gated_adapter_op(*flat) -> tuple[Tensor, Tensor, Tensor]:
    _, a, _, backend = unflatten(Args, flat)
    return _backend.kernel_impl("gated_adapter", backend).forward(a)


@_gated_adapter_op.register_fake
def _(*flat):
    _, a, _, _ = unflatten(Args, flat)
    B, L, _ = a.x.shape
    s_len = 0 if a.w_gate is None else B * L
    return (
        a.x.new_empty(B, L, a.w_up.shape[-2]),
        a.x.new_empty(B * L, a.w_down.shape[-2], dtype=torch.float32),
        a.x.new_empty(s_len, dtype=torch.float32),
    )


@torch.library.custom_op(
    "unipelt_fast::gated_adapter_backward",
    mutates_args=(),
    schema=op_schema(Args, 7, before=("grad_out",), after=("z", "s")),
)
def _gated_adapter_bwd_op(*flat) -> tuple[Tensor, ...]:
    (grad_out,), a, (z, s), backend = unflatten(Args, flat, 1)
    grads_ = _backend.kernel_impl("gated_adapter", backend).backward(a, grad_out, z, s)
    return tuple(or_empty(g, z) for g in grads_)


@_gated_adapter_bwd_op.register_fake
def _(*flat):
    _, a, (z, _), _ = unflatten(Args, flat, 1)
    weights = (a.w_down, a.b_down, a.w_up, a.b_up, a.w_gate, a.b_gate)
    return (torch.empty_like(a.x), *(fake_like(t, z) for t in weights))


def _setup(ctx, inputs, output):
    _, a, _, ctx.backend = unflatten(Args, inputs)
    _, z, s = output
    # x plus O(M * r): the bottleneck pre-activation z and gate logits s, never full-size;
    # the residual is not kept (its gradient is grad_out).
    save_args(ctx, a, z, s, unsaved=("residual",))
    ctx.mark_non_differentiable(z, s)
    ctx.set_materialize_grads(False)  # else every backward fills zero grads for z and s


def _backward(ctx, grad_out, _gz, _gs):
    a, (z, s) = saved_args(ctx)
    grad_out = grad_out.contiguous()
    flat = flatten(a, ctx.backend, before=(grad_out,), after=(z, s))
    dx, dwd, dbd, dwu, dbu, dwg, dbg = _gated_adapter_bwd_op(*flat)
    given = lambda g, t: None if t is None else g  # noqa: E731 - empty stand-ins -> None
    return grads(
        a,
        x=dx,
        w_down=dwd,
        b_down=given(dbd, a.b_down),
        w_up=dwu,
        b_up=given(dbu, a.b_up),
        residual=given(grad_out, a.residual),
        w_gate=given(dwg, a.w_gate),
        b_gate=given(dbg, a.b_gate),
    )


_gated_adapter_op.register_autograd(_backward, setup_context=_setup)


def _for_kernels(a: Args) -> Args:
    """The kernel form of validated arguments (views)."""
    return a._replace(
        x=_as_blf(a.x),
        residual=None if a.residual is None else _as_blf(a.residual),
        gate_mode="token" if a.w_gate is None else a.gate_mode,
        scaling=float(a.scaling),
        adapter_index=None if a.adapter_index is None else a.adapter_index.long(),
    )


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
    x, w_down, b_down, w_up, b_up, residual, w_gate, b_gate = autocast(
        x, w_down, b_down, w_up, b_up, residual, w_gate, b_gate
    )
    a = validate_gated_adapter(
        x, w_down, b_down, w_up, b_up, residual, w_gate, b_gate, gate_mode, gate_mask,
        activation, scaling, adapter_index,
    )  # fmt: skip
    be = _backend.resolve_backend(backend, x.device, "gated_adapter", x.dtype)
    check_backend_dtype(x.dtype, be, "gated_adapter")
    if be in ("eager", "torch"):  # the torch backend runs this op as eager
        return reference.gated_adapter(**a._asdict())
    out, _, _ = _gated_adapter_op(*flatten(_for_kernels(a), be))
    return out.view(*x.shape[:-1], w_up.shape[-2])
