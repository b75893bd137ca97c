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


# ---- mixed-task batches: adapter_index with per-task stacked weights ------------------------

MIXED = [
    dict(lead=(3, 5), adapter_index=[2, 0, 2], tasks=4, gate_mode="token"),
    dict(lead=(3, 5), adapter_index=[1, 1, 0], gate_mode="mean", masked=True, residual=True),
    dict(lead=(2, 4), adapter_index=[0, 3], tasks=5, activation="gelu", bias_up=False),
]


def _alone(case, b):
    """Example b run alone with its task's unstacked weights."""
    t = int(case.kwargs["adapter_index"][b])
    pick = lambda v: v[t] if isinstance(v, torch.Tensor) and v.dim() >= 1 else v
    args = [None if v is None else pick(v) for v in list(case.args.values())[1:]]
    kw = {n: v for n, v in case.kwargs.items() if n != "adapter_index"}
    for n in ("w_gate", "b_gate"):
        if n in kw:
            kw[n] = kw[n][t]
    for n in ("residual", "gate_mask"):
        if n in kw:
            kw[n] = kw[n][b : b + 1]
    return uf.gated_adapter(case.args["x"][b : b + 1], *args, **kw, backend="eager")


@pytest.mark.parametrize("cfg", MIXED, ids=[str(i) for i in range(len(MIXED))])
def test_mixed_equals_each_example_alone(cfg):
    case = gated_adapter_case(**cfg)
    got = case.call(uf.gated_adapter, backend="eager")
    for b in range(got.shape[0]):
        assert_close(got[b : b + 1], _alone(case, b), torch.float64, f"example {b}")


@pytest.mark.parametrize("cfg", MIXED[:2], ids=["token", "mean"])
def test_mixed_gradcheck_float64(cfg):
    case = gated_adapter_case(**{**cfg, "d": 5, "r": 2})
    names = list(case.diff)

    def fn(*ts):
        sub = dict(zip(names, ts, strict=True))
        args = {n: sub.get(n, t) for n, t in case.args.items()}
        kw = {n: sub.get(n, t) for n, t in case.kwargs.items()}
        return uf.gated_adapter(*args.values(), **kw, backend="eager")

    inputs = [t.detach().requires_grad_(True) for t in case.tensors(names)]
    assert torch.autograd.gradcheck(fn, inputs)


def test_mixed_unused_task_gets_zero_grad():
    case = gated_adapter_case(lead=(2, 3), adapter_index=[0, 2], tasks=3, gate_mode="token")
    case = case.cast(torch.float64)
    case.call(uf.gated_adapter, backend="eager").sum().backward()
    for n in ("w_down", "w_up", "b_down", "b_up"):
        g = case.tensors([n])[0].grad
        assert torch.equal(g[1], torch.zeros_like(g[1])), n
        assert g[0].abs().sum() > 0 and g[2].abs().sum() > 0, n


def _bad_call(**over):
    case = gated_adapter_case(lead=(2, 3), adapter_index=[0, 1], gate_mode="token")
    kw = {**case.kwargs, **over.pop("kw", {})}
    args = {**case.args, **over}
    return lambda: uf.gated_adapter(*args.values(), **kw, backend="eager")


@pytest.mark.parametrize(
    "over, err, match",
    [
        (dict(kw=dict(adapter_index=torch.tensor([0.0, 1.0]))), TypeError, "adapter_index"),
        (dict(kw=dict(adapter_index=torch.tensor([0, 1, 1]))), ValueError, "adapter_index"),
        (dict(kw=dict(adapter_index=torch.tensor([[0, 1]]))), ValueError, "adapter_index"),
        (dict(kw=dict(adapter_index=torch.tensor([0, 2]))), ValueError, r"\[0, 2\)"),
        (dict(kw=dict(adapter_index=torch.tensor([-1, 0]))), ValueError, "adapter_index"),
        (dict(w_up=torch.randn(3, 24, 8, dtype=torch.float64)), ValueError, "w_up"),
        (dict(b_down=torch.randn(8, dtype=torch.float64)), ValueError, "b_down"),
        (dict(w_down=torch.randn(8, 24, dtype=torch.float64)), ValueError, "w_down"),
        (dict(kw=dict(w_gate=torch.randn(1, 24, dtype=torch.float64))), ValueError, "w_gate"),
        (dict(x=torch.randn(6, 24, dtype=torch.float64)), ValueError, "adapter_index"),
    ],
    ids=[
        "float-index",
        "index-length",
        "index-2d",
        "index-high",
        "index-negative",
        "w_up-T",
        "b_down-unstacked",
        "w_down-unstacked",
        "w_gate-unstacked",
        "x-2d",
    ],
)
def test_mixed_bad_inputs_raise(over, err, match):
    with pytest.raises(err, match=match):
        _bad_call(**over)()


def test_cuda_backend_rejects_adapter_index_before_launch():
    from unipelt_fast import _cuda

    case = gated_adapter_case(lead=(2, 3), adapter_index=[0, 1])
    x, wd, bd, wu, bu = case.args.values()
    with pytest.raises(NotImplementedError, match="adapter_index"):
        _cuda.op_module("gated_adapter").forward(
            x, wd, bd, wu, bu, None, None, None, None, "token", "relu", 1.0,
            adapter_index=case.kwargs["adapter_index"],
        )  # fmt: skip


def test_other_output_width_needs_residual_and_matches_by_hand():
    case = gated_adapter_case(lead=(2, 3), d=6, r=2, d_out=4, activation="identity")
    x, wd, bd, wu, bu = case.args.values()
    res = case.kwargs["residual"]
    got = case.call(uf.gated_adapter, backend="eager")
    assert_close(got, res + (x @ wd.T + bd) @ wu.T + bu, torch.float64, "out")
    with pytest.raises(ValueError, match="d_out"):
        uf.gated_adapter(x, wd, bd, wu, bu, backend="eager")
    with pytest.raises(ValueError, match="w_up must have shape"):  # a width-d residual
        uf.gated_adapter(x, wd, bd, wu, bu, residual=x, backend="eager")
