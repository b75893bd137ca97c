"""The eager gated_adapter reference against an independent per-example formulation, and
float64 gradcheck."""

import pytest
import torch

import unipelt_fast as uf
from tests.parity import gated_adapter_case
from unipelt_fast.testing import assert_close

ACT = {
    "relu": lambda t: t.clamp_min(0),
    "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / 2**0.5)),
    "gelu_tanh": lambda t: (
        0.5 * t * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (t + 0.044715 * t**3)))
    ),
    "silu": lambda t: t / (1 + torch.exp(-t)),
    "tanh": torch.tanh,
    "identity": lambda t: t,
}


def by_hand(
    x,
    w_down,
    b_down,
    w_up,
    b_up,
    *,
    residual=None,
    w_gate=None,
    b_gate=None,
    gate_mode="token",
    gate_mask=None,
    activation="relu",
    scaling=1.0,
):
    """Row by row, example by example: the formula written out."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    res = (x if residual is None else residual).reshape(-1, d)
    h = ACT[activation](rows @ w_down.T + (0 if b_down is None else b_down))
    u = h @ w_up.T + (0 if b_up is None else b_up)
    if w_gate is None:
        g = torch.ones(rows.shape[0], 1, dtype=x.dtype)
    else:
        g = 1 / (1 + torch.exp(-(rows @ w_gate.T + (0 if b_gate is None else b_gate))))
        if gate_mode == "mean":
            B, L = x.shape[:2]
            g = g.view(B, L)
            means = []
            for b in range(B):
                keep = torch.ones(L, dtype=torch.bool) if gate_mask is None else gate_mask[b]
                means.append(g[b][keep].mean() if keep.any() else torch.zeros((), dtype=x.dtype))
            g = torch.stack(means)[:, None].expand(B, L).reshape(-1, 1)
    return (res + g * scaling * u).view(x.shape)


GRID = [
    dict(),
    dict(lead=(5,), r=1, gate_mode="token"),
    dict(lead=(2, 3, 5), gate_mode="token", residual=True, activation="gelu"),
    dict(gate_mode="mean", activation="silu", scaling=0.5),
    dict(gate_mode="mean", masked=True, activation="gelu_tanh"),
    dict(gate_mode="mean", fully_padded=True, activation="tanh", bias_up=False),
    dict(gate_mode="token", bias_down=False, gate_bias=False, activation="identity"),
    dict(noncontiguous=True, gate_mode="mean", masked=True, residual=True),
]


@pytest.mark.parametrize("cfg", GRID, ids=[str(i) for i in range(len(GRID))])
def test_matches_by_hand(cfg):
    case = gated_adapter_case(**cfg)
    got = case.call(uf.gated_adapter, backend="eager")
    want = case.call(by_hand)
    assert_close(got, want, torch.float64, "out")


@pytest.mark.parametrize("cfg", GRID[1:6], ids=[str(i) for i in range(5)])
def test_gradcheck_float64(cfg):
    case = gated_adapter_case(**{**cfg, "d": 6, "r": min(cfg.get("r", 3), 3)})
    names = list(case.diff)

    def fn(*ts):
        sub = dict(zip(names, ts, strict=True))
        args = {n: sub.get(n, t) for n, t in case.args.items()}
        kw = {n: sub.get(n, t) for n, t in case.kwargs.items()}
        return uf.gated_adapter(*args.values(), **kw, backend="eager")

    inputs = [t.detach().requires_grad_(True) for t in case.tensors(names)]
    assert torch.autograd.gradcheck(fn, inputs)


def test_fully_padded_example_gets_zero_gate():
    case = gated_adapter_case(gate_mode="mean", fully_padded=True, residual=True)
    out = case.call(uf.gated_adapter, backend="eager")
    assert torch.equal(out[-1], case.kwargs["residual"][-1])


def test_no_gate_is_gate_one():
    case = gated_adapter_case()
    a = case.call(uf.gated_adapter, backend="eager")
    x, wd, bd, wu, bu = case.args.values()
    manual = x + torch.relu(x @ wd.T + bd) @ wu.T + bu
    assert_close(a, manual, torch.float64, "out")
