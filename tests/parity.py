"""Parity harness shared by the per-op tests: random inputs, a float64 eager reference,
and relative-norm comparison of the output and of every gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from unipelt_fast.testing import assert_close


@dataclass
class Case:
    """Positional args, keyword args and the names of the args that require grad."""

    args: dict[str, object]  # positional, in order
    kwargs: dict[str, object] = field(default_factory=dict)
    diff: tuple[str, ...] = ()

    def cast(self, dtype: torch.dtype, from_case: Case | None = None) -> Case:
        """Floating tensors cast to ``dtype`` (strides kept), fresh leaves for ``diff``."""

        def conv(name, t):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                return t
            c = t.detach().to(dtype)
            return c.requires_grad_(name in self.diff)

        return Case(
            {n: conv(n, t) for n, t in self.args.items()},
            {n: conv(n, t) for n, t in self.kwargs.items()},
            self.diff,
        )

    def call(self, fn: Callable, **extra) -> torch.Tensor:
        return fn(*self.args.values(), **self.kwargs, **extra)

    def tensors(self, names) -> list[torch.Tensor]:
        both = {**self.args, **self.kwargs}
        return [both[n] for n in names]


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values with non-contiguous strides (a transposed copy, transposed back)."""
    if t.dim() < 2:
        return t.repeat_interleave(2)[::2]
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def check_parity(
    fn: Callable,
    case: Case,
    dtype: torch.dtype,
    backend: str,
    *,
    factor: float = 1.0,
    grad_factor: float | None = None,
    check_grads: bool = True,
) -> None:
    """``fn(..., backend=backend)`` in ``dtype`` against ``fn(..., backend="eager")`` in
    float64 on the same (dtype-rounded) inputs: output and the gradient of every ``diff``."""
    test = case.cast(dtype)
    ref = test.cast(torch.float64)
    out = test.call(fn, backend=backend)
    expected = ref.call(fn, backend="eager")
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    assert_close(out, expected, dtype, "out", factor)
    if not check_grads or not case.diff:
        return
    # Both sides get the same (dtype-rounded) upstream gradient: rounding it only for the
    # backend would blame the backend for the rounding (it matters for bf16 gate grads).
    g = torch.randn_like(expected).to(dtype).double()
    gt = torch.autograd.grad(out, test.tensors(case.diff), g.to(dtype), allow_unused=True)
    gr = torch.autograd.grad(expected, ref.tensors(case.diff), g, allow_unused=True)
    for name, a, e in zip(case.diff, gt, gr, strict=True):
        if e is None:
            e = torch.zeros_like(ref.tensors([name])[0])
        assert a is not None, f"d{name}: no gradient from backend {backend}"
        assert a.shape == e.shape, f"d{name}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
        assert_close(a, e, dtype, f"d{name}", grad_factor or factor)


# ---- case builders -------------------------------------------------------------------------


def prefix_attention_case(
    B=2,
    H=4,
    Hkv=2,
    Lq=7,
    Lk=7,
    P=3,
    D=16,
    *,
    layout="shared",
    T=3,
    gate=None,
    mask=False,
    fully_padded=False,
    causal=False,
    noncontiguous=False,
    scale=None,
    bias=None,
    bias_grad=False,
    device="cpu",
) -> Case:
    """layout: "shared" (Hkv, P, D), "batch" (B, Hkv, P, D) or "indexed" (T, Hkv, P, D).
    gate: None, "b" for (B,) or "b2" for (B, 2). mask: a random key_padding_mask;
    fully_padded: the last example has no real token. bias: an attn_bias shape spelled
    with b, h, q, k (= P + Lk) and 1, e.g. "bhqk", "1hqk", "b11k" or "k" (fewer dims);
    bias_grad: attn_bias requires grad (eager only)."""
    f = lambda *s: torch.randn(*s, dtype=torch.float64, device=device)
    if noncontiguous:  # HF hands over (B, L, H, D).transpose(1, 2)
        q = f(B, Lq, H, D).transpose(1, 2)
        k = f(B, Lk, Hkv, D).transpose(1, 2)
        v = f(B, Lk, Hkv, D).transpose(1, 2)
    else:
        q, k, v = f(B, H, Lq, D), f(B, Hkv, Lk, D), f(B, Hkv, Lk, D)
    lead = {"shared": (), "batch": (B,), "indexed": (T,)}[layout]
    pk, pv = f(*lead, Hkv, P, D), f(*lead, Hkv, P, D)
    if noncontiguous and P > 1:
        pk, pv = noncontig(pk), noncontig(pv)
    kw: dict[str, object] = {"causal": causal}
    diff = ["q", "k", "v", "prefix_k", "prefix_v"]
    if layout == "indexed":
        kw["prefix_index"] = torch.randint(0, T, (B,), device=device)
    if gate is not None:
        shape = (B,) if gate == "b" else (B, 2)
        kw["prefix_gate"] = torch.rand(*shape, dtype=torch.float64, device=device) * 0.8 + 0.1
        diff.append("prefix_gate")
    if mask or fully_padded:
        m = torch.rand(B, Lk, device=device) > 0.3
        m[:, 0] = True
        if fully_padded:
            m[-1] = False
        kw["key_padding_mask"] = m
    if scale is not None:
        kw["softmax_scale"] = scale
    if bias is not None:
        dims = {"b": B, "h": H, "q": Lq, "k": P + Lk, "1": 1}
        kw["attn_bias"] = f(*(dims[c] for c in bias))
        if bias_grad:
            diff.append("attn_bias")
    return Case({"q": q, "k": k, "v": v, "prefix_k": pk, "prefix_v": pv}, kw, tuple(diff))


def gated_adapter_case(
    lead=(2, 7),
    d=24,
    r=8,
    *,
    gate_mode=None,
    masked=False,
    fully_padded=False,
    residual=False,
    bias_down=True,
    bias_up=True,
    gate_bias=True,
    activation="relu",
    scaling=1.0,
    noncontiguous=False,
    adapter_index=None,
    tasks=None,
    d_out=None,
    device="cpu",
) -> Case:
    """gate_mode None means no gate; "token" or "mean" (masked with ``masked``).
    adapter_index: a list, one task per example of a (B, L) lead: every weight is then
    stacked over ``tasks`` tasks (default: max index + 1). d_out: an output width other
    than d (LoRA on a non-square projection), with a residual of that width."""
    f = lambda *s: torch.randn(*s, dtype=torch.float64, device=device)
    x = f(*lead, d)
    if noncontiguous:  # (B, L, d) with L-major strides, or a transposed (M, d)
        x = x.transpose(0, 1).contiguous().transpose(0, 1) if len(lead) >= 2 else noncontig(x)
    t_ = () if adapter_index is None else (tasks or max(adapter_index) + 1,)
    do = d if d_out is None else d_out
    args = {
        "x": x,
        "w_down": f(*t_, r, d) / d**0.5,
        "b_down": f(*t_, r) if bias_down else None,
        "w_up": f(*t_, do, r) / r**0.5,
        "b_up": f(*t_, do) if bias_up else None,
    }
    diff = ["x", "w_down", "w_up"] + [n for n in ("b_down", "b_up") if args[n] is not None]
    kw: dict[str, object] = {"activation": activation, "scaling": scaling}
    if residual or d_out is not None:
        kw["residual"] = f(*lead, do)
        diff.append("residual")
    if adapter_index is not None:
        kw["adapter_index"] = torch.tensor(adapter_index, dtype=torch.long, device=device)
    if gate_mode is not None:
        kw["w_gate"] = f(*t_, 1, d) / d**0.5
        diff.append("w_gate")
        if gate_bias:
            kw["b_gate"] = f(*t_, 1)
            diff.append("b_gate")
        kw["gate_mode"] = gate_mode
        if masked or fully_padded:
            m = torch.rand(*lead, device=device) > 0.3
            m[:, 0] = True
            if fully_padded:
                m[-1] = False
            kw["gate_mask"] = m
    return Case(args, kw, tuple(diff))


def bias_only_linear_case(
    lead=(2, 7), d_in=24, d_out=33, *, activation=None, noncontiguous=False, device="cpu"
) -> Case:
    f = lambda *s: torch.randn(*s, dtype=torch.float64, device=device)
    x = f(*lead, d_in)
    if noncontiguous:
        x = noncontig(x)
    args = {"x": x, "weight": f(d_out, d_in) / d_in**0.5, "bias": f(d_out)}
    return Case(args, {"activation": activation}, ("x", "bias"))
