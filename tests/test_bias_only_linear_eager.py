import pytest
import torch
import torch.nn.functional as F

import unipelt_fast as uf
from tests.parity import bias_only_linear_case
from unipelt_fast.testing import assert_close


@pytest.mark.parametrize("act", [None, "relu", "gelu", "gelu_tanh", "silu", "tanh", "identity"])
def test_gradcheck_and_value(act):
    case = bias_only_linear_case(lead=(3, 2), d_in=5, d_out=4, activation=act)
    x, w, b = case.args.values()
    y = uf.bias_only_linear(x, w, b, activation=act, backend="eager")
    z = x @ w.T + b
    want = {
        None: z,
        "identity": z,
        "relu": z.clamp_min(0),
        "tanh": torch.tanh(z),
        "gelu": F.gelu(z),
        "gelu_tanh": F.gelu(z, approximate="tanh"),
        "silu": F.silu(z),
    }[act]
    assert_close(y, want, torch.float64, "y")
    xx, bb = x.detach().requires_grad_(), b.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x_, b_: uf.bias_only_linear(x_, w, b_, activation=act, backend="eager"), (xx, bb)
    )


def test_weight_never_gets_grad():
    lin = torch.nn.Linear(6, 5)
    lin.weight.requires_grad_(False)
    x = torch.randn(3, 6, requires_grad=True)
    uf.bias_only_linear(
        x, lin.weight, lin.bias, activation="gelu", backend="eager"
    ).sum().backward()
    assert lin.weight.grad is None and lin.bias.grad is not None and x.grad is not None
