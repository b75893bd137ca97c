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


def test_layer_norm_gradcheck_and_frozen_gamma():
    x = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = uf.bias_only_layer_norm(x, w, b, 1e-5, backend="eager")
    assert_close(y, F.layer_norm(x, (6,), w, b, 1e-5), torch.float64, "y")
    assert torch.autograd.gradcheck(
        lambda x_, b_: uf.bias_only_layer_norm(x_, w, b_, backend="eager"), (x, b)
    )
    with pytest.raises(ValueError, match="weight \\(gamma\\) requires grad"):
        uf.bias_only_layer_norm(x, w.clone().requires_grad_(), b)
    with pytest.raises(ValueError, match="weight must have shape \\(6,\\)"):
        uf.bias_only_layer_norm(x, w[:5], b)
    with pytest.raises(ValueError, match="eps must be a positive float"):
        uf.bias_only_layer_norm(x, w, b, eps=0.0)


def test_bitfit_on_tiny_bert_matches_eager_bitfit():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    ref = BertModel(cfg).eval()
    model = BertModel(cfg).eval()
    model.load_state_dict(ref.state_dict())
    for n, p in ref.named_parameters():  # eager BitFit: biases of Linear/LayerNorm train
        p.requires_grad_(n.endswith(".bias"))
    uf.bitfit(model, backend="eager")
    assert any(isinstance(m, uf.BiasOnlyLinear) for m in model.modules())
    assert any(isinstance(m, uf.BiasOnlyLayerNorm) for m in model.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in ref.named_parameters() if p.requires_grad}
    ids = torch.randint(0, 50, (2, 7))
    ref(ids).last_hidden_state.square().mean().backward()
    model(ids).last_hidden_state.square().mean().backward()
    got = dict(model.named_parameters())
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert_close(got[n].grad, p.grad, torch.float32, n)
        else:
            assert got[n].grad is None, n
