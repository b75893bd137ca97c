"""bias_only_layer_norm: the public op, its custom ops (forward, backward, fakes) and autograd.

Backend contract (every backend module, see docs/ops.md)::

    forward(a: BiasOnlyLayerNormArgs) -> (y, mean, rstd)
    backward(a, grad_y, mean, rstd) -> (dx, dbias)

``a`` is canonical: x (M, N), weight (N,) frozen gamma, bias (N,) trainable beta, eps a
float. y (M, N) contiguous in x's dtype; mean, rstd float32 (M,). In backward a.bias is an
empty placeholder and grad_y is contiguous; dbias is reduced deterministically and d gamma
is never computed.
"""

from __future__ import annotations

import torch

from .. import _backend, reference
from .._args import BiasOnlyLayerNormArgs, flatten, grads, op_schema, unflatten
from .._validation import check_backend_dtype, validate_bias_only_layer_norm
from ._common import autocast, save_args, saved_args

Tensor = torch.Tensor
Args = BiasOnlyLayerNormArgs


@torch.library.custom_op(
    "unipelt_fast::bias_only_layer_norm", mutates_args=(), schema=op_schema(Args, 3)
)
def _bias_only_layer_norm_op(*flat) -> tuple[Tensor, Tensor, Tensor]:
    _, a, _, backend = unflatten(Args, flat)
    return _backend.kernel_impl("bias_only_layer_norm", backend).forward(a)


@_bias_only_layer_norm_op.register_fake
def _(*flat):
    _, a, _, _ = unflatten(Args, flat)
    M = a.x.shape[0]
    f32 = torch.float32
    return a.x.new_empty(a.x.shape), a.x.new_empty(M, dtype=f32), a.x.new_empty(M, dtype=f32)


@torch.library.custom_op(
    "unipelt_fast::bias_only_layer_norm_backward",
    mutates_args=(),
    schema=op_schema(Args, 2, before=("grad_y",), after=("mean", "rstd")),
)
def _bias_only_layer_norm_bwd_op(*flat) -> tuple[Tensor, Tensor]:
    (grad_y,), a, (mean, rstd), backend = unflatten(Args, flat, 1)
    return _backend.kernel_impl("bias_only_layer_norm", backend).backward(a, grad_y, mean, rstd)


@_bias_only_layer_norm_bwd_op.register_fake
def _(*flat):
    _, a, _, _ = unflatten(Args, flat, 1)
    return torch.empty_like(a.x), a.weight.new_empty(a.weight.shape)


def _setup(ctx, inputs, output):
    _, a, _, ctx.backend = unflatten(Args, inputs)
    _, mean, rstd = output
    save_args(ctx, a, mean, rstd, unsaved=("bias",))
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero grads filled for mean and rstd


def _backward(ctx, grad_y, _gm, _gr):
    a, (mean, rstd) = saved_args(ctx)
    flat = flatten(a, ctx.backend, before=(grad_y.contiguous(),), after=(mean, rstd))
    dx, dbias = _bias_only_layer_norm_bwd_op(*flat)
    return grads(a, x=dx, bias=dbias)


_bias_only_layer_norm_op.register_autograd(_backward, setup_context=_setup)


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
    x, weight, bias = autocast(x, weight, bias)
    a = validate_bias_only_layer_norm(x, weight, bias, eps)
    be = _backend.resolve_backend(backend, x.device, "bias_only_layer_norm", x.dtype)
    check_backend_dtype(x.dtype, be, "bias_only_layer_norm")
    if be in ("eager", "torch"):  # the torch backend runs this op as eager
        return reference.bias_only_layer_norm(**a._asdict())
    kernel_args = a._replace(x=x.reshape(-1, x.shape[-1]), eps=float(eps))
    y, _, _ = _bias_only_layer_norm_op(*flatten(kernel_args, be))
    return y.view(x.shape)
