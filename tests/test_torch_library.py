"""The torch.library wiring: fake impls, registered autograd and torch.compile tracing.

The kernel side is tests/convention_backend.py (plain PyTorch implementing the calling
convention), so these run on CPU without any kernel; kernel parity lives in test_<op>.py.
"""

import pytest
import torch

import unipelt_fast as uf
from tests import convention_backend
from tests.parity import (
    bias_only_linear_case,
    check_parity,
    gated_adapter_case,
    prefix_attention_case,
)

CASES = {
    "prefix_attention": (
        uf.prefix_attention,
        prefix_attention_case(
            layout="indexed", gate="b", causal=True, mask=True, fully_padded=True
        ),
    ),
    "prefix_attention_shared": (
        uf.prefix_attention,
        prefix_attention_case(layout="shared", gate="b2"),
    ),
    "prefix_attention_bias": (
        uf.prefix_attention,
        prefix_attention_case(layout="indexed", gate="b2", causal=True, mask=True, bias="1hqk"),
    ),
    "prefix_attention_hf_layout": (  # q (B, L, H, D)-strided: out comes back in that layout
        uf.prefix_attention,
        prefix_attention_case(layout="indexed", gate="b2", causal=True, noncontiguous=True),
    ),
    "gated_adapter": (uf.gated_adapter, gated_adapter_case(gate_mode="mean", masked=True)),
    "gated_adapter_residual": (
        uf.gated_adapter,
        gated_adapter_case(lead=(9,), gate_mode="token", residual=True, bias_down=False),
    ),
    "gated_adapter_mixed": (
        uf.gated_adapter,
        gated_adapter_case(lead=(3, 4), adapter_index=[2, 0, 2], tasks=4, gate_mode="token"),
    ),
    "bias_only_linear": (uf.bias_only_linear, bias_only_linear_case(activation="gelu")),
    "bias_only_linear_relu": (uf.bias_only_linear, bias_only_linear_case(activation="relu")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_custom_op_autograd_matches_eager(name, monkeypatch):
    convention_backend.install(monkeypatch)
    fn, case = CASES[name]
    check_parity(fn, case, torch.float32, "triton")


@pytest.mark.parametrize(
    "op",
    [
        "prefix_attention",
        "prefix_attention_bias",
        "prefix_attention_hf_layout",
        "gated_adapter",
        "gated_adapter_mixed",
        "bias_only_linear",
    ],
)
def test_opcheck(op, monkeypatch):
    convention_backend.install(monkeypatch)
    fn, case = CASES[op]
    op = op.removesuffix("_mixed").removesuffix("_bias").removesuffix("_hf_layout")
    case = case.cast(torch.float32)
    captured = {}
    target = {
        "prefix_attention": convention_backend.op_module("prefix_attention")._prefix_attention_op,
        "gated_adapter": convention_backend.op_module("gated_adapter")._gated_adapter_op,
        "bias_only_linear": convention_backend.op_module("bias_only_linear")._bias_only_linear_op,
    }[op]

    def spy(*args):
        captured["args"] = args
        return target(*args)

    monkeypatch.setattr(convention_backend.op_module(op), f"_{op}_op", spy)
    case.call(fn, backend="triton")
    torch.library.opcheck(
        target._opoverload,
        captured["args"],
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_compile_fullgraph_eager_backend():
    """torch.compile traces a UniPELT block calling all three ops (eager backend), no breaks."""
    q = torch.randn(2, 4, 5, 8)
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    pk, pv = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    gate = torch.rand(2)
    ad = uf.GatedAdapter(16, 4, gate_mode="mean", backend="eager")
    torch.nn.init.normal_(ad.up.weight)
    w, b = torch.randn(16, 16), torch.randn(16, requires_grad=True)

    def block(q, k, v):
        o = uf.prefix_attention(q, k, v, pk, pv, prefix_gate=gate, causal=True, backend="eager")
        h = o.transpose(1, 2).reshape(2, 5, 32)[..., :16]
        h = uf.bias_only_linear(h, w, b, activation="gelu", backend="eager")
        return ad(h)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    torch.testing.assert_close(got, block(q, k, v))
    got.sum().backward()
    assert b.grad is not None and ad.down.weight.grad is not None


def test_compile_fullgraph_custom_ops(monkeypatch):
    """The same with the ops going through the torch.library custom ops (kernel path)."""
    convention_backend.install(monkeypatch)
    fn, case = CASES["prefix_attention"]
    case = case.cast(torch.float32)
    afn, acase = CASES["gated_adapter"]
    acase = acase.cast(torch.float32)

    def both():
        o = case.call(fn, backend="triton")
        a = acase.call(afn, backend="triton")
        return o.sum() + a.sum()

    torch._dynamo.reset()
    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    compiled().backward()
    assert case.args["q"].grad is not None and acase.args["w_down"].grad is not None
