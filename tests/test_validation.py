"""Every bad input gets a clear ValueError/TypeError naming the argument, before any kernel
runs, whichever backend was asked for (validation is shared)."""

import pytest
import torch

import unipelt_fast as uf
from tests.parity import bias_only_linear_case, gated_adapter_case, prefix_attention_case

BACKENDS = ["eager", "triton", "cuda", "auto"]


def pa(**over):
    case = prefix_attention_case(B=2, H=4, Hkv=2, Lq=3, Lk=5, P=2, D=8, layout="indexed", T=3)
    args = {**case.args, **case.kwargs}
    args = {
        n: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
        for n, t in args.items()
    }
    args.update(over)
    q, k, v, pk, pv = (args.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v"))
    return lambda backend: uf.prefix_attention(q, k, v, pk, pv, **args, backend=backend)


PA_BAD = [
    (dict(q=torch.randn(2, 4, 3)), ValueError, "q must be 4-D"),
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    (dict(q=torch.randn(2, 4, 3, 8, dtype=torch.float64)), TypeError, "k must have dtype"),
    (dict(q=torch.randint(0, 3, (2, 4, 3, 8))), TypeError, "q must be float16"),
    (dict(k=torch.randn(3, 2, 5, 8)), ValueError, "k must be (B, Hkv, Lk, D)"),
    (dict(k=torch.randn(2, 2, 5, 4)), ValueError, "k must be (B, Hkv, Lk, D)"),
    (dict(v=torch.randn(2, 2, 6, 8)), ValueError, "v must have shape"),
    (
        dict(k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8)),
        ValueError,
        "multiple of kv heads",
    ),
    (dict(prefix_k=torch.randn(3, 2, 2, 8).half()), TypeError, "prefix_k must have dtype"),
    (dict(prefix_k=torch.randn(3, 1, 2, 8)), ValueError, "prefix_k must be (T, Hkv, P, D)"),
    (dict(prefix_v=torch.randn(3, 2, 3, 8)), ValueError, "prefix_v must have shape"),
    (dict(prefix_index=torch.tensor([0, 3])), ValueError, "prefix_index values must lie in [0, 3)"),
    (dict(prefix_index=torch.tensor([-1, 0])), ValueError, "prefix_index values"),
    (dict(prefix_index=torch.tensor([0, 1, 2])), ValueError, "prefix_index must have shape (2,)"),
    (dict(prefix_index=torch.tensor([0.0, 1.0])), TypeError, "prefix_index must be an int64"),
    (dict(prefix_index=None), ValueError, "prefix_k must be (B, Hkv, P, D)"),
    (dict(prefix_gate=torch.rand(2, 3)), ValueError, "prefix_gate must have shape (2,) or (2, 2)"),
    (dict(prefix_gate=torch.rand(3)), ValueError, "prefix_gate must have shape"),
    (dict(prefix_gate=torch.ones(2, dtype=torch.long)), TypeError, "prefix_gate must be float16"),
    (dict(key_padding_mask=torch.ones(2, 5)), TypeError, "key_padding_mask must be a bool"),
    (
        dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)),
        ValueError,
        "key_padding_mask must have shape (2, 5)",
    ),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be positive"),
    (dict(softmax_scale="x"), TypeError, "softmax_scale must be a float"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("over,exc,msg", PA_BAD, ids=[m for _, _, m in PA_BAD])
def test_prefix_attention_errors(over, exc, msg, backend):
    with pytest.raises(
        exc,
        match="prefix_attention: .*"
        + msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\["),
    ):
        pa(**over)(backend)


def test_prefix_shared_layout_errors():
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    with pytest.raises(ValueError, match=r"prefix_k must be \(Hkv, P, D\)"):
        uf.prefix_attention(q, k, v, torch.randn(4, 2, 8), torch.randn(4, 2, 8), backend="eager")
    with pytest.raises(ValueError, match=r"prefix_k must be 3-D or 4-D"):
        uf.prefix_attention(q, k, v, torch.randn(2, 8), torch.randn(2, 8), backend="eager")
    with pytest.raises(ValueError, match="prefix_index"):
        uf.prefix_attention(
            q,
            k,
            v,
            torch.randn(2, 2, 8),
            torch.randn(2, 2, 8),
            prefix_index=torch.tensor([0, 0]),
            backend="eager",
        )


def ga(**over):
    case = gated_adapter_case(lead=(2, 5), d=8, r=3, gate_mode="mean")
    args = {**case.args, **case.kwargs}
    args = {
        n: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
        for n, t in args.items()
    }
    args.update(over)
    pos = [args.pop(n) for n in ("x", "w_down", "b_down", "w_up", "b_up")]
    return lambda backend: uf.gated_adapter(*pos, **args, backend=backend)


GA_BAD = [
    (dict(x=torch.randn(2, 5, 8).half()), TypeError, "w_down must have dtype"),
    (dict(w_down=torch.randn(3, 7)), ValueError, "w_down must be (r, d)"),
    (dict(w_down=torch.randn(3, 8, 1)), ValueError, "w_down must be 2-D"),
    (dict(w_up=torch.randn(3, 8)), ValueError, "w_up must have shape (8, 3)"),
    (dict(b_down=torch.randn(8)), ValueError, "b_down must have shape (3,)"),
    (dict(b_up=torch.randn(3)), ValueError, "b_up must have shape (8,)"),
    (dict(residual=torch.randn(2, 4, 8)), ValueError, "residual must have shape"),
    (dict(w_gate=torch.randn(8)), ValueError, "w_gate must have shape (1, 8)"),
    (dict(w_gate=torch.randn(2, 8)), ValueError, "w_gate must have shape (1, 8)"),
    (dict(b_gate=torch.randn(2)), ValueError, "b_gate must have shape (1,)"),
    (dict(w_gate=None), ValueError, "b_gate was given without w_gate"),
    (dict(gate_mode="max"), ValueError, "gate_mode must be one of"),
    (dict(gate_mask=torch.ones(2, 5)), TypeError, "gate_mask must be a bool"),
    (dict(gate_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "gate_mask must have shape"),
    (
        dict(gate_mask=torch.ones(2, 5, dtype=torch.bool), gate_mode="token"),
        ValueError,
        "gate_mask is only used with gate_mode='mean'",
    ),
    (dict(x=torch.randn(10, 8)), ValueError, "gate_mode='mean' averages over the sequence"),
    (dict(activation="softmax"), ValueError, "activation must be one of"),
    (dict(scaling="2"), TypeError, "scaling must be a float"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("over,exc,msg", GA_BAD, ids=[m for _, _, m in GA_BAD])
def test_gated_adapter_errors(over, exc, msg, backend):
    with pytest.raises(
        exc, match="gated_adapter: .*" + msg.replace("(", r"\(").replace(")", r"\)")
    ):
        ga(**over)(backend)


BL_BAD = [
    (dict(weight=torch.randn(5, 3)), ValueError, "weight must be (d_out, d_in)"),
    (dict(weight=torch.randn(5, 4, requires_grad=True)), ValueError, "weight requires grad"),
    (dict(bias=torch.randn(4)), ValueError, "bias must have shape (5,)"),
    (dict(bias=None), ValueError, "bias is required"),
    (dict(bias=torch.randn(5).half()), TypeError, "bias must have dtype"),
    (dict(activation="elu"), ValueError, "activation must be one of"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("over,exc,msg", BL_BAD, ids=[m for _, _, m in BL_BAD])
def test_bias_only_linear_errors(over, exc, msg, backend):
    case = bias_only_linear_case(lead=(3,), d_in=4, d_out=5)
    args = {n: t.float() for n, t in case.args.items()}
    args.update({n: v for n, v in over.items() if n != "activation"})
    act = over.get("activation")
    with pytest.raises(
        exc, match="bias_only_linear: .*" + msg.replace("(", r"\(").replace(")", r"\)")
    ):
        uf.bias_only_linear(*args.values(), activation=act, backend=backend)


def test_float64_is_eager_only():
    case = bias_only_linear_case(lead=(3,), d_in=4, d_out=5)
    with pytest.raises(TypeError, match="float64 runs on backend='eager' only"):
        from unipelt_fast import _validation

        _validation.check_backend_dtype(torch.float64, "triton", "bias_only_linear")
    uf.bias_only_linear(*case.args.values(), backend="eager")  # fine in eager


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices (CPU and CUDA)")
@pytest.mark.gpu
def test_device_mismatch():
    case = bias_only_linear_case(lead=(3,), d_in=4, d_out=5)
    x, w, b = (t.float() for t in case.args.values())
    with pytest.raises(ValueError, match="weight is on cpu but the other inputs are on cuda"):
        uf.bias_only_linear(x.cuda(), w, b.cuda())
