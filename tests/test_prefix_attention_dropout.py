"""Attention dropout in prefix_attention (``dropout_p``): every backend, and the HF path.

The triton kernels draw their keep-mask with Philox and regenerate it in backward; the debug
hook ``kernels.prefix_attention.dropout_keep_mask`` returns it, so the eager reference
(float64) reproduces a kernel call exactly. Small shapes, interpreter only (fp32).
"""

import math

import pytest
import torch

import unipelt_fast as uf
from tests import convention_backend
from tests.hf_tiny import batch, perturb, tiny_model
from tests.parity import prefix_attention_case
from unipelt_fast import reference
from unipelt_fast._args import PrefixAttentionArgs
from unipelt_fast.testing import assert_close

P_DROP = 0.3
BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter), "eager", "torch"]


def _kpa():
    from unipelt_fast.kernels import prefix_attention as kpa

    return kpa


def _call(case, backend, p, seed=None, **kw):
    if seed is not None:
        torch.manual_seed(seed)
    return case.call(uf.prefix_attention, backend=backend, dropout_p=p, **kw)


def _grads(case, out, g):
    return torch.autograd.grad(out, case.tensors(case.diff), g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_p0_is_bit_identical(backend):
    """dropout_p=0 is the path without dropout: same output and gradients, bit for bit."""
    case = prefix_attention_case(Lq=7, Lk=9, P=3, gate="b2", mask=True).cast(torch.float32)
    a = case.call(uf.prefix_attention, backend=backend)
    b = _call(case, backend, 0.0)
    assert torch.equal(a, b)
    g = torch.randn_like(a)
    for x, y in zip(_grads(case, a, g), _grads(case, b, g), strict=True):
        assert torch.equal(x, y)


@pytest.mark.interpreter
def test_p0_launches_without_dropout(monkeypatch):
    """p=0 reaches the kernel backend exactly as before (no dropout, no seed: DROPOUT off)."""
    kpa = _kpa()
    seen = []
    fwd = kpa.forward
    monkeypatch.setattr(kpa, "forward", lambda a: seen.append(a) or fwd(a))
    case = prefix_attention_case(Lq=3, Lk=3, P=2).cast(torch.float32)
    _call(case, "triton", 0.0)
    _call(case, "triton", P_DROP, seed=0)
    assert seen[0].dropout_p == 0 and seen[0].seed is None
    assert seen[1].dropout_p == P_DROP and seen[1].seed.dtype == torch.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_reproduces_and_differs(backend):
    case = prefix_attention_case(Lq=7, Lk=9, P=3, gate="b", causal=True).cast(torch.float32)
    a, b, c = (_call(case, backend, P_DROP, seed=s) for s in (1, 1, 2))
    none = case.call(uf.prefix_attention, backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, none)


@pytest.mark.interpreter
def test_keep_mask_statistics():
    """The hook's mask: about 1 - p kept, reproducible, different per seed and per (b, h)."""
    kpa = _kpa()
    torch.manual_seed(0)
    s1, s2 = uf.ops.dropout_seed(torch.device("cpu")), uf.ops.dropout_seed(torch.device("cpu"))
    shape = (2, 2, 33, 5, 40)  # B, H, Lq, P, Lk: 10,020 draws
    m1 = kpa.dropout_keep_mask(s1, *shape, P_DROP)
    assert m1.shape == (2, 2, 33, 45) and m1.dtype == torch.bool
    n = m1.numel()
    assert abs(m1.float().mean().item() - (1 - P_DROP)) < 5 * math.sqrt(P_DROP * (1 - P_DROP) / n)
    assert torch.equal(m1, kpa.dropout_keep_mask(s1, *shape, P_DROP))
    assert (m1 != kpa.dropout_keep_mask(s2, *shape, P_DROP)).float().mean() > 0.3
    assert (m1[0] != m1[1]).float().mean() > 0.3 and (m1[:, 0] != m1[:, 1]).float().mean() > 0.3


# Odd sizes, GQA, two prefix blocks, gates, padding with an empty example, causal with
# Lq != Lk, the indexed layout, non-contiguous inputs and an attn_bias.
KERNEL_CASES = [
    dict(Lq=19, Lk=23, P=20, H=4, Hkv=2, gate="b2", mask=True, fully_padded=True, B=3),
    dict(Lq=17, Lk=9, P=5, causal=True, layout="indexed", T=2, B=3, gate="b"),
    dict(Lq=9, Lk=17, P=3, causal=True, noncontiguous=True, bias="1hqk", H=2, Hkv=1),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("cfg", KERNEL_CASES, ids=range(len(KERNEL_CASES)))
def test_kernel_matches_reference_with_its_mask(cfg):
    """Triton fwd and every input's gradient == the float64 reference run with the kernel's
    keep-mask (from the debug hook, for the seed torch.manual_seed gives the call)."""
    case = prefix_attention_case(**cfg)
    test, ref = case.cast(torch.float32), case.cast(torch.float64)
    q, k, pk = test.args["q"], test.args["k"], test.args["prefix_k"]
    B, H, Lq, _ = q.shape
    torch.manual_seed(7)
    mask = _kpa().dropout_keep_mask(
        uf.ops.dropout_seed(q.device), B, H, Lq, pk.shape[-2], k.shape[2], P_DROP
    )
    out = _call(test, "triton", P_DROP, seed=7)
    want = ref.call(reference.prefix_attention, dropout_p=P_DROP, dropout_mask=mask)
    assert_close(out, want, torch.float32, "out")
    g = torch.randn_like(want)
    got_g = _grads(test, out, g.float())
    for name, a, e in zip(case.diff, got_g, _grads(ref, want, g), strict=True):
        assert_close(a, e, torch.float32, f"d{name}")


@pytest.mark.interpreter
@pytest.mark.parametrize("fwd", [(128, 32, 4, 3), (64, 128, 8, 2)], ids=["128x32", "64x128"])
def test_dropout_forward_at_gpu_tiles_matches_reference(fwd, monkeypatch):
    """The forward's dropout candidates' tiles (mask columns in 32- and 128-wide blocks, a
    32-wide prefix tile for P = 20) draw the same keep-mask as the debug hook."""
    kpa = _kpa()
    real = kpa._configs
    monkeypatch.setattr(kpa, "_configs", lambda q, D: {**real(q, D), "fwd": fwd})
    case = prefix_attention_case(B=2, H=2, Hkv=1, Lq=70, Lk=140, P=20, gate="b2", mask=True)
    test, ref = case.cast(torch.float32), case.cast(torch.float64)
    torch.manual_seed(3)
    mask = kpa.dropout_keep_mask(
        uf.ops.dropout_seed(torch.device("cpu")), 2, 2, 70, 20, 140, P_DROP
    )
    out = _call(test, "triton", P_DROP, seed=3)
    want = ref.call(reference.prefix_attention, dropout_p=P_DROP, dropout_mask=mask)
    assert_close(out, want, torch.float32, "out")


@pytest.mark.interpreter
def test_kernel_backward_matches_finite_differences():
    """With the seed fixed (the same mask every call), the triton gradient's directional
    derivative matches a central finite difference of the triton forward (fp32)."""
    case = prefix_attention_case(Lq=7, Lk=9, P=3, gate="b2", mask=True, causal=True)
    test = case.cast(torch.float32)
    xs = test.tensors(case.diff)
    g = torch.randn(2, 4, 7, 16)
    out = _call(test, "triton", P_DROP, seed=3)
    grads = _grads(test, out, g)
    dirs = [torch.randn_like(x) for x in xs]
    analytic = sum((gr * d).sum() for gr, d in zip(grads, dirs, strict=True)).item()
    eps = 1e-2
    vals = []
    with torch.no_grad():
        for sign in (1, -1):
            for x, d in zip(xs, dirs, strict=True):
                x.add_(sign * eps * d)
            vals.append((_call(test, "triton", P_DROP, seed=3) * g).sum().item())
            for x, d in zip(xs, dirs, strict=True):
                x.sub_(sign * eps * d)
    numeric = (vals[0] - vals[1]) / (2 * eps)
    assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (numeric, analytic)


def test_reference_gradcheck_with_a_fixed_mask():
    """The spec's own backward under a fixed keep-mask (float64 gradcheck)."""
    case = prefix_attention_case(B=1, H=2, Hkv=1, Lq=3, Lk=4, P=2, D=4, gate="b2", causal=True)
    keep = torch.rand(1, 2, 3, 6) > P_DROP
    fn = lambda *xs: reference.prefix_attention(
        *xs[:5], prefix_gate=xs[5], causal=True, dropout_p=P_DROP, dropout_mask=keep
    )
    torch.autograd.gradcheck(fn, tuple(case.cast(torch.float64).tensors(case.diff)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_over_seeds_is_the_output_without_dropout(backend):
    """E[dropout output] = the output without dropout: the mean over 8 seeds x 12 identical
    examples (independent masks) is within a few standard errors, computed from the
    reference's probabilities: Var = p / (1 - p) * sum_j P_j^2 v_j^2 per output element."""
    n_ex, n_seeds = 12, 8
    base = prefix_attention_case(B=1, H=2, Hkv=1, Lq=5, Lk=6, P=3, gate="b2")
    args = {n: t.expand(n_ex, *t.shape[1:]) for n, t in base.args.items() if n in ("q", "k", "v")}
    kw = {"prefix_gate": base.kwargs["prefix_gate"].expand(n_ex, 2)}
    pk, pv = base.args["prefix_k"], base.args["prefix_v"]
    q, k, v = (args[n].float() for n in ("q", "k", "v"))
    kw32 = {"prefix_gate": kw["prefix_gate"].float()}
    samples = []
    for s in range(n_seeds):
        torch.manual_seed(100 + s)
        samples.append(
            uf.prefix_attention(
                q, k, v, pk.float(), pv.float(), **kw32, dropout_p=P_DROP, backend=backend
            ).double()
        )
    mean = torch.stack(samples).mean(dim=(0, 1))  # over seeds and examples
    qd, kd, vd = base.args["q"], base.args["k"], base.args["v"]
    gate = base.kwargs["prefix_gate"]
    want = reference.prefix_attention(qd, kd, vd, pk, pv, prefix_gate=gate)[0]
    # Probabilities and gated values of the reference, for the variance.
    keys = torch.cat([pk * gate[0, 0], kd[0]], dim=1)
    vals = torch.cat([pv * gate[0, 1], vd[0]], dim=1)
    probs = torch.softmax(qd[0] @ keys.transpose(-1, -2) * 16**-0.5, dim=-1)  # (H, Lq, P+Lk)
    var = P_DROP / (1 - P_DROP) * (probs**2) @ (vals**2)
    se = (var.sum() / (n_ex * n_seeds)).sqrt().item()  # expected ||mean - want||
    err = (mean - want).norm().item()
    assert err < 2.5 * se, (err, se)
    one = (samples[0][0] - want).norm().item()  # one draw really is noisy
    assert one > 0.3 * se * math.sqrt(n_ex * n_seeds), (one, se)


BAD_P = [(-0.1, ValueError), (1.0, ValueError), (float("nan"), ValueError)]
BAD_P += [(float("inf"), ValueError), ("0.1", TypeError), (True, TypeError)]
BAD_P += [(torch.tensor(0.1), TypeError)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,err", BAD_P, ids=lambda x: str(x))
def test_bad_dropout_p_raises(backend, bad, err):
    case = prefix_attention_case(Lq=2, Lk=2, P=1).cast(torch.float32)
    with pytest.raises(err, match="dropout_p"):
        case.call(uf.prefix_attention, backend=backend, dropout_p=bad)


def test_cuda_backend_raises_before_any_launch(monkeypatch):
    from unipelt_fast import _backend

    ops_mod = convention_backend.op_module("prefix_attention")

    def no_launch(*a, **kw):
        raise AssertionError("a kernel was reached")

    monkeypatch.setattr(_backend, "resolve_backend", lambda *a, **kw: "cuda")
    monkeypatch.setattr(_backend, "kernel_impl", no_launch)
    monkeypatch.setattr(ops_mod, "dropout_seed", no_launch)
    case = prefix_attention_case(Lq=2, Lk=2, P=1).cast(torch.float32)
    with pytest.raises(NotImplementedError, match="dropout"):
        case.call(uf.prefix_attention, backend="cuda", dropout_p=0.1)


# ---- HF: the attention module's dropout in training mode, 0 in eval ------------------------


def _bert(backend, p):
    m = tiny_model("bert")
    m.config.attention_probs_dropout_prob = p
    for mod in m.modules():  # hf_tiny builds with 0; set the probs dropout of every layer
        if type(mod).__name__.endswith("SelfAttention"):
            mod.dropout.p = p
    cfg = uf.UniPELTConfig(bitfit=False, adapter=False, lora=False, gate_mode="masked_mean")
    m = uf.apply_unipelt(m, cfg, backend=backend)
    perturb(m)
    return m


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_bert_prefix_attention_dropout(backend):
    b = batch("bert")
    m = _bert(backend, 0.4)
    m.train()
    logits = []
    for s in (1, 1, 2):
        torch.manual_seed(s)
        logits.append(m(**b).logits.detach())
    assert torch.equal(logits[0], logits[1])
    assert not torch.allclose(logits[0], logits[2])
    m.eval()
    with torch.no_grad():
        ev = m(**b).logits
    for mod in m.modules():  # the same model with p = 0, in training mode
        if type(mod).__name__.endswith("SelfAttention"):
            mod.dropout.p = 0.0
    m.train()
    with torch.no_grad():
        p0 = m(**b).logits
    assert torch.equal(ev, p0)
    assert not torch.allclose(ev, logits[0])


@pytest.mark.interpreter
def test_fp16_kernel_matches_reference_with_its_mask():
    case = prefix_attention_case(Lq=9, Lk=17, P=5, gate="b2", mask=True, causal=True)
    test, ref = case.cast(torch.float16), case.cast(torch.float16).cast(torch.float64)
    torch.manual_seed(4)
    mask = _kpa().dropout_keep_mask(uf.ops.dropout_seed(torch.device("cpu")), 2, 4, 9, 5, 17, 0.2)
    out = _call(test, "triton", 0.2, seed=4)
    want = ref.call(reference.prefix_attention, dropout_p=0.2, dropout_mask=mask)
    assert_close(out, want, torch.float16, "out")
    g = torch.randn_like(want).half()
    got_g = _grads(test, out, g)
    for name, a, e in zip(case.diff, got_g, _grads(ref, want, g.double()), strict=True):
        assert_close(a, e, torch.float16, f"d{name}")


def _saved(backend, p):
    c = prefix_attention_case(Lq=7, Lk=9, P=3, gate="b2", mask=True).cast(torch.float32)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: sizes.append(t.numel() * t.element_size()) or t, lambda t: t
    ):
        out = _call(c, backend, p, seed=0)
    out.sum().backward()
    return sum(sizes)


@pytest.mark.interpreter
def test_dropout_saves_only_the_seed():
    """No keep-mask is saved: dropout adds exactly the 8-byte int64 seed to the saved state."""
    assert _saved("triton", P_DROP) == _saved("triton", 0.0) + 8


@pytest.mark.interpreter
def test_opcheck_with_dropout(monkeypatch):
    """Schema, fake tensors and autograd registration of the custom op with dropout_p/seed."""
    ops = convention_backend.op_module("prefix_attention")

    captured = {}
    target = ops._prefix_attention_op

    def spy(*args):
        captured["args"] = args
        return target(*args)

    monkeypatch.setattr(ops, "_prefix_attention_op", spy)
    case = prefix_attention_case(Lq=5, Lk=6, P=3, gate="b2", causal=True).cast(torch.float32)
    _call(case, "triton", P_DROP, seed=0)
    args = PrefixAttentionArgs(*captured["args"][:-1])  # the record's fields, then backend
    assert args.dropout_p == P_DROP and args.seed.dtype == torch.int64
    torch.library.opcheck(
        target._opoverload,
        captured["args"],
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
