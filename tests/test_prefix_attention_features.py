"""prefix_attention's three flags: logit soft-capping (``softcap``, Gemma 2), attention sinks
(``sinks``, gpt-oss) and a sliding window over token keys (``window``).

The eager reference against independent oracles (transformers' own Gemma 2 / gpt-oss eager
attention on the explicit concatenation [prefix ; tokens], and an explicit per-element
boolean mask plus SDPA for the window), then the torch and Triton backends (interpreter,
at the GPU's block sizes) against the float64 reference, gradients of every input
(sinks included), and the cuda backend's refusal before any launch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import unipelt_fast as uf
from tests import convention_backend
from tests.parity import check_parity, prefix_attention_case
from unipelt_fast.testing import assert_close


def _concat(case):
    """(q, keys, values) with the prefix concatenated in front (the gate applied), per example."""
    q, k, v, pk, pv = case.args.values()
    kw = case.kwargs
    B = q.shape[0]
    if "prefix_index" in kw:
        pk, pv = pk[kw["prefix_index"]], pv[kw["prefix_index"]]
    elif pk.dim() == 3:
        pk, pv = pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)
    if kw.get("prefix_gate") is not None:
        g = kw["prefix_gate"].reshape(B, -1)
        pk, pv = pk * g[:, 0, None, None, None], pv * g[:, -1, None, None, None]
    return q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), pk.shape[2]


def _allowed(B, Lq, Lk, P, kpm, causal, window):
    """Bool (B, 1, Lq, P + Lk), element by element with Python loops (HF's rule: query i is
    at key position i + Lk - Lq; it sees j iff j <= that (causal) and that - j < window)."""
    m = torch.ones(B, 1, Lq, P + Lk, dtype=torch.bool)
    for b in range(B):
        for i in range(Lq):
            pos = i + Lk - Lq
            for j in range(Lk):
                ok = kpm is None or bool(kpm[b, j])
                ok = ok and not (causal and j > pos)
                ok = ok and not (window is not None and pos - j >= window)
                m[b, 0, i, P + j] = ok
    return m


def _hf_eager(family: str, case, **flags):
    """transformers' eager attention of ``family`` on [prefix ; tokens] with an additive
    float mask (dtype min where hidden, as HF builds it); (B, H, Lq, D)."""
    mod = pytest.importorskip(f"transformers.models.{family}.modeling_{family}")
    q, keys, values, P = _concat(case)
    B, H, Lq, D = q.shape
    kw = case.kwargs
    allowed = _allowed(B, Lq, keys.shape[2] - P, P, kw.get("key_padding_mask"),
                       kw.get("causal", False), kw.get("window"))  # fmt: skip
    mask = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, torch.finfo(q.dtype).min)
    module = SimpleNamespace(
        num_key_value_groups=H // keys.shape[1], training=False, head_dim=D, sinks=kw.get("sinks")
    )
    scale = kw.get("softmax_scale") or D**-0.5
    out, _ = mod.eager_attention_forward(
        module, q, keys, values, mask, scaling=scale, softcap=kw.get("softcap")
    )
    return out.transpose(1, 2)


def _with(case, **kw):
    case.kwargs.update(kw)
    if "sinks" in kw:
        case.diff = (*case.diff, "sinks")
    return case


def _sinks(H):
    return torch.randn(H, dtype=torch.float64) + 1.0  # comparable to the logits: it matters


# ---- the reference against independent oracles ------------------------------------------------


def test_softcap_matches_hf_gemma2_eager():
    case = _with(prefix_attention_case(gate="b2", mask=True, causal=True, Lq=5, Lk=8), softcap=0.5)
    args = list(case.args.values())
    got = uf.prefix_attention(*args, **case.kwargs, backend="eager")
    # HF's softmax runs in fp32: compare at fp32's tolerance
    assert_close(got, _hf_eager("gemma2", case), torch.float32, "out")
    # the cap matters (0.5 squeezes these logits hard)
    off = uf.prefix_attention(*args, **{**case.kwargs, "softcap": None}, backend="eager")
    assert (off - got).abs().max() > 1e-2


def test_softcap_comes_before_the_bias():
    """cap(scale q.k) + bias, not cap(scale q.k + bias): HF adds its mask after the cap."""
    case = _with(prefix_attention_case(B=1, H=1, Hkv=1, Lq=2, Lk=3, P=2, bias="k"), softcap=0.3)
    q, k, v, pk, pv = case.args.values()
    bias = case.kwargs["attn_bias"]
    got = uf.prefix_attention(q, k, v, pk, pv, attn_bias=bias, softcap=0.3, backend="eager")
    s = q[0, 0] @ torch.cat([pk[0], k[0, 0]]).T / 4.0  # (Lq, P + Lk), D = 16
    want = torch.softmax(0.3 * torch.tanh(s / 0.3) + bias, -1) @ torch.cat([pv[0], v[0, 0]])
    assert_close(got[0, 0], want, torch.float64, "out")


def test_sinks_match_hf_gpt_oss_eager():
    case = prefix_attention_case(layout="indexed", gate="b", mask=True, H=4, Hkv=2, Lq=6, Lk=6)
    case = _with(case, sinks=_sinks(4))
    args = list(case.args.values())
    got = uf.prefix_attention(*args, **case.kwargs, backend="eager")
    assert_close(got, _hf_eager("gpt_oss", case), torch.float64, "out")
    off = uf.prefix_attention(*args, **{**case.kwargs, "sinks": None}, backend="eager")
    assert (off - got).abs().max() > 1e-2


def test_sinks_explicit_column_and_gradient():
    """softmax([logits ; sink])[:-1] by hand, and d sink = -sum_rows p_sink * rowsum(dO * O)."""
    q, k, v, pk, pv = prefix_attention_case(B=1, H=2, Hkv=1, Lq=3, Lk=4, P=2).args.values()
    sinks = _sinks(2).requires_grad_()
    out = uf.prefix_attention(q, k, v, pk, pv, sinks=sinks, backend="eager")
    keys, vals = torch.cat([pk, k[0]], 1), torch.cat([pv, v[0]], 1)  # (1, P + Lk, D)
    logits = q[0] @ keys.transpose(-1, -2) / 4.0  # (H, Lq, P + Lk)
    full = torch.cat([logits, sinks.detach()[:, None, None].expand(2, 3, 1)], -1)
    probs = torch.softmax(full, -1)
    assert_close(out[0], probs[..., :-1] @ vals, torch.float64, "out")
    g = torch.randn_like(out)
    (ds,) = torch.autograd.grad(out, sinks, g)
    delta = (g * out).sum(-1)[0]  # (H, Lq)
    assert_close(ds, -(probs[..., -1] * delta).sum(-1), torch.float64, "dsinks")


@pytest.mark.parametrize(
    "cfg",
    [
        dict(causal=True, Lq=9, Lk=9, window=3, mask=True),
        dict(causal=True, Lq=3, Lk=10, window=4),  # decoding-like: bottom-right aligned
        dict(causal=False, Lq=6, Lk=5, window=2, P=0, fully_padded=True),
    ],
    ids=["causal", "lq<lk", "noncausal-p0"],
)
def test_window_matches_explicit_mask_and_sdpa(cfg):
    window = cfg.pop("window")
    case = _with(prefix_attention_case(**cfg), window=window)
    q, keys, values, P = _concat(case)
    B, H, Lq, _ = q.shape
    kw = case.kwargs
    allowed = _allowed(
        B, Lq, keys.shape[2] - P, P, kw.get("key_padding_mask"), kw["causal"], window
    )
    Hkv = keys.shape[1]
    keys, values = keys.repeat_interleave(H // Hkv, 1), values.repeat_interleave(H // Hkv, 1)
    row_ok = allowed.any(-1, keepdim=True)
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed | ~row_ok)
    want = want * row_ok  # a row with no visible key (P = 0, padded): 0
    got = uf.prefix_attention(*case.args.values(), **kw, backend="eager")
    assert_close(got, want, torch.float64, "out")
    off = uf.prefix_attention(*case.args.values(), **{**kw, "window": None}, backend="eager")
    assert (off - got).abs().max() > 1e-3


def test_all_three_match_hf_gpt_oss_with_cap():
    """softcap + sinks + window together against gpt-oss's eager attention, logits pre-capped
    through the gemma2 order (HF has no single model with all three: the cap goes first)."""
    case = prefix_attention_case(causal=True, mask=True, Lq=6, Lk=8)
    case = _with(case, sinks=_sinks(4), window=3)
    args = list(case.args.values())
    base = uf.prefix_attention(*args, **case.kwargs, backend="eager")
    assert_close(base, _hf_eager("gpt_oss", case), torch.float64, "out")
    # cap = 1e6 is the identity to float64 rounding: the flags compose, the cap is the last
    got = uf.prefix_attention(*args, **case.kwargs, softcap=1e6, backend="eager")
    assert_close(got, base, torch.float64, "out")


# ---- backends against the float64 reference ---------------------------------------------------

KERNEL_GRID = [
    # softcap with the gate, a mask, causal, the indexed layout and a bias (bias after cap)
    dict(softcap=2.0, gate="b2", mask=True, causal=True, layout="indexed", bias="1hqk"),
    # sinks: GQA, a fully padded example with P = 0 (its rows see only the sink: out 0)
    dict(sinks=True, H=4, Hkv=1, P=0, fully_padded=True, Lq=5, Lk=6),
    # window: Lq < Lk (bottom-right), causal, padding, odd sizes spanning several blocks
    dict(window=5, causal=True, mask=True, Lq=21, Lk=37, P=5, D=24),
    # all three, non-contiguous (HF's transposed views), window without causal, Lq > Lk
    dict(softcap=3.0, sinks=True, window=4, noncontiguous=True, gate="b", Lq=19, Lk=13),
]


def _kernel_case(cfg, device="cpu"):
    cfg = dict(cfg)
    flags = {n: cfg.pop(n) for n in ("softcap", "window") if n in cfg}
    if cfg.pop("sinks", False):
        flags["sinks"] = _sinks(cfg.get("H", 4)).to(device)
    return _with(prefix_attention_case(**cfg, device=device), **flags)


_IDS = ["softcap", "sinks", "window", "all"]
_SLOW = pytest.mark.slow  # CI time: fp16 of every flag alone is opt-in, all three together run


@pytest.mark.parametrize(
    "cfg, dtype",
    [pytest.param(c, torch.float32, id=f"{i}-fp32") for c, i in zip(KERNEL_GRID, _IDS, strict=True)]
    + [pytest.param(KERNEL_GRID[3], torch.float16, id="all-fp16")]
    + [
        pytest.param(c, torch.float16, id=f"{i}-fp16", marks=_SLOW)
        for c, i in zip(KERNEL_GRID[:3], _IDS[:3], strict=True)
    ],
)
def test_triton_matches_reference(cfg, dtype, monkeypatch):
    monkeypatch.setenv("UNIPELT_GPU_CONFIGS", "1")  # the GPU's tiles (partial blocks)
    check_parity(uf.prefix_attention, _kernel_case(cfg), dtype, "triton")


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param({**KERNEL_GRID[2], "Lq": 40, "Lk": 45}, marks=_SLOW),
        dict(window=20, mask=True, Lq=40, Lk=48, P=3, softcap=4.0),  # no causal bound
    ],
    ids=["causal", "noncausal"],
)
def test_triton_small_tiles(cfg):
    """16x16 tiles: the window spans several key blocks per query block (lo / clean bounds)."""
    check_parity(uf.prefix_attention, _kernel_case(cfg), torch.float32, "triton")


@pytest.mark.parametrize("cfg", [KERNEL_GRID[0], KERNEL_GRID[3]], ids=["softcap", "all"])
def test_torch_matches_reference(cfg):
    check_parity(uf.prefix_attention, _kernel_case(cfg), torch.float32, "torch")


GPU_LARGE = [
    dict(softcap=30.0, causal=True, gate="b2", Lq=700, Lk=700, P=32, D=128),
    dict(sinks=True, causal=True, mask=True, H=8, Hkv=2, Lq=257, Lk=1000, P=20, D=64),
    dict(window=128, causal=True, mask=True, Lq=1024, Lk=1024, P=16, D=64),
    dict(softcap=20.0, sinks=True, window=100, causal=True, noncontiguous=True, Lq=600, Lk=600,
         P=24, D=80),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("cfg", GPU_LARGE, ids=_IDS)
def test_triton_matches_reference_gpu(cfg, dtype):
    """The GPU's compiled kernels (bf16, autotuned tiles, long rows: the window skips blocks)."""
    check_parity(uf.prefix_attention, _kernel_case(cfg, "cuda"), dtype, "triton")


def test_torch_window_uses_sdpa():
    check_parity(uf.prefix_attention, _kernel_case(KERNEL_GRID[2]), torch.float32, "torch")


def test_convention_backend_matches_reference(monkeypatch):
    """The custom ops' wiring (schema from the record, the 7th gradient d sinks) with the
    plain-PyTorch backend of the calling convention."""
    convention_backend.install(monkeypatch)
    check_parity(uf.prefix_attention, _kernel_case(KERNEL_GRID[3]), torch.float32, "triton")


def test_triton_sinks_half_gradient_dtype():
    """fp16 sinks: the kernels read float32, autograd casts d sinks back to fp16."""
    case = _kernel_case(KERNEL_GRID[1]).cast(torch.float16)
    out = case.call(uf.prefix_attention, backend="triton")
    (ds,) = torch.autograd.grad(out.float().sum(), case.kwargs["sinks"])
    assert ds.dtype == torch.float16 and ds.shape == (4,)


# ---- refusals and validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, name",
    [({"softcap": 1.0}, "softcap"), ({"sinks": "H"}, "sinks"), ({"window": 2}, "window")],
)
def test_cuda_backend_refuses_before_any_launch(flag, name, monkeypatch):
    from unipelt_fast import _backend

    def no_launch(*a, **kw):
        raise AssertionError("a kernel was reached")

    monkeypatch.setattr(_backend, "resolve_backend", lambda *a, **kw: "cuda")
    monkeypatch.setattr(_backend, "kernel_impl", no_launch)
    case = prefix_attention_case(Lq=2, Lk=2, P=1).cast(torch.float32)
    if name == "sinks":
        flag = {"sinks": torch.zeros(4)}
    with pytest.raises(NotImplementedError, match=name):
        case.call(uf.prefix_attention, backend="cuda", **flag)


def test_cuda_backend_direct_call_refuses():
    """The backend's own entry points refuse too (a direct call must not ignore a flag)."""
    from unipelt_fast import _cuda
    from unipelt_fast._args import PrefixAttentionArgs

    t = torch.zeros(1, 1, 1, 16)
    a = PrefixAttentionArgs(t, t, t, t, t, window=3)
    with pytest.raises(NotImplementedError, match="window"):
        _cuda.prefix_attention.forward(a)
    with pytest.raises(NotImplementedError, match="window"):
        _cuda.prefix_attention.backward(a, t, t, t)


@pytest.mark.parametrize(
    "kw, err, match",
    [
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"softcap": float("inf")}, ValueError, "softcap"),
        ({"softcap": True}, TypeError, "softcap"),
        ({"sinks": torch.zeros(3)}, ValueError, "sinks"),
        ({"sinks": torch.zeros(4, dtype=torch.long)}, TypeError, "sinks"),
        ({"window": 0}, ValueError, "window"),
        ({"window": 2.0}, TypeError, "window"),
    ],
)
def test_validation(kw, err, match):
    case = prefix_attention_case(Lq=2, Lk=2, P=1).cast(torch.float32)
    for be in ("eager", "triton"):
        with pytest.raises(err, match=match):
            case.call(uf.prefix_attention, backend=be, **kw)


def test_flags_off_launch_the_previous_variant(monkeypatch):
    """With every flag off the kernels get SOFTCAP/HAS_SINKS/WINDOW = False: the constexpr
    branches compile away, so the variant is the one without the features."""
    from unipelt_fast import _backend

    kpa = _backend.kernel_impl("prefix_attention", "triton")
    seen = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: seen.append((self.name, kw))

    for name in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
        monkeypatch.setattr(kpa, name, Recorder(name))
    case = prefix_attention_case(Lq=2, Lk=2, P=1).cast(torch.float32)
    from unipelt_fast._args import PrefixAttentionArgs
    from unipelt_fast.ops.prefix_attention import _for_kernels

    q, k, v, pk, pv = case.args.values()
    args = _for_kernels(PrefixAttentionArgs(q, k, v, pk, pv, softmax_scale=None))
    out, lse = kpa.forward(args)
    kpa.backward(args, out, out, lse)
    assert {n for n, _ in seen} == {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}
    for name, kw in seen:
        for flag in ("SOFTCAP", "HAS_SINKS", "WINDOW"):
            assert kw.get(flag, False) is False, f"{name}: {flag} on with the flag off"
