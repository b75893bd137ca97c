"""Task indices and masks given as strided views (a rank's rows, ``ids[r::world]``) mean the
same as their contiguous copies on every backend. The triton kernels read a (B,) index as
dense, so a strided view once silently picked other examples' tasks (found under FSDP);
validation now hands every backend a contiguous index and gate mask.

Each backend is checked against the float64 eager reference on the same (contiguous) values:
an independent formulation that never sees the strided view.
"""

import pytest
import torch

import unipelt_fast as uf
from unipelt_fast.testing import rel_err

BACKENDS = ["eager", "torch", pytest.param("triton", marks=pytest.mark.interpreter)]
B, H, HKV, L, P, D, T, R = 4, 2, 1, 5, 3, 16, 3, 4


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a non-contiguous view with the same values (every other row of a bigger one)."""
    big = torch.zeros((t.shape[0] * 2, *t.shape[1:]), dtype=t.dtype)
    big[::2] = t
    view = big[::2]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def _f64(ts):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts]


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_attention_strided_prefix_index(backend):
    q = torch.randn(B, H, L, D, requires_grad=True)
    k, v = (torch.randn(B, HKV, L, D, requires_grad=True) for _ in range(2))
    pk, pv = (torch.randn(T, HKV, P, D, requires_grad=True) for _ in range(2))
    idx = torch.tensor([0, 2, 1, 2])  # every task differs: a wrong pick shows
    out = uf.prefix_attention(q, k, v, pk, pv, prefix_index=_strided(idx), backend=backend)
    ins = _f64([q, k, v, pk, pv])
    want = uf.prefix_attention(*ins, prefix_index=idx, backend="eager")
    assert rel_err(out, want) < 1e-4
    g = torch.randn_like(want)
    grads = torch.autograd.grad(out, [q, k, v, pk, pv], g.float())
    wants = torch.autograd.grad(want, ins, g)
    for name, a, b in zip("q k v prefix_k prefix_v".split(), grads, wants, strict=True):
        assert rel_err(a, b) < 1e-4, name


@pytest.mark.parametrize("gate_mode", ["token", "mean"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_adapter_strided_adapter_index_and_gate_mask(backend, gate_mode):
    d = 16
    x = torch.randn(B, L, d, requires_grad=True)
    ws = [
        torch.randn(T, R, d) * 0.3, torch.randn(T, R), torch.randn(T, d, R) * 0.3,
        torch.randn(T, d), torch.randn(T, 1, d) * 0.3, torch.randn(T, 1),
    ]  # fmt: skip
    ws = [w.requires_grad_() for w in ws]
    idx = torch.tensor([0, 2, 1, 2])
    mask = None
    if gate_mode == "mean":
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[1, 3:] = False
    kw = dict(gate_mode=gate_mode, activation="relu")
    out = uf.gated_adapter(
        x, *ws[:4], w_gate=ws[4], b_gate=ws[5], adapter_index=_strided(idx),
        gate_mask=None if mask is None else _strided(mask), backend=backend, **kw,
    )  # fmt: skip
    ins = _f64([x, *ws])
    want = uf.gated_adapter(
        ins[0], *ins[1:5], w_gate=ins[5], b_gate=ins[6], adapter_index=idx, gate_mask=mask,
        backend="eager", **kw,
    )  # fmt: skip
    assert rel_err(out, want) < 1e-4
    g = torch.randn_like(want)
    grads = torch.autograd.grad(out, [x, *ws], g.float())
    wants = torch.autograd.grad(want, ins, g)
    for i, (a, b) in enumerate(zip(grads, wants, strict=True)):
        assert rel_err(a, b) < 1e-4, i
