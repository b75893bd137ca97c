"""The prefix_attention op on every backend, and its eager reference (the spec).

Parity (output and every gradient against the float64 eager reference) runs the torch
backend (SDPA composite) everywhere and the triton kernels under the interpreter
(TRITON_INTERPRET=1: fp32 and fp16; bf16 is broken in the interpreter). GPU tests repeat the
grid with bf16 and add large shapes. The eager reference itself is checked against an
independent formulation (SDPA on an explicit concatenation) and by float64 gradcheck.
The CUDA backend's parity runs on a GPU in tests/test_cuda_backend.py.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from unipelt_fast.kernels import prefix_attention as kpa

import unipelt_fast as uf
from tests.convention_backend import op_module
from tests.launches import Counter
from tests.parity import check_parity, noncontig, prefix_attention_case
from unipelt_fast import _autotune, reference
from unipelt_fast._args import PrefixAttentionArgs
from unipelt_fast.testing import assert_close

# Each case covers several features; together: odd lengths (1, 7, 33), P in {0, 1, 16}
# (and 20: two prefix blocks), GQA, the three layouts, both gate shapes, causal with
# Lq == Lk, Lq < Lk and Lq > Lk, padding with a fully padded example, rows that see no key,
# non-contiguous q/k/v/prefix, head dims that are not a power of two, a custom scale.
GRID = [
    dict(),
    dict(Lq=1, Lk=1, P=1),
    dict(Lq=33, Lk=33, P=0, H=2, Hkv=2, gate="b2"),  # gate with no prefix: d gate = 0
    dict(Lq=7, Lk=33, P=16, H=4, Hkv=1, layout="batch", gate="b2"),
    dict(Lq=33, Lk=7, P=20, layout="indexed", T=3, B=3, gate="b"),
    dict(Lq=33, Lk=33, P=1, causal=True, gate="b2"),
    dict(Lq=7, Lk=33, P=16, causal=True, layout="indexed", T=2, B=3),
    dict(Lq=33, Lk=7, P=1, causal=True, H=6, Hkv=3),  # early rows see the prefix only
    dict(Lq=9, Lk=3, P=0, causal=True),  # early rows see no key at all
    dict(Lq=7, Lk=33, P=16, mask=True, gate="b"),
    dict(Lq=7, Lk=7, P=0, fully_padded=True, B=3),  # an example with no visible key
    dict(Lq=33, Lk=7, P=3, fully_padded=True, causal=True, layout="batch", gate="b2"),
    dict(Lq=7, Lk=33, P=16, noncontiguous=True, causal=True, mask=True, gate="b2"),
    dict(Lq=33, Lk=7, P=16, noncontiguous=True, layout="indexed", T=2, H=2, Hkv=1),
    dict(Lq=7, Lk=7, P=1, D=80, gate="b"),
    dict(Lq=7, Lk=7, P=16, D=24, scale=0.3, layout="batch"),
    dict(Lq=7, Lk=0, P=16, H=2, Hkv=1),  # prefix keys only
]


def _id(c: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in c.items()) or "default"


# The torch backend also runs the case with no key at all (SDPA would give NaN there).
NO_KEY = dict(Lq=3, Lk=0, P=0)
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", GRID + [NO_KEY], ids=_id)
def test_parity(cfg, dtype, backend):
    if backend == "triton" and cfg is NO_KEY:
        pytest.skip("the triton grid has its own no-key rows (P=0, causal)")
    check_parity(uf.prefix_attention, prefix_attention_case(**cfg), dtype, backend)


def _canonical_call(case, dtype):
    """(q, k, v, pk, pv, idx, gate, kpm) in the kernel convention, from a case."""
    c = case.cast(dtype)
    a, kw = c.args, c.kwargs
    B = a["q"].shape[0]
    pk, pv, idx = op_module("prefix_attention")._canonical_prefix(
        a["prefix_k"], a["prefix_v"], kw.get("prefix_index"), B)
    gate = kw.get("prefix_gate")
    if gate is not None:
        gate = gate.float().reshape(B, -1).expand(B, 2).contiguous()
    return (a["q"], a["k"], a["v"], pk, pv, idx, gate, kw.get("key_padding_mask"))


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "cfg",
    [
        dict(Lq=9, Lk=3, P=0, causal=True, gate="b2", layout="batch"),
        dict(Lq=7, Lk=20, P=16, fully_padded=True, layout="indexed"),
    ],
    ids=_id,
)
def test_lse_matches_reference(cfg):
    """The saved row log-sum-exp is natural-log and -inf exactly for rows with no key."""
    from unipelt_fast.kernels import prefix_attention as kpa

    case = prefix_attention_case(**cfg)
    q, k, v, pk, pv, idx, gate, kpm = _canonical_call(case, torch.float32)
    causal = cfg.get("causal", False)
    scale = q.shape[-1] ** -0.5
    _, lse = kpa.forward(PrefixAttentionArgs(q, k, v, pk, pv, idx, gate, kpm, causal, scale))
    expected = reference.prefix_attention_lse(
        q.double(),
        k.double(),
        pk.double(),
        prefix_index=idx,
        prefix_gate=None if gate is None else gate.double(),
        key_padding_mask=kpm,
        causal=causal,
        softmax_scale=scale,
    )
    empty = torch.isinf(expected)
    assert torch.equal(torch.isinf(lse), empty)
    assert (lse[empty] < 0).all()
    assert_close(lse[~empty], expected[~empty], torch.float32, "lse")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_task_gradient_sums_examples_and_unused_task_is_zero(dtype):
    """Indexed layout where tasks 0 and 1 serve several examples and task 2 none."""
    case = prefix_attention_case(B=4, H=4, Hkv=2, Lq=7, Lk=9, P=16, layout="indexed", T=3)
    case.kwargs["prefix_index"] = torch.tensor([1, 0, 1, 1])
    case.kwargs["prefix_gate"] = torch.rand(4, 2, dtype=torch.float64) + 0.2
    case.diff = (*case.diff, "prefix_gate")
    check_parity(uf.prefix_attention, case, dtype, "triton")
    # and the unused task's gradient is exactly zero (not NaN, not left unwritten)
    c = case.cast(dtype)
    uf.prefix_attention(*c.args.values(), **c.kwargs, backend="triton").sum().backward()
    assert torch.equal(c.args["prefix_k"].grad[2], torch.zeros_like(c.args["prefix_k"][2]))
    assert torch.equal(c.args["prefix_v"].grad[2], torch.zeros_like(c.args["prefix_v"][2]))


@pytest.mark.interpreter
def test_noncontiguous_key_padding_mask_and_gate():
    """A strided key_padding_mask and a strided (B,) gate."""
    case = prefix_attention_case(B=3, Lq=7, Lk=9, P=3, gate="b", mask=True)
    case.kwargs["key_padding_mask"] = noncontig(case.kwargs["key_padding_mask"])
    case.kwargs["prefix_gate"] = noncontig(case.kwargs["prefix_gate"])
    assert not case.kwargs["key_padding_mask"].is_contiguous()
    check_parity(uf.prefix_attention, case, torch.float32, "triton")


def _in_layout(q: torch.Tensor, layout: str) -> torch.Tensor:
    """q's values as HF hands them over: "hf" a (B, L, H, D) buffer seen as (B, H, L, D);
    "fused_qkv" GPT-2's slice of one fused projection (not dense); else contiguous."""
    B, H, L, D = q.shape
    if layout == "hf":
        return q.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "fused_qkv":
        qkv = torch.randn(B, L, 3, H, D, dtype=q.dtype)
        qkv[:, :, 1] = q.transpose(1, 2)
        return qkv[:, :, 1].transpose(1, 2)
    return q.contiguous()


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "torch", "eager"])
@pytest.mark.parametrize("layout", ["hf", "fused_qkv", "contiguous"])
def test_out_comes_back_in_q_layout(backend, layout):
    """out is dense in q's dimension order on every backend, so HF's out.transpose(1, 2)
    needs no copy; values and gradients are the reference's."""
    case = prefix_attention_case(B=2, H=4, Hkv=2, Lq=7, Lk=7, P=3, gate="b2", causal=True)
    ref_in = case.cast(torch.float64)
    ref = ref_in.call(reference.prefix_attention)
    g = torch.randn_like(ref)
    ref.backward(g)
    c = case.cast(torch.float32)
    q = _in_layout(c.args["q"].detach(), layout).requires_grad_()
    c.args["q"] = q
    out = c.call(uf.prefix_attention, backend=backend)
    if layout == "contiguous":
        assert out.is_contiguous()
    else:
        assert out.transpose(1, 2).is_contiguous()  # (B, L, H, D) underneath
    assert_close(out, ref, torch.float32, "out")
    # triton's dq comes back in q's layout too (eager/torch: autograd's choice), so HF's
    # view of the projection takes it without a copy
    (dq,) = torch.autograd.grad(out, q, g.float(), retain_graph=True)
    if layout != "contiguous" and backend == "triton":
        assert dq.transpose(1, 2).is_contiguous()
    out.backward(g.float())
    for name in case.diff:
        got = q.grad if name == "q" else {**c.args, **c.kwargs}[name].grad
        want = {**ref_in.args, **ref_in.kwargs}[name].grad
        assert_close(got, want, torch.float32, name)


@pytest.mark.interpreter
def test_backward_writes_dq_dk_dv_in_their_inputs_layouts():
    """The kernel's dq/dk/dv have q's/k's/v's dimension order (HF's (B, L, H, D) buffers),
    with the values of the contiguous run, and the fake agrees (opcheck covers strides)."""
    case = prefix_attention_case(B=2, H=4, Hkv=2, Lq=9, Lk=9, P=3, gate="b2", causal=True)
    hf = dataclasses.replace(case, args=dict(case.args))
    for n in ("q", "k", "v"):
        hf.args[n] = _in_layout(case.args[n], "hf")
    grads = []
    for cs in (case, hf):
        c = cs.cast(torch.float32)
        out = c.call(uf.prefix_attention, backend="triton")
        grads.append(torch.autograd.grad(out, c.tensors(("q", "k", "v")), torch.ones_like(out)))
    for a, b in zip(*grads, strict=True):
        assert b.transpose(1, 2).is_contiguous() and a.is_contiguous()
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "P, block_n, want",
    [(0, 64, 16), (16, 64, 16), (20, 64, 32), (48, 64, 16), (64, 64, 64), (80, 128, 32),
     (100, 128, 128), (16, 16, 16), (64, 32, 32)],
)  # fmt: skip
def test_prefix_block_pads_p_little_with_the_widest_tile(P, block_n, want):
    assert kpa.prefix_block(P, block_n) == want


FWD_CANDIDATES = sorted(
    {c for D in (64, 128) for a in (80, 90) for c in kpa.fwd_candidates(torch.float16, D, a)}
)


def test_forward_candidates_start_with_the_default_and_stay_few():
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for D in (64, 128, 256):
            for arch in (80, 90):
                assert kpa.fwd_candidates(dt, D, arch)[0] == kpa.gpu_configs(dt, D)["fwd"]
                for drop in (False, True):
                    c = kpa.fwd_candidates(dt, D, arch, drop)
                    assert 1 <= len(c) <= 6 and len(set(c)) == len(c)
                    assert all(bm >= 16 and bn >= 16 for bm, bn, _, _ in c)  # tl.dot on a GPU


@pytest.mark.interpreter
@pytest.mark.parametrize("cfg", FWD_CANDIDATES, ids=lambda c: "x".join(map(str, c)))
def test_forward_candidates_interpreter(cfg, monkeypatch):
    """Every autotuning candidate's tiles (two query and two key blocks of 128, a 32-wide
    prefix tile for P = 20, causal, padding, gate) match the reference."""
    real = kpa._configs
    monkeypatch.setattr(kpa, "_configs", lambda q, D: {**real(q, D), "fwd": cfg})
    case = prefix_attention_case(
        B=2, H=2, Hkv=1, Lq=150, Lk=140, P=20, D=32, causal=True, mask=True, gate="b2"
    )
    check_parity(uf.prefix_attention, case, torch.float16, "triton")


def _saved_bytes(backend: str, P: int, L: int) -> int:
    case = prefix_attention_case(B=2, H=2, Hkv=1, Lq=L, Lk=L, P=P, gate="b2", mask=True)
    c = case.cast(torch.float32)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = c.call(uf.prefix_attention, backend=backend)
    out.sum().backward()  # the saved state is sufficient for backward
    return total


@pytest.mark.interpreter
def test_saved_bytes_do_not_grow_with_p_times_l():
    """Saved state must be additive in P and L (inputs, out, lse): the mixed difference
    S(P2, L2) - S(P1, L2) - S(P2, L1) + S(P1, L1) is 0 for f(P) + g(L), and positive as soon
    as anything of size L x (P + L) is saved (as the eager reference does)."""
    P1, P2, L1, L2 = 1, 16, 7, 33

    def mixed(backend):
        s = {(p, l): _saved_bytes(backend, p, l) for p in (P1, P2) for l in (L1, L2)}
        return s[P2, L2] - s[P1, L2] - s[P2, L1] + s[P1, L1], s

    mix, sizes = mixed("triton")
    assert mix == 0, sizes
    # The measurement can fail: the eager reference saves (B, H, L, P + L) probabilities.
    eager_mix, _ = mixed("eager")
    assert eager_mix > 0


def _hf_layout(t: torch.Tensor) -> torch.Tensor:
    """The same (B, H, L, D) values in (B, L, H, D) memory: HF's transposed views."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.interpreter
def test_backward_reads_grad_out_and_out_through_their_strides():
    """The kernels take dO's and O's own strides (the op copies neither): an HF-strided dO
    and O, and a stride-0 dO (``out.sum().backward()``), give the gradients of contiguous
    ones bit for bit."""
    from unipelt_fast.kernels import prefix_attention as kpa

    case = prefix_attention_case(B=2, H=4, Hkv=2, Lq=20, Lk=9, P=16, layout="indexed", T=2,
                                 gate="b2", mask=True, causal=True)  # fmt: skip
    args = PrefixAttentionArgs(*_canonical_call(case, torch.float32), True, 0.3)
    out, lse = kpa.forward(args)
    g = torch.randn_like(out)
    ones = torch.ones(1).expand_as(out)
    assert not _hf_layout(out).is_contiguous() and ones.stride() == (0, 0, 0, 0)
    for dout, o in ((g, out), (_hf_layout(g), _hf_layout(out)), (ones, _hf_layout(out))):
        got = kpa.backward(args, dout, o, lse)
        want = kpa.backward(args, dout.contiguous(), out, lse)
        for a, b in zip(got, want, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)  # d sinks: None here


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_strided_grad_out_reaches_the_kernels_and_matches_reference(dtype, monkeypatch):
    """Through autograd, an HF-strided upstream gradient arrives at the kernel launcher
    uncopied, and every gradient matches the float64 reference."""
    from unipelt_fast.kernels import prefix_attention as kpa

    seen = []
    orig = kpa.backward
    monkeypatch.setattr(
        kpa, "backward", lambda a, g, *s: seen.append(g.stride()) or orig(a, g, *s)
    )
    case = prefix_attention_case(B=2, H=2, Hkv=1, Lq=9, Lk=7, P=5, noncontiguous=True,
                                 gate="b2", layout="batch")  # fmt: skip
    test, ref = case.cast(dtype), case.cast(dtype).cast(torch.float64)
    out = test.call(uf.prefix_attention, backend="triton")
    expected = ref.call(uf.prefix_attention, backend="eager")
    g = _hf_layout(torch.randn_like(expected).to(dtype))
    gt = torch.autograd.grad(out, test.tensors(case.diff), g)
    gr = torch.autograd.grad(expected, ref.tensors(case.diff), g.double())
    assert seen == [g.stride()]
    for name, a, e in zip(case.diff, gt, gr, strict=True):
        assert_close(a, e, dtype, f"d{name}")


@pytest.mark.interpreter
@pytest.mark.parametrize("gate", [None, "b2"])
def test_backward_launches(monkeypatch, gate):
    """The whole backward is three launches (dQ with delta and the prefix partials, token
    dK/dV, the per-task prefix and gate sums): no preprocess, zero-fill or torch op."""
    from unipelt_fast.kernels import prefix_attention as kpa

    case = prefix_attention_case(B=3, H=4, Hkv=2, Lq=20, Lk=9, P=5, layout="indexed", T=2,
                                 gate=gate, mask=True, causal=True)  # fmt: skip
    args = PrefixAttentionArgs(*_canonical_call(case, torch.float32), True, 0.3)
    out, lse = kpa.forward(args)
    expected = ["_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_prefix_sum_kernel"]
    count = Counter(monkeypatch, "prefix_attention")
    g = _hf_layout(torch.randn_like(out))
    with count:
        kpa.backward(args, g, out, lse)
    assert count.launches == expected
    assert count.compute_ops() == []
    c = case.cast(torch.float32)
    out = c.call(uf.prefix_attention, backend="triton")
    count.clear()
    with count:
        out.backward(g)
    assert count.launches == expected
    assert count.compute_ops() == ["unipelt_fast.prefix_attention_backward"]


# ---- GPU ----------------------------------------------------------------------------------

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("cfg", GRID, ids=_id)
def test_parity_gpu(cfg, dtype):
    check_parity(uf.prefix_attention, prefix_attention_case(**cfg, device="cuda"), dtype, "triton")


LARGE = [
    dict(D=D, Lq=L, Lk=L, **extra)
    for D in (64, 128)
    for L in (512, 2048)
    for extra in (
        dict(P=32, gate="b2", causal=True),
        dict(P=64, H=8, Hkv=2, layout="indexed", T=2, mask=True, fully_padded=True),
    )
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("cfg", LARGE, ids=_id)
def test_parity_gpu_large(cfg, dtype):
    check_parity(uf.prefix_attention, prefix_attention_case(**cfg, device="cuda"), dtype, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("D", [80, 96, 256])
def test_parity_gpu_odd_head_dims(D, dtype):
    cfg = dict(D=D, Lq=300, Lk=257, P=20, causal=True, gate="b2", noncontiguous=True)
    check_parity(uf.prefix_attention, prefix_attention_case(**cfg, device="cuda"), dtype, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_backward_is_deterministic_gpu(dtype):
    """Two backward runs give bit-identical gradients, the prefix ones (summed over examples
    and query heads of a shared prefix) included."""
    case = prefix_attention_case(
        B=8, H=8, Hkv=2, Lq=300, Lk=300, P=48, D=64, gate="b2", mask=True, device="cuda"
    )
    grads = []
    for _ in range(2):
        c = case.cast(dtype)
        out = c.call(uf.prefix_attention, backend="triton")
        g = torch.autograd.grad(out, c.tensors(case.diff), torch.ones_like(out))
        grads.append(g)
    for name, a, b in zip(case.diff, *grads, strict=True):
        assert torch.equal(a, b), f"d{name} differs between two identical backward runs"


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("i", range(6))
def test_every_forward_candidate_gpu(i, D, monkeypatch):
    """Each autotuning candidate, forced, matches the reference (bf16)."""
    cands = kpa.fwd_candidates(torch.bfloat16, D, kpa._arch(torch.device("cuda")))
    if i >= len(cands):
        pytest.skip(f"{len(cands)} candidates at D={D}")
    monkeypatch.setattr(kpa, "fwd_candidates", lambda *a: [cands[i]])
    cfg = dict(D=D, Lq=300, Lk=300, P=20, causal=True, gate="b2", mask=True, noncontiguous=True)
    check_parity(uf.prefix_attention, prefix_attention_case(**cfg, device="cuda"),
                 torch.bfloat16, "triton")  # fmt: skip


@pytest.mark.gpu
def test_autotuned_forward_gpu(monkeypatch):
    """With autotuning on, the first call times the candidates, the result is right and
    the choice is recorded."""
    monkeypatch.setenv("UNIPELT_AUTOTUNE", "1")
    _autotune.reset()
    cfg = dict(D=128, Lq=1024, Lk=1024, P=64, causal=True, gate="b2")
    check_parity(uf.prefix_attention, prefix_attention_case(**cfg, device="cuda"),
                 torch.bfloat16, "triton")  # fmt: skip
    assert any(k.startswith("prefix_attention.fwd") for k in _autotune.chosen())
    _autotune.reset()


# ---- the torch backend -------------------------------------------------------------------


def test_no_fp32_probability_matrix_is_saved():
    """Autograd keeps no (B, H, Lq, P + Lk) floating tensor: the probabilities are never
    kept (the eager reference keeps them)."""
    B, H, Lq, Lk, P = 2, 4, 33, 40, 8
    case = prefix_attention_case(B=B, H=H, Hkv=2, Lq=Lq, Lk=Lk, P=P, mask=True, causal=True)
    c = case.cast(torch.float32)

    def saved_shapes(backend):
        shapes = []

        def pack(t):
            if t.is_floating_point():
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            c.call(uf.prefix_attention, backend=backend)
        return shapes

    # (B, H, Lq, P+Lk): probabilities. torch's CPU flash kernel keeps its additive form of
    # the mask, (B, 1, Lq, P+Lk): 1/H of that, and not a probability matrix.
    probs = lambda s: s == (B, H, Lq, P + Lk)
    assert any(probs(s) for s in saved_shapes("eager"))  # the check can fail
    assert not any(probs(s) for s in saved_shapes("torch"))


# ---- the eager reference (the spec) against an independent formulation -----------------


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


SPEC_GRID = [
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


@pytest.mark.parametrize("cfg", SPEC_GRID, ids=[str(i) for i in range(len(SPEC_GRID))])
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
