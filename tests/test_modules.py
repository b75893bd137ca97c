import pytest
import torch

import unipelt_fast as uf
from unipelt_fast import reference
from unipelt_fast.testing import assert_close


def test_gate_modes():
    g = uf.Gate(8, "token")
    h = torch.randn(2, 5, 8)
    assert g(h).shape == (2, 5, 1)
    gm = uf.Gate(8, "mean")
    gm.load_state_dict(g.state_dict())
    torch.testing.assert_close(gm(h), g(h).mean(1, keepdim=True))
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    gmm = uf.Gate(8, "masked_mean")
    gmm.load_state_dict(g.state_dict())
    out = gmm(h, mask)
    torch.testing.assert_close(out[0, 0, 0], g(h)[0, :2, 0].mean())
    assert out[1].item() == 0  # no real token: gate 0
    with pytest.raises(ValueError, match="mode must be one of"):
        uf.Gate(8, "max")


def test_prefix_gate_shapes():
    h = torch.randn(3, 4, 8)
    assert uf.PrefixGate(8)(h).shape == (3,)
    assert uf.PrefixGate(8, split_kv=True)(h).shape == (3, 2)
    with pytest.raises(ValueError, match="per example"):
        uf.PrefixGate(8, mode="token")


@pytest.mark.parametrize("gate_mode", ["token", "mean", "masked_mean"])
def test_gated_adapter_module_matches_reference(gate_mode):
    m = uf.GatedAdapter(12, 4, activation="gelu", gate_mode=gate_mode, scaling=0.7, backend="eager")
    x = torch.randn(2, 6, 12)
    assert torch.equal(m(x), x)  # zero-initialised up-projection: identity at start
    for p in m.parameters():
        torch.nn.init.normal_(p)
    mask = torch.rand(2, 6) > 0.4
    got = m(x, mask=mask)
    want = reference.gated_adapter(
        x,
        m.down.weight,
        m.down.bias,
        m.up.weight,
        m.up.bias,
        w_gate=m.gate.weight,
        b_gate=m.gate.bias,
        gate_mode="token" if gate_mode == "token" else "mean",
        gate_mask=mask if gate_mode == "masked_mean" else None,
        activation="gelu",
        scaling=0.7,
    )
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("reparam", [True, False])
def test_prefix_encoder_shapes_and_eject(reparam):
    enc = uf.PrefixEncoder(
        5,
        n_layers=3,
        n_kv_heads=2,
        head_dim=8,
        hidden_size=16,
        n_tasks=2,
        reparam=reparam,
        backend="eager",
    )
    kv = enc()
    assert len(kv) == 3 and kv[0][0].shape == (2, 2, 5, 8)
    assert kv[1][1].requires_grad
    q, k, v = torch.randn(4, 4, 6, 8), torch.randn(4, 2, 6, 8), torch.randn(4, 2, 6, 8)
    idx = torch.tensor([0, 1, 1, 0])
    before = enc.attend(kv[2], q, k, v, prefix_index=idx, causal=True)
    fixed = enc.eject()
    assert enc.is_ejected and not any(p.requires_grad for p in enc.parameters())
    after = enc.attend(enc()[2], q, k, v, prefix_index=idx, causal=True)
    assert torch.equal(before, after)
    assert torch.equal(fixed[2][0], kv[2][0].detach())
    # The ejected prefix survives a state_dict round trip.
    enc2 = uf.PrefixEncoder(
        5, n_layers=3, n_kv_heads=2, head_dim=8, hidden_size=16, n_tasks=2, reparam=reparam
    )
    enc2.eject()
    enc2.load_state_dict(enc.state_dict())
    assert torch.equal(enc2()[0][0], enc()[0][0])


def test_prefix_encoder_gradients_reach_mlp():
    enc = uf.PrefixEncoder(3, n_layers=2, n_kv_heads=1, head_dim=4, hidden_size=8, backend="eager")
    q, k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    enc.attend(enc()[1], q, k, v).sum().backward()
    assert enc.mlp[0].weight.grad is not None and enc.embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="need a prefix_index"):
        uf.PrefixEncoder(3, 1, 1, 4, n_tasks=2).attend(
            uf.PrefixEncoder(3, 1, 1, 4, n_tasks=2)()[0], q, k, v
        )


def test_bias_only_linear_module():
    lin = torch.nn.Linear(6, 4)
    m = uf.BiasOnlyLinear.from_linear(lin, activation="silu", backend="eager")
    assert not m.weight.requires_grad and m.bias.requires_grad
    x = torch.randn(3, 6)
    assert_close(m(x), torch.nn.functional.silu(lin(x)), torch.float32, "y")
    m(x).sum().backward()
    assert m.weight.grad is None and m.bias.grad is not None
