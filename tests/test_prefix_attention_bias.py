"""prefix_attention's ``attn_bias`` (T5's relative position bias reaches the kernels this
way): the eager reference against an independent formulation (explicit concatenation plus
SDPA with an explicit additive float mask), float64 gradcheck of every input including the
bias, Triton interpreter parity with broadcast biases, and validation."""

import pytest
import torch
import torch.nn.functional as F

import unipelt_fast as uf
from tests.parity import check_parity, prefix_attention_case
from unipelt_fast.testing import assert_close


def sdpa_with_bias(q, k, v, prefix_k, prefix_v, *, attn_bias, prefix_index=None,
                   prefix_gate=None, key_padding_mask=None, causal=False, softmax_scale=None):  # fmt: skip
    """Per (example, head): [g_k Pk ; K], [g_v Pv ; V], and a float mask = bias where the
    key is visible, -inf elsewhere (built with Python loops), then SDPA. Empty rows: 0."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if prefix_index is not None:
        prefix_k, prefix_v = prefix_k[prefix_index], prefix_v[prefix_index]
    elif prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k.expand(B, -1, -1, -1), prefix_v.expand(B, -1, -1, -1)
    P = prefix_k.shape[2]
    bias = attn_bias.expand(B, H, Lq, P + Lk)
    outs = []
    for b in range(B):
        pk, pv = prefix_k[b], prefix_v[b]
        if prefix_gate is not None:
            g = prefix_gate[b].reshape(-1)
            pk, pv = pk * g[0], pv * g[-1]
        heads = []
        for h in range(H):
            kvh = h // (H // Hkv)
            keys = torch.cat([pk[kvh], k[b, kvh]], 0)
            vals = torch.cat([pv[kvh], v[b, kvh]], 0)
            allowed = torch.ones(Lq, P + Lk, dtype=torch.bool)
            for i in range(Lq):
                for t in range(Lk):
                    ok = key_padding_mask is None or bool(key_padding_mask[b, t])
                    allowed[i, P + t] = ok and not (causal and t > i + (Lk - Lq))
            mask = bias[b, h].masked_fill(~allowed, float("-inf"))
            o = F.scaled_dot_product_attention(
                q[b, h][None], keys[None], vals[None], attn_mask=mask[None], scale=softmax_scale
            )[0]
            heads.append(torch.where(allowed.any(-1, keepdim=True), o, torch.zeros_like(o)))
        outs.append(torch.stack(heads))
    return torch.stack(outs)


EAGER_GRID = [
    dict(bias="bhqk"),
    dict(bias="1hqk", gate="b2", causal=True, Lq=5, Lk=9),
    dict(bias="b11k", layout="indexed", gate="b", mask=True, fully_padded=True, H=4, Hkv=1),
    dict(bias="k", layout="batch", causal=True, Lq=9, Lk=4, scale=1.0),
]


@pytest.mark.parametrize("cfg", EAGER_GRID, ids=lambda c: c["bias"])
def test_eager_matches_sdpa_with_explicit_bias(cfg):
    case = prefix_attention_case(**cfg)
    args = list(case.args.values())
    got = uf.prefix_attention(*args, **case.kwargs, backend="eager")
    want = sdpa_with_bias(*args, **case.kwargs)
    assert_close(got, want, torch.float64, "out")
    # the bias matters (the check above could not pass without it)
    kw = {**case.kwargs, "attn_bias": None}
    assert (uf.prefix_attention(*args, **kw, backend="eager") - want).abs().max() > 1e-3


def test_gate_scales_logits_before_the_bias():
    """The key gate multiplies q . pk only; the prefix columns' bias is added unscaled."""
    case = prefix_attention_case(B=1, H=1, Hkv=1, Lq=2, Lk=3, P=2, bias="k")
    q, k, v, pk, pv = case.args.values()
    bias = case.kwargs["attn_bias"]
    g = torch.tensor([[0.25, 1.0]], dtype=torch.float64)
    got = uf.prefix_attention(q, k, v, pk, pv, prefix_gate=g, attn_bias=bias, backend="eager")
    logits = torch.cat([0.25 * pk[0], k[0, 0]]) @ q[0, 0].T / 4.0 + bias[:, None]  # (P+Lk, Lq)
    want = torch.softmax(logits.T, -1) @ torch.cat([pv[0], v[0, 0]])
    assert_close(got[0, 0], want, torch.float64, "out")


@pytest.mark.parametrize(
    "cfg",
    [
        dict(bias="bhqk", gate="b2", causal=True),
        dict(bias="1h1k", layout="indexed", mask=True, fully_padded=True),
    ],
    ids=["full", "broadcast"],
)
def test_gradcheck_float64_with_bias_grad(cfg):
    case = prefix_attention_case(
        **{**dict(B=2, H=2, Hkv=1, Lq=3, Lk=4, P=2, D=4, bias_grad=True), **cfg}
    )
    names = list(case.args) + [n for n in case.diff if n in case.kwargs]

    def fn(*ts):
        a = dict(zip(names, ts, strict=True))
        kw = {**case.kwargs, **{n: a[n] for n in names if n in case.kwargs}}
        return uf.prefix_attention(*(a[n] for n in case.args), **kw, backend="eager")

    inputs = [t.detach().requires_grad_(True) for t in case.tensors(names)]
    assert torch.autograd.gradcheck(fn, inputs)


# ---- triton (interpreter) -------------------------------------------------------------------

GRID = [
    dict(bias="bhqk", Lq=7, Lk=33, P=16, gate="b2"),
    dict(bias="1hqk", Lq=33, Lk=7, P=20, H=4, Hkv=1, causal=True, gate="b"),
    dict(bias="b11k", Lq=7, Lk=33, P=3, layout="indexed", T=2, B=3, mask=True, fully_padded=True),
    dict(bias="1hqk", Lq=33, Lk=33, P=1, causal=True, noncontiguous=True, scale=1.0),
    dict(bias="bh1k", Lq=9, Lk=3, P=0, causal=True),  # rows with no visible key
]


def _id(c: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in c.items())


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", GRID, ids=_id)
def test_parity_interpreter(cfg, dtype):
    check_parity(uf.prefix_attention, prefix_attention_case(**cfg), dtype, "triton")


@pytest.mark.parametrize("cfg", GRID[:3], ids=_id)
def test_parity_torch_backend_with_bias_grad(cfg):
    case = prefix_attention_case(**cfg, bias_grad=True)
    check_parity(uf.prefix_attention, case, torch.float32, "torch")


@pytest.mark.interpreter
def test_float32_bias_with_half_inputs():
    case = prefix_attention_case(Lq=7, Lk=9, P=3, bias="1hqk", gate="b2", causal=True)
    c = case.cast(torch.float16)
    c.kwargs["attn_bias"] = case.kwargs["attn_bias"].float()
    out = c.call(uf.prefix_attention, backend="triton")
    want = case.call(uf.prefix_attention, backend="eager")
    assert out.dtype == torch.float16
    assert_close(out, want, torch.float16, "out")


@pytest.mark.interpreter
def test_kernel_gets_a_stride_0_view_of_the_callers_bias(monkeypatch):
    """Nothing of size Lq x (P + Lk) is built: the kernel reads the caller's storage."""
    from unipelt_fast.kernels import prefix_attention as kpa

    seen = {}
    real = kpa.forward

    def spy(a):
        seen["bias"] = a.attn_bias
        return real(a)

    monkeypatch.setattr(kpa, "forward", spy)
    case = prefix_attention_case(B=2, H=2, Hkv=1, Lq=5, Lk=6, P=2, bias="b11k").cast(torch.float32)
    case.call(uf.prefix_attention, backend="triton")
    bias = case.kwargs["attn_bias"]
    assert seen["bias"].shape == (2, 2, 5, 8)
    assert seen["bias"].stride()[1:3] == (0, 0)
    assert seen["bias"].data_ptr() == bias.data_ptr()


@pytest.mark.interpreter
def test_kernel_backend_refuses_a_bias_that_requires_grad():
    case = prefix_attention_case(bias="bhqk", bias_grad=True).cast(torch.float32)
    with pytest.raises(NotImplementedError, match="attn_bias"):
        case.call(uf.prefix_attention, backend="triton")
    with torch.no_grad():  # no gradient wanted: fine
        case.call(uf.prefix_attention, backend="triton")


# ---- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(2, 4, 7, 9), (4, 7, 11), (2, 4, 7, 10, 1), (3, 1, 1, 10), (2, 3, 1, 10)],
    ids=["lk-only", "3d-wrong-k", "5d", "bad-b", "bad-h"],
)
def test_bad_bias_shape_raises(shape):
    case = prefix_attention_case(B=2, H=4, Lq=7, Lk=7, P=3)
    bias = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="attn_bias"):
        case.call(uf.prefix_attention, attn_bias=bias, backend="eager")


def test_bad_bias_dtype_and_device_raise():
    case = prefix_attention_case(B=2, H=4, Lq=7, Lk=7, P=3).cast(torch.float32)
    with pytest.raises(TypeError, match="attn_bias"):
        case.call(uf.prefix_attention, attn_bias=torch.zeros(10, dtype=torch.int64))
    with pytest.raises(TypeError, match="attn_bias"):
        case.call(uf.prefix_attention, attn_bias=torch.zeros(10, dtype=torch.float16))
    with pytest.raises(ValueError, match="attn_bias"):
        case.call(uf.prefix_attention, attn_bias=torch.zeros(10, device="meta"))
