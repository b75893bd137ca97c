"""The eager prefix_attention reference against an independent formulation (SDPA on an
explicit concatenation with an explicit boolean mask), plus float64 gradcheck."""

import pytest
import torch
import torch.nn.functional as F

import unipelt_fast as uf
from tests.parity import prefix_attention_case
from unipelt_fast.testing import assert_close


def sdpa_on_concat(
    q,
    k,
    v,
    prefix_k,
    prefix_v,
    *,
    prefix_index=None,
    prefix_gate=None,
    key_padding_mask=None,
    causal=False,
    softmax_scale=None,
):
    """Build [gated prefix ; tokens] and its mask explicitly, with Python loops, then SDPA."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    outs = []
    for b in range(B):
        if prefix_index is not None:
            pk, pv = prefix_k[prefix_index[b]], prefix_v[prefix_index[b]]
        elif prefix_k.dim() == 3:
            pk, pv = prefix_k, prefix_v
        else:
            pk, pv = prefix_k[b], prefix_v[b]
        if prefix_gate is not None:
            gk = prefix_gate[b] if prefix_gate.dim() == 1 else prefix_gate[b, 0]
            gv = prefix_gate[b] if prefix_gate.dim() == 1 else prefix_gate[b, 1]
            pk, pv = pk * gk, pv * gv
        P = pk.shape[1]
        heads = []
        for h in range(H):
            kv_h = h // (H // Hkv)
            keys = torch.cat([pk[kv_h], k[b, kv_h]], 0)
            vals = torch.cat([pv[kv_h], v[b, kv_h]], 0)
            allowed = torch.zeros(Lq, P + Lk, dtype=torch.bool)
            for i in range(Lq):
                for j in range(P + Lk):
                    if j < P:
                        allowed[i, j] = True
                        continue
                    t = j - P
                    ok = key_padding_mask is None or bool(key_padding_mask[b, t])
                    if causal and t > i + (Lk - Lq):
                        ok = False
                    allowed[i, j] = ok
            o = F.scaled_dot_product_attention(
                q[b, h][None],
                keys[None],
                vals[None],
                attn_mask=allowed[None],
                scale=softmax_scale,
            )[0]
            o = torch.where(allowed.any(-1, keepdim=True), o, torch.zeros_like(o))
            heads.append(o)
        outs.append(torch.stack(heads))
    return torch.stack(outs)


GRID = [
    dict(),
    dict(P=0),
    dict(P=1, Lq=1, Lk=1),
    dict(H=4, Hkv=1, Lq=5, Lk=9),
    dict(layout="batch", gate="b"),
    dict(layout="indexed", gate="b2", T=3),
    dict(causal=True, Lq=5, Lk=9),
    dict(causal=True, Lq=9, Lk=4),  # first Lq-Lk rows see prefix keys only
    dict(causal=True, P=0, Lq=6, Lk=3),  # rows with no visible key at all
    dict(mask=True, fully_padded=True),
    dict(mask=True, fully_padded=True, P=0),
    dict(noncontiguous=True, layout="indexed", gate="b", causal=True, mask=True),
    dict(scale=0.3, B=1, H=2, Hkv=2),
]


@pytest.mark.parametrize("cfg", GRID, ids=[str(i) for i in range(len(GRID))])
def test_matches_sdpa_on_explicit_concat(cfg):
    case = prefix_attention_case(**cfg)
    kw = {**case.kwargs}
    if "scale" in cfg:
        kw["softmax_scale"] = cfg["scale"]
    args = list(case.args.values())
    got = uf.prefix_attention(*args, **kw, backend="eager")
    want = sdpa_on_concat(*args, **kw)
    assert got.dtype == torch.float64
    assert_close(got, want, torch.float64, "out")
    row_empty = (want == 0).all(-1)
    assert torch.isfinite(got).all()
    assert (got[row_empty] == 0).all()


def test_gradients_match_sdpa_formulation():
    case = prefix_attention_case(layout="indexed", gate="b2", causal=True, mask=True, Lq=5, Lk=6)
    args = [t.detach().requires_grad_(True) for t in case.args.values()]
    gate = case.kwargs["prefix_gate"].detach().requires_grad_(True)
    kw = {**case.kwargs, "prefix_gate": gate}
    g = torch.randn(2, 4, 5, 16, dtype=torch.float64)
    ins = args + [gate]
    a = torch.autograd.grad(uf.prefix_attention(*args, **kw, backend="eager"), ins, g)
    b = torch.autograd.grad(sdpa_on_concat(*args, **kw), ins, g)
    for x, y in zip(a, b, strict=True):
        assert_close(x, y, torch.float64, "grad")


@pytest.mark.parametrize(
    "cfg",
    [
        dict(layout="shared", gate="b"),
        dict(layout="indexed", gate="b2", causal=True),
        dict(layout="batch", mask=True, fully_padded=True),
        dict(P=0, causal=True, Lq=5, Lk=2),
    ],
)
def test_gradcheck_float64(cfg):
    case = prefix_attention_case(**{**dict(B=2, H=2, Hkv=1, Lq=3, Lk=4, P=2, D=4), **cfg})
    names = list(case.args) + [n for n in case.diff if n in case.kwargs]

    def fn(*ts):
        args = dict(zip(names, ts, strict=True))
        pos = [args[n] for n in case.args]
        kw = {**case.kwargs, **{n: args[n] for n in names if n in case.kwargs}}
        return uf.prefix_attention(*pos, **kw, backend="eager")

    inputs = [t.detach().requires_grad_(True) for t in case.tensors(names)]
    assert torch.autograd.gradcheck(fn, inputs)


def test_zero_prefix_is_plain_attention():
    case = prefix_attention_case(P=0, causal=True, Lq=6, Lk=6, H=2, Hkv=2)
    q, k, v, pk, pv = case.args.values()
    got = uf.prefix_attention(q, k, v, pk, pv, causal=True, backend="eager")
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(got, want, torch.float64, "out")


def test_layouts_agree():
    """Indexed == per-example layout built by gathering == shared when all indices agree."""
    case = prefix_attention_case(layout="indexed", T=3, B=4)
    q, k, v, pk, pv = case.args.values()
    idx = case.kwargs["prefix_index"]
    a = uf.prefix_attention(q, k, v, pk, pv, prefix_index=idx, backend="eager")
    b = uf.prefix_attention(q, k, v, pk[idx], pv[idx], backend="eager")
    assert_close(a, b, torch.float64, "indexed vs batch")
    same = torch.full_like(idx, 2)
    c = uf.prefix_attention(q, k, v, pk, pv, prefix_index=same, backend="eager")
    d = uf.prefix_attention(q, k, v, pk[2], pv[2], backend="eager")
    assert_close(c, d, torch.float64, "indexed vs shared")


def test_gate_b_equals_b2_with_equal_columns():
    case = prefix_attention_case(gate="b")
    q, k, v, pk, pv = case.args.values()
    g = case.kwargs["prefix_gate"]
    a = uf.prefix_attention(q, k, v, pk, pv, prefix_gate=g, backend="eager")
    b = uf.prefix_attention(q, k, v, pk, pv, prefix_gate=torch.stack([g, g], 1), backend="eager")
    assert_close(a, b, torch.float64, "gate")
    # A key-only gate changes the result differently from a value-only gate.
    one = torch.ones_like(g)
    kg = uf.prefix_attention(q, k, v, pk, pv, prefix_gate=torch.stack([g, one], 1), backend="eager")
    vg = uf.prefix_attention(q, k, v, pk, pv, prefix_gate=torch.stack([one, g], 1), backend="eager")
    assert (kg - vg).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_eager_close_to_float64(dtype):
    case = prefix_attention_case(gate="b2", mask=True, causal=True, layout="batch")
    args = [t.to(dtype) if t.is_floating_point() else t for t in case.args.values()]
    kw = {
        n: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
        for n, t in case.kwargs.items()
    }
    got = uf.prefix_attention(*args, **kw, backend="eager")
    assert got.dtype == dtype
    want = uf.prefix_attention(
        *[a.double() if a.is_floating_point() else a for a in args],
        **{
            n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for n, t in kw.items()
        },
        backend="eager",
    )
    assert_close(got, want, dtype, "out")
