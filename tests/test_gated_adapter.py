"""The gated_adapter op on every backend, and its eager reference (the spec).

Parity (output and every gradient against the float64 eager reference) runs the torch
backend (the eager code in the test dtype) everywhere and the triton kernels under the
interpreter (TRITON_INTERPRET=1) at small odd shapes; GPU tests repeat the grid on CUDA and
add bf16 at a realistic size. The eager reference itself is checked against an independent
per-example formulation and by float64 gradcheck. The CUDA backend's parity runs on a GPU in
tests/test_cuda_backend.py.
"""

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

import unipelt_fast as uf
from tests.launches import Counter
from tests.parity import check_parity, gated_adapter_case, noncontig
from unipelt_fast._args import GatedAdapterArgs
from unipelt_fast.testing import assert_close

# One dict per case; together they cover every feature at least once (not the full product):
# r in {1, 8, 48, 200 (r padded to 256)}, d never a multiple of the block (and d > block, so
# several d chunks with a ragged tail; several row blocks and row splits with a ragged tail),
# all activations, gate none/token/mean/masked mean/fully padded example, separate residual, either bias None, no gate bias, scaling, and
# leading shapes (M,), (B, L), (B, L) non-contiguous, (M,) non-contiguous, (A, B, L).
CASES = {
    "M-r1-none-relu": dict(lead=(7,), d=33, r=1),
    "BL-r8-token-gelu-res": dict(
        lead=(2, 7), d=33, r=8, gate_mode="token", activation="gelu", residual=True
    ),
    "BLnc-r48-token-gelutanh-nobd": dict(
        lead=(3, 33),
        d=100,
        r=48,
        gate_mode="token",
        activation="gelu_tanh",
        noncontiguous=True,
        bias_down=False,
    ),
    "BL-r8-mean-silu-nobu-scale": dict(
        lead=(2, 7), d=100, r=8, gate_mode="mean", activation="silu", bias_up=False, scaling=0.5
    ),
    "BLnc-r48-maskedmean-tanh-res": dict(
        lead=(3, 33),
        d=33,
        r=48,
        gate_mode="mean",
        masked=True,
        activation="tanh",
        residual=True,
        noncontiguous=True,
    ),
    "BL-r1-padded-identity-nobg": dict(
        lead=(3, 9),
        d=100,
        r=1,
        gate_mode="mean",
        fully_padded=True,
        activation="identity",
        gate_bias=False,
    ),
    "Mnc-r48-token-relu-d600": dict(lead=(33,), d=600, r=48, gate_mode="token", noncontiguous=True),
    "BL-r8-none-gelu-nobias-d300": dict(
        lead=(2, 7), d=300, r=8, activation="gelu", residual=True, bias_down=False, bias_up=False
    ),
    "ABL-r8-token-silu": dict(lead=(2, 3, 5), d=33, r=8, gate_mode="token", activation="silu"),
    "BL-r200-maskedmean-gelu-d200": dict(
        lead=(2, 9), d=200, r=200, gate_mode="mean", masked=True, activation="gelu"
    ),
    "BLnc-r8-token-tanh-nobu-nobg": dict(
        lead=(4, 17),
        d=48,
        r=8,
        gate_mode="token",
        activation="tanh",
        scaling=2.0,
        gate_bias=False,
        bias_up=False,
        residual=True,
        noncontiguous=True,
    ),
    "BLnc-r8-mean-relu-nobias": dict(
        lead=(2, 7), d=33, r=8, gate_mode="mean", bias_down=False, bias_up=False, noncontiguous=True
    ),
    "BL-r48-padded-gelutanh-res-d100": dict(
        lead=(3, 20),
        d=100,
        r=48,
        gate_mode="mean",
        fully_padded=True,
        activation="gelu_tanh",
        residual=True,
        scaling=1.5,
    ),
    "BL-r1-none-silu-scale": dict(lead=(5, 3), d=100, r=1, activation="silu", scaling=-0.75),
}
DTYPES = [torch.float32, torch.float16]


def _case(name, device="cpu", noncontig_residual=False):
    case = gated_adapter_case(**CASES[name], device=device)
    if noncontig_residual and "residual" in case.kwargs:
        case.kwargs["residual"] = noncontig(case.kwargs["residual"])
    return case


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


# The two largest cases cost ~10 CPU-s per dtype under the interpreter, where fp32 and fp16
# run the same kernel code (only the loads' and stores' dtype differs): there each runs in
# one dtype, one fp16 and one fp32; the torch backend and the GPU test run both.
INTERPRETER_ONE_DTYPE = {
    "Mnc-r48-token-relu-d600": torch.float16,
    "BL-r200-maskedmean-gelu-d200": torch.float32,
    "maskedmean-silu-nobd": torch.float32,  # MIXED_CASES' largest (~6 CPU-s a dtype)
}


def _parity_params(cases) -> list:
    return [
        pytest.param(name, dtype, backend, id=f"{name}-{dtype}-{backend}", marks=marks)
        for name in cases
        for dtype in DTYPES
        for backend, marks in (("torch", ()), ("triton", pytest.mark.interpreter))
        if backend != "triton" or INTERPRETER_ONE_DTYPE.get(name, dtype) == dtype
    ]


@pytest.mark.parametrize(("name", "dtype", "backend"), _parity_params(CASES))
def test_parity(name, dtype, backend):
    check_parity(uf.gated_adapter, _case(name), dtype, backend)


@pytest.mark.interpreter
def test_noncontiguous_residual_interpreter():
    case = _case("BL-r8-token-gelu-res", noncontig_residual=True)
    assert not case.kwargs["residual"].is_contiguous()
    check_parity(uf.gated_adapter, case, torch.float32, "triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("gate_mode", [None, "token", "mean"])
def test_saved_state_matches_convention(gate_mode):
    """The kernel's z and s are the pre-activation bottleneck and the gate logits."""
    from unipelt_fast.kernels import gated_adapter as k

    case = gated_adapter_case(
        lead=(3, 11), d=100, r=8, gate_mode=gate_mode, noncontiguous=True
    ).cast(torch.float32)
    a, kw = case.args, case.kwargs
    x = a["x"].detach()
    wg, bg = kw.get("w_gate"), kw.get("b_gate")
    out, z, s = k.forward(
        GatedAdapterArgs(
            x, a["w_down"], a["b_down"], a["w_up"], a["b_up"], w_gate=wg, b_gate=bg,
            gate_mode=gate_mode or "token", activation="relu", scaling=1.0,
        )
    )  # fmt: skip
    assert out.is_contiguous() and out.shape == x.shape and out.dtype == x.dtype
    assert z.dtype == torch.float32 and z.shape == (33, 8)
    assert_close(z, F.linear(x, a["w_down"], a["b_down"]).reshape(33, 8), torch.float32, "z")
    if gate_mode is None:
        assert s.shape == (0,)
    else:
        assert s.dtype == torch.float32 and s.shape == (33,)
        assert_close(s, F.linear(x, wg, bg).reshape(33), torch.float32, "s")


def _saved_bytes(case):
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = case.call(uf.gated_adapter, backend="triton")
    out.backward(torch.randn_like(out))  # what was saved suffices for backward
    return sum(sizes)


@pytest.mark.interpreter
@pytest.mark.parametrize("gate_mode", [None, "token", "mean"])
def test_saved_bytes(gate_mode):
    """Saved for backward: x, the parameters (alive anyway), the mask and O(M * r)."""
    B, L, d, r = 2, 33, 100, 8
    M = B * L
    got = {}
    for residual in (False, True):
        case = gated_adapter_case(
            lead=(B, L), d=d, r=r, gate_mode=gate_mode, masked=gate_mode == "mean",
            residual=residual,
        ).cast(torch.float32)  # fmt: skip
        got[residual] = saved = _saved_bytes(case)
        params = sum(
            t.numel() * t.element_size()
            for n, t in {**case.args, **case.kwargs}.items()
            if isinstance(t, torch.Tensor) and n not in ("x", "residual")
        )  # weights, biases, gate and the (B, L) mask
        x = case.args["x"]
        assert saved <= x.nbytes + params + (M * r + M) * 4, (saved, x.nbytes, params)
        assert saved < 2 * x.nbytes  # not a single full-size intermediate
    assert got[True] == got[False]  # a separate residual is never saved


@pytest.mark.interpreter
def test_backward_deterministic():
    case = _case("BL-r48-padded-gelutanh-res-d100").cast(torch.float32)
    ins = case.tensors(case.diff)
    out = case.call(uf.gated_adapter, backend="triton")
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, ins, g, retain_graph=True)
    second = torch.autograd.grad(out, ins, g)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.interpreter
@pytest.mark.parametrize("mixed", [False, True], ids=["single", "mixed"])
@pytest.mark.parametrize("gate_mode", [None, "token", "mean", "masked_mean"])
def test_launches_per_call(monkeypatch, gate_mode, mixed):
    """Forward: one launch (two for the "mean" gate, whose second takes each example's mean
    in-kernel); backward: rows, columns and one finishing kernel. No torch op runs beside
    them (allocations and NaN fills only), launcher or custom op."""
    from unipelt_fast.kernels import gated_adapter as kernel

    kw = dict(lead=(3, 6), d=24, r=8, residual=not mixed)  # launches do not depend on size
    if gate_mode is not None:
        kw.update(gate_mode="mean" if gate_mode == "masked_mean" else gate_mode)
        kw["masked"] = gate_mode == "masked_mean"
    if mixed:
        kw.update(adapter_index=[1, 0, 1])
    case = gated_adapter_case(**kw).cast(torch.float32)
    out = case.call(uf.gated_adapter, backend="triton")
    g = torch.randn_like(out)
    mean = gate_mode in ("mean", "masked_mean")
    fwd = ["_ga_fwd_kernel"] * (2 if mean else 1)
    bwd = ["_ga_bwd_rows_kernel", "_ga_bwd_cols_kernel", "_ga_finish_kernel"]
    count = Counter(monkeypatch, "gated_adapter")
    with count:
        out = case.call(uf.gated_adapter, backend="triton")
    assert count.launches == fwd
    # validation reads adapter_index's range on CPU tensors only (free there; skipped on CUDA)
    cpu_check = {"aten.min", "aten.max", "aten._local_scalar_dense"}
    assert [op for op in count.compute_ops() if op not in cpu_check] == [
        "unipelt_fast.gated_adapter"
    ]
    count.clear()
    with count:
        out.backward(g)
    assert count.launches == bwd
    assert count.compute_ops() == ["unipelt_fast.gated_adapter_backward"]
    # the launchers themselves: nothing but the kernels
    a, k = case.args, case.kwargs
    x = a["x"].detach()
    det = lambda t: None if t is None else t.detach()  # noqa: E731
    wd, bd, wu, bu = (det(a[n]) for n in ("w_down", "b_down", "w_up", "b_up"))
    wg, bg, gm = det(k.get("w_gate")), det(k.get("b_gate")), k.get("gate_mask")
    idx, res = k.get("adapter_index"), det(k.get("residual"))
    mode = "mean" if mean else "token"
    count.clear()
    with count:
        args = GatedAdapterArgs(x, wd, bd, wu, bu, res, wg, bg, mode, gm, "relu", 1.0, idx)
        o, z, s = kernel.forward(args)
        kernel.backward(args, g, z, s)
    assert count.launches == fwd + bwd
    assert count.compute_ops() == []


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "name",
    ["BL-r48-padded-gelutanh-res-d100", "BL-r8-none-gelu-nobias-d300"],
)
def test_parity_many_ragged_splits(monkeypatch, name):
    """The column kernel's grid follows the SM count: with more SMs, more row splits (the
    last one ragged), all summed by the finishing kernel."""
    from unipelt_fast.kernels import gated_adapter as kernel

    monkeypatch.setattr(kernel, "_num_sms", lambda device: 9)
    check_parity(uf.gated_adapter, _case(name), torch.float16, "triton")


GPU_BLOCK_CASES = {  # several 64-row blocks and 128-wide chunks, ragged
    "token-gelu-nc": dict(
        lead=(2, 90), d=300, r=20, gate_mode="token", activation="gelu", noncontiguous=True
    ),
    "maskedmean-silu-res": dict(
        lead=(3, 70), d=130, r=8, gate_mode="mean", masked=True, fully_padded=True,
        activation="silu", residual=True,
    ),
    "mixed-mean-r100": dict(
        lead=(3, 65), d=70, r=100, adapter_index=[1, 0, 1], gate_mode="mean", masked=True
    ),
}  # fmt: skip


@pytest.mark.interpreter
@pytest.mark.parametrize("name", list(GPU_BLOCK_CASES))
def test_parity_gpu_block_sizes_interpreter(monkeypatch, name):
    """The GPU's block sizes (UNIPELT_GPU_CONFIGS=1) under the interpreter."""
    monkeypatch.setenv("UNIPELT_GPU_CONFIGS", "1")
    check_parity(
        uf.gated_adapter, gated_adapter_case(**GPU_BLOCK_CASES[name]), torch.float16, "triton"
    )


@pytest.mark.interpreter
@pytest.mark.parametrize("mixed", [False, True], ids=["single", "mixed"])
@pytest.mark.parametrize("gate_mode", [None, "token", "mean"])
def test_no_rows(gate_mode, mixed):
    """B * L = 0: an empty output, and every weight gradient exactly zero (not NaN-filled)."""
    lead = (2,) if mixed else ()
    p = lambda *s: torch.randn(*lead, *s, requires_grad=True)  # noqa: E731
    x = torch.randn(2, 0, 8, requires_grad=True)
    wd, bd, wu, bu = p(4, 8), p(4), p(8, 4), p(8)
    kw = dict(adapter_index=torch.tensor([1, 0])) if mixed else {}
    if gate_mode is not None:
        kw.update(w_gate=p(1, 8), b_gate=p(1), gate_mode=gate_mode)
    out = uf.gated_adapter(x, wd, bd, wu, bu, backend="triton", **kw)
    assert out.shape == (2, 0, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape
    for t in (wd, bd, wu, bu, kw.get("w_gate"), kw.get("b_gate")):
        if t is not None:
            assert torch.equal(t.grad, torch.zeros_like(t))


def test_forward_candidates():
    """Autotuning candidates: at most 6, the default first, row blocks of 64-128, every
    tl.dot dim >= 16; the backward's configs likewise valid."""
    from unipelt_fast.kernels import gated_adapter as kernel

    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for rp in (16, 64, 128, 256):
            cands = kernel.fwd_configs(dt, rp)
            assert 1 <= len(cands) <= 6 and len(set(cands)) == len(cands)
            for bm, bd, warps, stages in cands:
                assert 64 <= bm <= 128 and bd >= 16 and warps in (4, 8) and stages >= 1
            bm, bd, warps = kernel.rows_config(dt, rp)
            assert bm >= 16 and bd >= 16
            bm, bd, warps, stages, ctas = kernel.cols_config(dt, rp)
            assert bm >= 16 and bd >= 16 and ctas >= 1


def _module_check(gate_mode, activation, device, dtype=torch.float32):
    d, r = 40, 8
    m = uf.GatedAdapter(
        d, r, activation=activation, gate=gate_mode is not None,
        gate_mode=gate_mode or "token", scaling=0.7, backend="triton",
    ).to(device)  # fmt: skip
    with torch.no_grad():  # up starts at zero (identity adapter): make it non-trivial
        m.up.weight.normal_(0, r**-0.5)
        m.up.bias.normal_()
    eager = copy.deepcopy(m)
    eager.backend = "eager"
    x = torch.randn(3, 9, d, device=device)
    mask = torch.rand(3, 9, device=device) > 0.3
    mask[:, 0] = True
    mask[-1] = False
    outs, grads = [], []
    for mod in (m, eager):
        xi = x.clone().requires_grad_(True)
        out = mod(xi, mask=mask)
        out.backward(torch.ones_like(out) + torch.arange(d, device=device) / d)
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in mod.parameters()])
    assert_close(outs[0], outs[1], dtype, "out")
    for i, (a, e) in enumerate(zip(*grads, strict=True)):
        assert_close(a, e, dtype, f"grad {i}")


@pytest.mark.interpreter
@pytest.mark.parametrize("gate_mode", [None, "token", "mean", "masked_mean"])
def test_module_triton_matches_eager(gate_mode):
    _module_check(gate_mode, "gelu", "cpu")


# ---- GPU -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_parity_gpu(name, dtype):
    check_parity(uf.gated_adapter, _case(name, "cuda"), dtype, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(gate_mode="token", activation="gelu"),
        dict(gate_mode="mean", masked=True, fully_padded=True, activation="silu", residual=True),
    ],
    ids=["none", "token", "masked-mean"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_parity_gpu_realistic(kw, dtype):
    # M = 16384 rows (B=8, L=2048), d = 4096, r = 64.
    case = gated_adapter_case(lead=(8, 2048), d=4096, r=64, device="cuda", **kw)
    check_parity(uf.gated_adapter, case, dtype, "triton")
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("r", [1, 64, 256])
def test_odd_sizes_gpu(r):
    case = gated_adapter_case(
        lead=(3, 517), d=16411, r=r, gate_mode="mean", masked=True, noncontiguous=True,
        residual=True, device="cuda",
    )  # fmt: skip
    check_parity(uf.gated_adapter, case, torch.bfloat16, "triton")


@pytest.mark.gpu
def test_backward_deterministic_gpu():
    case = gated_adapter_case(
        lead=(8, 512), d=1024, r=64, gate_mode="mean", masked=True, device="cuda"
    ).cast(torch.bfloat16)
    ins = case.tensors(case.diff)
    out = case.call(uf.gated_adapter, backend="triton")
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, ins, g, retain_graph=True)
    second = torch.autograd.grad(out, ins, g)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("gate_mode", [None, "token", "masked_mean"])
def test_module_triton_matches_eager_gpu(gate_mode):
    _module_check(gate_mode, "gelu", "cuda")


# ---- mixed-task batches (adapter_index): one launch, per-example weights ---------------------
# L = 33 > the row block, so an example spans several row blocks with a ragged tail (a block
# never straddles two examples); task 3 is used by one example only; T > B leaves tasks
# unused (their gradients must be exactly zero).
MIXED_CASES = {
    "token-gelu-res-T5": dict(
        lead=(3, 33), d=33, r=8, adapter_index=[3, 0, 0], tasks=5, gate_mode="token",
        activation="gelu", residual=True,
    ),
    "maskedmean-silu-nobd": dict(
        lead=(4, 9), d=100, r=48, adapter_index=[1, 0, 1, 2], gate_mode="mean", masked=True,
        activation="silu", bias_down=False, noncontiguous=True,
    ),
    "none-identity-L1": dict(
        lead=(3, 1), d=48, r=8, adapter_index=[2, 2, 0], tasks=6, activation="identity",
        scaling=0.5,
    ),
    # LoRA's shapes: identity activation, no biases, an output width != d (GQA v_proj).
    "lora-narrow-out": dict(
        lead=(3, 17), d=48, r=8, d_out=20, adapter_index=[1, 0, 1], gate_mode="token",
        activation="identity", bias_down=False, bias_up=False,
    ),
    "lora-wide-out-unmixed": dict(
        lead=(2, 5), d=20, r=4, d_out=70, gate_mode="mean", activation="identity",
        bias_down=False,
    ),
}  # fmt: skip


@pytest.mark.parametrize(("name", "dtype", "backend"), _parity_params(MIXED_CASES))
def test_mixed_parity(name, dtype, backend):
    check_parity(uf.gated_adapter, gated_adapter_case(**MIXED_CASES[name]), dtype, backend)


@pytest.mark.interpreter
def test_mixed_unused_tasks_zero_and_deterministic():
    case = gated_adapter_case(**MIXED_CASES["token-gelu-res-T5"]).cast(torch.float32)
    grads = []
    for _ in range(2):
        out = case.call(uf.gated_adapter, backend="triton")
        g = torch.autograd.grad(out, case.tensors(case.diff), torch.ones_like(out))
        grads.append(dict(zip(case.diff, g, strict=True)))
    for n in ("w_down", "b_down", "w_up", "b_up", "w_gate", "b_gate"):
        assert torch.equal(grads[0][n], grads[1][n]), f"d{n} not bit-reproducible"
        unused = grads[0][n][[1, 2, 4]]
        assert torch.equal(unused, torch.zeros_like(unused)), f"d{n} of an unused task"


@pytest.mark.interpreter
def test_mixed_out_of_range_index_is_clamped_not_read_out_of_bounds():
    """Validation is skipped under torch.compile; the kernel clamps the task instead."""
    case = gated_adapter_case(lead=(2, 3), d=16, r=4, adapter_index=[0, 1]).cast(torch.float32)
    x, wd, bd, wu, bu = case.args.values()
    impl = importlib.import_module("unipelt_fast.kernels.gated_adapter")
    bad = torch.tensor([-5, 7])
    out, _, _ = impl.forward(GatedAdapterArgs(x, wd, bd, wu, bu, adapter_index=bad))
    want = uf.gated_adapter(x, wd, bd, wu, bu, adapter_index=torch.tensor([0, 1]), backend="eager")
    assert_close(out, want, torch.float32, "out")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(MIXED_CASES))
def test_mixed_parity_gpu(name, dtype):
    case = gated_adapter_case(**MIXED_CASES[name], device="cuda")
    check_parity(uf.gated_adapter, case, dtype, "triton")


# ---- the torch backend -------------------------------------------------------------------


def test_torch_backend_runs_the_eager_reference():
    case = gated_adapter_case((2, 5), 8, 4, gate_mode="mean", masked=True)
    a = case.cast(torch.float32)
    torch.testing.assert_close(
        a.call(uf.gated_adapter, backend="torch"),
        a.call(uf.gated_adapter, backend="eager"),
        rtol=0,
        atol=0,
    )
    y = case.call(uf.gated_adapter, backend="torch")  # float64 is fine here too
    assert y.dtype == torch.float64


# ---- the eager reference (the spec) against an independent formulation -----------------


ACT = {
    "relu": lambda t: t.clamp_min(0),
    "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / 2**0.5)),
    "gelu_tanh": lambda t: (
        0.5 * t * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (t + 0.044715 * t**3)))
    ),
    "silu": lambda t: t / (1 + torch.exp(-t)),
    "tanh": torch.tanh,
    "identity": lambda t: t,
}


def by_hand(
    x,
    w_down,
    b_down,
    w_up,
    b_up,
    *,
    residual=None,
    w_gate=None,
    b_gate=None,
    gate_mode="token",
    gate_mask=None,
    activation="relu",
    scaling=1.0,
):
    """Row by row, example by example: the formula written out."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    res = (x if residual is None else residual).reshape(-1, d)
    h = ACT[activation](rows @ w_down.T + (0 if b_down is None else b_down))
    u = h @ w_up.T + (0 if b_up is None else b_up)
    if w_gate is None:
        g = torch.ones(rows.shape[0], 1, dtype=x.dtype)
    else:
        g = 1 / (1 + torch.exp(-(rows @ w_gate.T + (0 if b_gate is None else b_gate))))
        if gate_mode == "mean":
            B, L = x.shape[:2]
            g = g.view(B, L)
            means = []
            for b in range(B):
                keep = torch.ones(L, dtype=torch.bool) if gate_mask is None else gate_mask[b]
                means.append(g[b][keep].mean() if keep.any() else torch.zeros((), dtype=x.dtype))
            g = torch.stack(means)[:, None].expand(B, L).reshape(-1, 1)
    return (res + g * scaling * u).view(x.shape)


SPEC_GRID = [
    dict(),
    dict(lead=(5,), r=1, gate_mode="token"),
    dict(lead=(2, 3, 5), gate_mode="token", residual=True, activation="gelu"),
    dict(gate_mode="mean", activation="silu", scaling=0.5),
    dict(gate_mode="mean", masked=True, activation="gelu_tanh"),
    dict(gate_mode="mean", fully_padded=True, activation="tanh", bias_up=False),
    dict(gate_mode="token", bias_down=False, gate_bias=False, activation="identity"),
    dict(noncontiguous=True, gate_mode="mean", masked=True, residual=True),
]


@pytest.mark.parametrize("cfg", SPEC_GRID, ids=[str(i) for i in range(len(SPEC_GRID))])
def test_matches_by_hand(cfg):
    case = gated_adapter_case(**cfg)
    got = case.call(uf.gated_adapter, backend="eager")
    want = case.call(by_hand)
    assert_close(got, want, torch.float64, "out")


def _gradcheck_eager(case) -> bool:
    """float64 gradcheck of the eager gated_adapter in every input of ``case.diff``."""
    names = list(case.diff)

    def fn(*ts):
        sub = dict(zip(names, ts, strict=True))
        args = {n: sub.get(n, t) for n, t in case.args.items()}
        kw = {n: sub.get(n, t) for n, t in case.kwargs.items()}
        return uf.gated_adapter(*args.values(), **kw, backend="eager")

    inputs = [t.detach().requires_grad_(True) for t in case.tensors(names)]
    return torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("cfg", SPEC_GRID[1:6], ids=[str(i) for i in range(5)])
def test_gradcheck_float64(cfg):
    case = gated_adapter_case(**{**cfg, "d": 6, "r": min(cfg.get("r", 3), 3)})
    assert _gradcheck_eager(case)


def test_fully_padded_example_gets_zero_gate():
    case = gated_adapter_case(gate_mode="mean", fully_padded=True, residual=True)
    out = case.call(uf.gated_adapter, backend="eager")
    assert torch.equal(out[-1], case.kwargs["residual"][-1])


def test_no_gate_is_gate_one():
    case = gated_adapter_case()
    a = case.call(uf.gated_adapter, backend="eager")
    x, wd, bd, wu, bu = case.args.values()
    manual = x + torch.relu(x @ wd.T + bd) @ wu.T + bu
    assert_close(a, manual, torch.float64, "out")


# ---- mixed-task batches: adapter_index with per-task stacked weights ------------------------

SPEC_MIXED = [
    dict(lead=(3, 5), adapter_index=[2, 0, 2], tasks=4, gate_mode="token"),
    dict(lead=(3, 5), adapter_index=[1, 1, 0], gate_mode="mean", masked=True, residual=True),
    dict(lead=(2, 4), adapter_index=[0, 3], tasks=5, activation="gelu", bias_up=False),
]


def _alone(case, b):
    """Example b run alone with its task's unstacked weights."""
    t = int(case.kwargs["adapter_index"][b])
    pick = lambda v: v[t] if isinstance(v, torch.Tensor) and v.dim() >= 1 else v
    args = [None if v is None else pick(v) for v in list(case.args.values())[1:]]
    kw = {n: v for n, v in case.kwargs.items() if n != "adapter_index"}
    for n in ("w_gate", "b_gate"):
        if n in kw:
            kw[n] = kw[n][t]
    for n in ("residual", "gate_mask"):
        if n in kw:
            kw[n] = kw[n][b : b + 1]
    return uf.gated_adapter(case.args["x"][b : b + 1], *args, **kw, backend="eager")


@pytest.mark.parametrize("cfg", SPEC_MIXED, ids=[str(i) for i in range(len(SPEC_MIXED))])
def test_mixed_equals_each_example_alone(cfg):
    case = gated_adapter_case(**cfg)
    got = case.call(uf.gated_adapter, backend="eager")
    for b in range(got.shape[0]):
        assert_close(got[b : b + 1], _alone(case, b), torch.float64, f"example {b}")


@pytest.mark.parametrize("cfg", SPEC_MIXED[:2], ids=["token", "mean"])
def test_mixed_gradcheck_float64(cfg):
    case = gated_adapter_case(**{**cfg, "d": 5, "r": 2})
    assert _gradcheck_eager(case)


def test_mixed_unused_task_gets_zero_grad():
    case = gated_adapter_case(lead=(2, 3), adapter_index=[0, 2], tasks=3, gate_mode="token")
    case = case.cast(torch.float64)
    case.call(uf.gated_adapter, backend="eager").sum().backward()
    for n in ("w_down", "w_up", "b_down", "b_up"):
        g = case.tensors([n])[0].grad
        assert torch.equal(g[1], torch.zeros_like(g[1])), n
        assert g[0].abs().sum() > 0 and g[2].abs().sum() > 0, n


def _bad_call(**over):
    case = gated_adapter_case(lead=(2, 3), adapter_index=[0, 1], gate_mode="token")
    kw = {**case.kwargs, **over.pop("kw", {})}
    args = {**case.args, **over}
    return lambda: uf.gated_adapter(*args.values(), **kw, backend="eager")


@pytest.mark.parametrize(
    "over, err, match",
    [
        (dict(kw=dict(adapter_index=torch.tensor([0.0, 1.0]))), TypeError, "adapter_index"),
        (dict(kw=dict(adapter_index=torch.tensor([0, 1, 1]))), ValueError, "adapter_index"),
        (dict(kw=dict(adapter_index=torch.tensor([[0, 1]]))), ValueError, "adapter_index"),
        (dict(kw=dict(adapter_index=torch.tensor([0, 2]))), ValueError, r"\[0, 2\)"),
        (dict(kw=dict(adapter_index=torch.tensor([-1, 0]))), ValueError, "adapter_index"),
        (dict(w_up=torch.randn(3, 24, 8, dtype=torch.float64)), ValueError, "w_up"),
        (dict(b_down=torch.randn(8, dtype=torch.float64)), ValueError, "b_down"),
        (dict(w_down=torch.randn(8, 24, dtype=torch.float64)), ValueError, "w_down"),
        (dict(kw=dict(w_gate=torch.randn(1, 24, dtype=torch.float64))), ValueError, "w_gate"),
        (dict(x=torch.randn(6, 24, dtype=torch.float64)), ValueError, "adapter_index"),
    ],
    ids=[
        "float-index",
        "index-length",
        "index-2d",
        "index-high",
        "index-negative",
        "w_up-T",
        "b_down-unstacked",
        "w_down-unstacked",
        "w_gate-unstacked",
        "x-2d",
    ],
)
def test_mixed_bad_inputs_raise(over, err, match):
    with pytest.raises(err, match=match):
        _bad_call(**over)()


def test_cuda_backend_rejects_adapter_index_before_launch():
    from unipelt_fast import _cuda

    case = gated_adapter_case(lead=(2, 3), adapter_index=[0, 1])
    x, wd, bd, wu, bu = case.args.values()
    with pytest.raises(NotImplementedError, match="adapter_index"):
        _cuda.op_module("gated_adapter").forward(
            GatedAdapterArgs(x, wd, bd, wu, bu, adapter_index=case.kwargs["adapter_index"])
        )


def test_other_output_width_needs_residual_and_matches_by_hand():
    case = gated_adapter_case(lead=(2, 3), d=6, r=2, d_out=4, activation="identity")
    x, wd, bd, wu, bu = case.args.values()
    res = case.kwargs["residual"]
    got = case.call(uf.gated_adapter, backend="eager")
    assert_close(got, res + (x @ wd.T + bd) @ wu.T + bu, torch.float64, "out")
    with pytest.raises(ValueError, match="d_out"):
        uf.gated_adapter(x, wd, bd, wu, bu, backend="eager")
    with pytest.raises(ValueError, match="w_up must have shape"):  # a width-d residual
        uf.gated_adapter(x, wd, bd, wu, bu, residual=x, backend="eager")
