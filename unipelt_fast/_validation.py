"""Input validation shared by every backend.

Each public op calls its ``validate_*`` function before anything runs, so a bad input gets
the same ValueError/TypeError, naming the argument, whichever backend would have run. Each
returns the op's argument record (``_args``), which the op carries to its backend.
"""

from __future__ import annotations

import math
import os

import torch
from torch._subclasses.fake_tensor import is_fake

from ._args import (
    BiasOnlyLayerNormArgs,
    BiasOnlyLinearArgs,
    GatedAdapterArgs,
    PrefixAttentionArgs,
)

# Kernels support these; float64 is accepted by the eager reference only (for gradcheck).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EAGER_DTYPES = KERNEL_DTYPES + (torch.float64,)

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "identity")
GATE_MODES = ("token", "mean")


def _is_tensor(t: object) -> bool:
    return isinstance(t, torch.Tensor)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_tensor(
    t: object,
    name: str,
    op: str,
    *,
    ndim: int | tuple[int, ...] | None = None,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    floating: bool = True,
) -> torch.Tensor:
    """Type, rank, shape, dtype and device of one tensor argument."""
    if not _is_tensor(t):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    assert isinstance(t, torch.Tensor)
    if floating and t.dtype not in EAGER_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float16, bfloat16 or float32 (float64 for eager), got {t.dtype}"
        )
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in dims:
            want = " or ".join(f"{d}-D" for d in dims)
            raise ValueError(f"{op}: {name} must be {want}, got shape {_shape(t)}")
    if shape is not None and _shape(t) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {_shape(t)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(
            f"{op}: {name} must have dtype {dtype} (like the other inputs), got {t.dtype}"
        )
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")
    return t


def check_optional(t: object, name: str, op: str, **kw) -> torch.Tensor | None:
    return None if t is None else check_tensor(t, name, op, **kw)


def check_backend_dtype(dtype: torch.dtype, backend: str, op: str) -> None:
    if backend not in ("eager", "torch") and dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{op}: backend={backend!r} supports float16, bfloat16 and float32, got {dtype}; "
            "float64 runs on backend='eager' only"
        )


def check_activation(activation: object, op: str, *, allow_none: bool = False) -> str:
    if activation is None and allow_none:
        return "identity"
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        allowed = ACTIVATIONS + ((None,) if allow_none else ())
        raise ValueError(f"{op}: activation must be one of {allowed}, got {activation!r}")
    return activation


def _check_index(index: torch.Tensor, name: str, op: str, size: int, upper: int) -> None:
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"{op}: {name} must be an int64 (LongTensor) or int32 tensor, got {index.dtype}"
        )
    if _shape(index) != (size,):
        raise ValueError(
            f"{op}: {name} must have shape ({size},) (one entry per example), got {_shape(index)}"
        )
    # The range is read on the host only where that is free: CPU tensors outside
    # torch.compile / FakeTensorMode. Elsewhere (CUDA) reading it would sync on every call,
    # so it is skipped and every kernel clamps an out-of-range value to [0, upper - 1]
    # instead (never an out-of-bounds read). UNIPELT_CHECK_INDEX=1 checks there too (a sync).
    if index.numel() and _range_readable(index):
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= upper:
            raise ValueError(
                f"{op}: {name} values must lie in [0, {upper}), got min {lo}, max {hi}"
            )


def _range_readable(t: torch.Tensor) -> bool:
    """May validation read ``t``'s values without a device sync (or a trace break)?"""
    if torch.compiler.is_compiling() or is_fake(t) or t.device.type == "meta":
        return False
    return t.device.type == "cpu" or os.environ.get("UNIPELT_CHECK_INDEX") == "1"


def validate_prefix_attention(
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
    attn_bias=None,
    dropout_p=0.0,
    softcap=None,
    sinks=None,
    window=None,
) -> PrefixAttentionArgs:
    op = "prefix_attention"
    check_tensor(q, "q", op, ndim=4)
    B, H, Lq, D = _shape(q)
    dev, dt = q.device, q.dtype
    check_tensor(k, "k", op, ndim=4, dtype=dt, device=dev)
    Bk, Hkv, Lk, Dk = _shape(k)
    if Bk != B or Dk != D:
        raise ValueError(
            f"{op}: k must be (B, Hkv, Lk, D) with B={B} and D={D} from q {_shape(q)}, got {_shape(k)}"
        )
    check_tensor(v, "v", op, shape=_shape(k), dtype=dt, device=dev)
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"{op}: the number of query heads ({H}) must be a multiple of kv heads ({Hkv})"
        )
    if D == 0:
        raise ValueError(f"{op}: head dim D must be positive")
    check_tensor(prefix_k, "prefix_k", op, ndim=(3, 4), dtype=dt, device=dev)
    if prefix_index is None:
        lead = "(Hkv, P, D)" if prefix_k.dim() == 3 else "(B, Hkv, P, D)"
        want_lead = () if prefix_k.dim() == 3 else (B,)
    else:
        lead = "(T, Hkv, P, D) when prefix_index is given"
        if prefix_k.dim() != 4:
            raise ValueError(f"{op}: prefix_k must be {lead}, got shape {_shape(prefix_k)}")
        want_lead = (prefix_k.shape[0],)
    pk = _shape(prefix_k)
    if pk[:-3] != want_lead or pk[-3] != Hkv or pk[-1] != D:
        raise ValueError(
            f"{op}: prefix_k must be {lead} with B={B}, Hkv={Hkv}, D={D}, got shape {pk}"
        )
    check_tensor(prefix_v, "prefix_v", op, shape=pk, dtype=dt, device=dev)
    if prefix_index is not None:
        check_tensor(prefix_index, "prefix_index", op, device=dev, floating=False)
        if pk[0] == 0:
            raise ValueError(f"{op}: prefix_k has T=0 tasks, so prefix_index cannot pick one")
        _check_index(prefix_index, "prefix_index", op, B, pk[0])
    if prefix_gate is not None:
        check_tensor(prefix_gate, "prefix_gate", op, device=dev)
        if _shape(prefix_gate) not in ((B,), (B, 2)):
            raise ValueError(
                f"{op}: prefix_gate must have shape ({B},) or ({B}, 2) (key gate, value gate), "
                f"got {_shape(prefix_gate)}"
            )
    if key_padding_mask is not None:
        check_tensor(key_padding_mask, "key_padding_mask", op, device=dev, floating=False)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"{op}: key_padding_mask must be a bool tensor (True = real token), got {key_padding_mask.dtype}"
            )
        if _shape(key_padding_mask) != (B, Lk):
            raise ValueError(
                f"{op}: key_padding_mask must have shape ({B}, {Lk}), got {_shape(key_padding_mask)}"
            )
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, int | float):
            raise TypeError(
                f"{op}: softmax_scale must be a float or None, got {type(softmax_scale).__name__}"
            )
        if not (softmax_scale > 0 and math.isfinite(softmax_scale)):
            raise ValueError(
                f"{op}: softmax_scale must be positive and finite, got {softmax_scale}"
            )
    if attn_bias is not None:
        _check_attn_bias(attn_bias, (B, H, Lq, pk[-2] + Lk), dt, dev, op)
    dropout_p = check_dropout_p(dropout_p, op)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, int | float):
            raise TypeError(f"{op}: softcap must be a float or None, got {type(softcap).__name__}")
        if not (softcap > 0 and math.isfinite(softcap)):
            raise ValueError(f"{op}: softcap must be positive and finite, got {softcap}")
        softcap = float(softcap)
    if sinks is not None:
        check_tensor(sinks, "sinks", op, device=dev)
        if _shape(sinks) != (H,):
            raise ValueError(
                f"{op}: sinks must have shape ({H},) (one logit per query head), got {_shape(sinks)}"
            )
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"{op}: window must be an int or None, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"{op}: window must be >= 1 (query sees window token keys), got {window}")
    # The kernels read the (B,) index as dense: a strided view (ids[r::world]) would silently
    # pick other examples' tasks. B elements: the copy costs nothing, and syncs nothing.
    prefix_index = None if prefix_index is None else prefix_index.contiguous()
    return PrefixAttentionArgs(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_gate, key_padding_mask, causal,
        softmax_scale, attn_bias, dropout_p, None, softcap, sinks, window,
    )  # fmt: skip


def check_cuda_features(a: PrefixAttentionArgs) -> None:
    """The cuda backend implements none of the flags below: refuse them by name, before any
    launch (the op calls this; the backend's own entry points call it too)."""
    missing = [
        name
        for name, on in (
            ("attention dropout (dropout_p > 0)", a.dropout_p > 0),
            ("logit soft-capping (softcap)", a.softcap is not None),
            ("attention sinks (sinks)", a.sinks is not None),
            ("a sliding window (window)", a.window is not None),
        )
        if on
    ]
    if missing:
        raise NotImplementedError(
            f"prefix_attention: backend='cuda' does not implement {', '.join(missing)}; "
            "use backend='triton', 'torch' or 'eager'"
        )


def check_dropout_p(dropout_p: object, op: str) -> float:
    """A finite float probability in [0, 1) (1 would drop every key: no output to rescale)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, int | float):
        raise TypeError(f"{op}: dropout_p must be a float, got {type(dropout_p).__name__}")
    if not (math.isfinite(dropout_p) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{op}: dropout_p must be a finite float in [0, 1), got {dropout_p}")
    return float(dropout_p)


def _check_attn_bias(
    bias: object, full: tuple[int, ...], dt: torch.dtype, dev: torch.device, op: str
) -> None:
    """Broadcastable to ``full`` = (B, H, Lq, P + Lk); q's dtype or float32 (a float32 bias
    with half q keeps, e.g., T5's position bias exact); q's device."""
    check_tensor(bias, "attn_bias", op, device=dev)
    assert isinstance(bias, torch.Tensor)
    if bias.dtype not in (dt, torch.float32):
        raise TypeError(f"{op}: attn_bias must have q's dtype ({dt}) or float32, got {bias.dtype}")
    shp = _shape(bias)
    ok = len(shp) <= 4 and all(s in (1, f) for s, f in zip(shp[::-1], full[::-1], strict=False))
    if not ok:
        raise ValueError(
            f"{op}: attn_bias must be broadcastable to (B, H, Lq, P + Lk) = {full}, got {shp}"
        )


def validate_gated_adapter(
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
    adapter_index=None,
) -> GatedAdapterArgs:
    op = "gated_adapter"
    check_tensor(x, "x", op)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have a feature dim (..., d), got a scalar")
    d = x.shape[-1]
    dev, dt = x.device, x.dtype
    # With adapter_index every weight gains a leading task dim T (stacked per task).
    lead: tuple[int, ...] = ()
    if adapter_index is not None:
        if x.dim() != 3:
            raise ValueError(
                f"{op}: adapter_index needs x of shape (B, L, d), got x of shape {_shape(x)}"
            )
        check_tensor(adapter_index, "adapter_index", op, device=dev, floating=False)
        check_tensor(w_down, "w_down", op, ndim=3, dtype=dt, device=dev)
        lead = (w_down.shape[0],)
        if lead[0] == 0:
            raise ValueError(f"{op}: w_down has T=0 tasks, so adapter_index cannot pick one")
    else:
        check_tensor(w_down, "w_down", op, ndim=2, dtype=dt, device=dev)
    t_ = "T, " if lead else ""
    r = w_down.shape[-2]
    if w_down.shape[-1] != d or r == 0:
        raise ValueError(
            f"{op}: w_down must be ({t_}r, d) with d={d} and r >= 1, got {_shape(w_down)}"
        )
    # The output width d_out may differ from d (LoRA on a non-square projection) only with
    # a separate residual of that width.
    check_tensor(w_up, "w_up", op, ndim=len(lead) + 2, dtype=dt, device=dev)
    d_out = w_up.shape[-2]
    square = w_up.shape[-1] != r if residual is None else _shape(residual)[-1:] == (d,)
    if square:  # the usual adapter (d_out = d): say the exact shape wanted
        check_tensor(w_up, "w_up", op, shape=(*lead, d, r))
    if _shape(w_up) != (*lead, d_out, r) or d_out == 0:
        raise ValueError(
            f"{op}: w_up must be ({t_}d_out, r) with r={r} and d_out >= 1, got {_shape(w_up)}"
        )
    if d_out != d and residual is None:
        raise ValueError(
            f"{op}: w_up has d_out={d_out} != d={d}: pass a residual of width {d_out} "
            "(without one the residual is x, so d_out must equal d)"
        )
    check_optional(b_down, "b_down", op, shape=(*lead, r), dtype=dt, device=dev)
    check_optional(b_up, "b_up", op, shape=(*lead, d_out), dtype=dt, device=dev)
    if adapter_index is not None:
        _check_index(adapter_index, "adapter_index", op, x.shape[0], lead[0])
    res_shape = (*_shape(x)[:-1], d_out)
    check_optional(residual, "residual", op, shape=res_shape, dtype=dt, device=dev)
    if not isinstance(gate_mode, str) or gate_mode not in GATE_MODES:
        raise ValueError(f"{op}: gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
    if w_gate is None:
        if b_gate is not None:
            raise ValueError(f"{op}: b_gate was given without w_gate")
        if gate_mask is not None:
            raise ValueError(f"{op}: gate_mask was given without a gate (w_gate is None)")
    else:
        check_tensor(w_gate, "w_gate", op, dtype=dt, device=dev)
        if _shape(w_gate) != (*lead, 1, d):
            raise ValueError(
                f"{op}: w_gate must have shape {(*lead, 1, d)} (one gate logit), got {_shape(w_gate)}"
            )
        check_optional(b_gate, "b_gate", op, shape=(*lead, 1), dtype=dt, device=dev)
        if gate_mode == "mean" and x.dim() != 3:
            raise ValueError(
                f"{op}: gate_mode='mean' averages over the sequence of a (B, L, d) x, got x of shape {_shape(x)}"
            )
    if gate_mask is not None:
        if gate_mode != "mean":
            raise ValueError(f"{op}: gate_mask is only used with gate_mode='mean'")
        check_tensor(gate_mask, "gate_mask", op, device=dev, floating=False)
        if gate_mask.dtype != torch.bool:
            raise TypeError(
                f"{op}: gate_mask must be a bool tensor (True = real token), got {gate_mask.dtype}"
            )
        if _shape(gate_mask) != _shape(x)[:2]:
            raise ValueError(
                f"{op}: gate_mask must have shape {_shape(x)[:2]} (B, L), got {_shape(gate_mask)}"
            )
    check_activation(activation, op)
    if isinstance(scaling, bool) or not isinstance(scaling, int | float):
        raise TypeError(f"{op}: scaling must be a float, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"{op}: scaling must be finite, got {scaling}")
    # Read as dense by the kernels (see validate_prefix_attention): B and B*L elements.
    adapter_index = None if adapter_index is None else adapter_index.contiguous()
    gate_mask = None if gate_mask is None else gate_mask.contiguous()
    return GatedAdapterArgs(
        x, w_down, b_down, w_up, b_up, residual, w_gate, b_gate, gate_mode, gate_mask,
        activation, scaling, adapter_index,
    )  # fmt: skip


def validate_bias_only_linear(x, weight, bias, activation) -> BiasOnlyLinearArgs:
    op = "bias_only_linear"
    check_tensor(x, "x", op)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have a feature dim (..., d_in), got a scalar")
    check_tensor(weight, "weight", op, ndim=2, dtype=x.dtype, device=x.device)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{op}: weight must be (d_out, d_in) with d_in={x.shape[-1]}, got {_shape(weight)}"
        )
    if weight.requires_grad:
        raise ValueError(
            f"{op}: weight requires grad, but bias_only_linear trains the bias only; freeze it "
            "with weight.requires_grad_(False) (or use a normal nn.Linear to train it)"
        )
    if bias is None:
        raise ValueError(f"{op}: bias is required (it is the trained parameter)")
    check_tensor(bias, "bias", op, shape=(weight.shape[0],), dtype=x.dtype, device=x.device)
    check_activation(activation, op, allow_none=True)
    return BiasOnlyLinearArgs(x, weight, bias, activation)


def validate_bias_only_layer_norm(x, weight, bias, eps) -> BiasOnlyLayerNormArgs:
    op = "bias_only_layer_norm"
    check_tensor(x, "x", op)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty feature dim (..., d), got {_shape(x)}")
    d = x.shape[-1]
    check_tensor(weight, "weight", op, shape=(d,), dtype=x.dtype, device=x.device)
    if weight.requires_grad:
        raise ValueError(
            f"{op}: weight (gamma) requires grad, but bias_only_layer_norm trains the bias "
            "(beta) only; freeze it with weight.requires_grad_(False)"
        )
    if bias is None:
        raise ValueError(f"{op}: bias is required (it is the trained parameter)")
    check_tensor(bias, "bias", op, shape=(d,), dtype=x.dtype, device=x.device)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        raise ValueError(f"{op}: eps must be a positive float, got {eps!r}")
    return BiasOnlyLayerNormArgs(x, weight, bias, eps)
