"""Under torch.autocast the ops cast their inputs to the autocast dtype (custom ops are not
autocast-aware, and validation would otherwise reject fp32 weights with bf16 activations)."""

import torch

import unipelt_fast as uf
from tests.parity import gated_adapter_case, prefix_attention_case
from unipelt_fast.testing import assert_close


def test_gated_adapter_mixed_dtypes_under_autocast():
    case = gated_adapter_case(gate_mode="token").cast(torch.float32)
    x = case.args["x"].detach().to(torch.bfloat16)  # bf16 activations, fp32 weights
    args = [x] + list(case.args.values())[1:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = uf.gated_adapter(*args, **case.kwargs, backend="eager")
    assert out.dtype == torch.bfloat16
    want = uf.gated_adapter(
        x.double(),
        *[a.detach().double() for a in args[1:]],
        **{
            k: (v.detach().double() if isinstance(v, torch.Tensor) else v)
            for k, v in case.kwargs.items()
        },
        backend="eager",
    )
    assert_close(out, want, torch.bfloat16, "out")
    out.float().sum().backward()
    assert case.args["w_down"].grad is not None and case.args["w_down"].grad.dtype == torch.float32


def test_prefix_attention_fp32_prefix_with_bf16_q_under_autocast():
    case = prefix_attention_case(gate="b").cast(torch.float32)
    q, k, v, pk, pv = case.args.values()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = uf.prefix_attention(
            q.bfloat16(), k.bfloat16(), v.bfloat16(), pk, pv, **case.kwargs, backend="eager"
        )
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert pk.grad is not None


def test_without_autocast_mixed_dtypes_are_rejected():
    case = gated_adapter_case().cast(torch.float32)
    x = case.args["x"].detach().to(torch.bfloat16)
    try:
        uf.gated_adapter(x, *list(case.args.values())[1:], backend="eager")
    except TypeError as e:
        assert "w_down must have dtype torch.bfloat16" in str(e)
    else:
        raise AssertionError("mixed dtypes accepted without autocast")
