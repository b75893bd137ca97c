"""bias_only_linear: the public op, its custom ops (forward, backward, fakes) and autograd.

Backend contract (every backend module, see docs/ops.md)::

    forward(a: BiasOnlyLinearArgs) -> (y, pre)
    backward(a, grad_y, saved) -> (dx, dbias)

``a`` is canonical: x (M, K), weight (N, K) frozen, bias (N,), activation a name
("identity" for none). y (M, N) contiguous; pre the pre-activation x @ weight.T + bias,
(M, N) in x's dtype, for gelu/gelu_tanh/silu/tanh, else (0,). x is never saved: in
backward a.x and a.bias are empty placeholders, and saved is pre (gelu/gelu_tanh/silu/tanh),
y (relu: act'(pre) = y > 0) or (0,) (identity). dbias is reduced deterministically; no
weight gradient is ever computed.
"""

from __future__ import annotations

import torch

from .. import _backend, reference
from .._args import BiasOnlyLinearArgs, flatten, grads, op_schema, unflatten
from .._validation import check_activation, check_backend_dtype, validate_bias_only_linear
from ._common import EMPTY, autocast, save_args, saved_args

Tensor = torch.Tensor
Args = BiasOnlyLinearArgs


@torch.library.custom_op(
    "unipelt_fast::bias_only_linear", mutates_args=(), schema=op_schema(Args, 2)
)
def _bias_only_linear_op(*flat) -> tuple[Tensor, Tensor]:
    _, a, _, backend = unflatten(Args, flat)
    return _backend.kernel_impl("bias_only_linear", backend).forward(a)


@_bias_only_linear_op.register_fake
def _(*flat):
    _, a, _, _ = unflatten(Args, flat)
    M, N = a.x.shape[0], a.weight.shape[0]
    no_pre = a.activation in ("identity", "relu")
    return a.x.new_empty(M, N), a.x.new_empty(EMPTY) if no_pre else a.x.new_empty(M, N)


@torch.library.custom_op(
    "unipelt_fast::bias_only_linear_backward",
    mutates_args=(),
    schema=op_schema(Args, 2, before=("grad_y",), after=("saved",)),
)
def _bias_only_linear_bwd_op(*flat) -> tuple[Tensor, Tensor]:
    (grad_y,), a, (saved,), backend = unflatten(Args, flat, 1)
    return _backend.kernel_impl("bias_only_linear", backend).backward(a, grad_y, saved)


@_bias_only_linear_bwd_op.register_fake
def _(*flat):
    (grad_y,), a, _, _ = unflatten(Args, flat, 1)
    return grad_y.new_empty(grad_y.shape[0], a.weight.shape[1]), grad_y.new_empty(a.weight.shape[0])


def _setup(ctx, inputs, output):
    _, a, _, ctx.backend = unflatten(Args, inputs)
    y, pre = output
    # Never x: only the weight (frozen, already alive) and what act' needs. relu's
    # derivative reads the output itself, so it saves y instead of a pre-activation.
    save_args(ctx, a, y if a.activation == "relu" else pre, unsaved=("x", "bias"))
    ctx.mark_non_differentiable(pre)
    ctx.set_materialize_grads(False)  # else every backward fills an (M, N) zero grad for pre


def _backward(ctx, grad_y, _grad_pre):
    a, (saved,) = saved_args(ctx)
    flat = flatten(a, ctx.backend, before=(grad_y.contiguous(),), after=(saved,))
    dx, dbias = _bias_only_linear_bwd_op(*flat)
    return grads(a, x=dx, bias=dbias)


_bias_only_linear_op.register_autograd(_backward, setup_context=_setup)


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
    x, weight, bias = autocast(x, weight, bias)
    a = validate_bias_only_linear(x, weight, bias, activation)
    be = _backend.resolve_backend(backend, x.device, "bias_only_linear", x.dtype)
    check_backend_dtype(x.dtype, be, "bias_only_linear")
    if be in ("eager", "torch"):  # the torch backend runs this op as eager
        return reference.bias_only_linear(**a._asdict())
    act = check_activation(activation, "bias_only_linear", allow_none=True)
    kernel_args = a._replace(x=x.reshape(-1, x.shape[-1]), activation=act)
    y, _ = _bias_only_linear_op(*flatten(kernel_args, be))
    return y.view(*x.shape[:-1], weight.shape[0])
