"""Launch safety of the Triton kernels: out-of-range task indices, grid limits, the device
guard, recompiles, and the GPU's block sizes under the interpreter."""

from __future__ import annotations

import pytest
import torch

import unipelt_fast as uf
from tests.parity import check_parity, gated_adapter_case, prefix_attention_case
from unipelt_fast import _alloc, _backend, _validation
from unipelt_fast._args import PrefixAttentionArgs

KERNEL_MODULES = ("prefix_attention", "gated_adapter", "bias_only_linear", "bias_only_layer_norm")


def _kmod(name: str):
    return _backend.kernel_impl(name, "triton")


# ---- out-of-range prefix_index ----------------------------------------------------------------


@pytest.mark.interpreter
def test_out_of_range_index_is_clamped_in_every_kernel(monkeypatch):
    """Where validation does not read the range (CUDA tensors, torch.compile), an index
    below 0 acts as task 0 and one >= T as task T - 1: forward, backward and the per-task
    gradient sums, never an out-of-bounds read. NaN-filled outputs catch unwritten rows."""
    monkeypatch.setattr(_validation, "_range_readable", lambda t: False)
    case = prefix_attention_case(B=3, Lq=7, Lk=9, P=16, layout="indexed", T=3, gate="b2")
    results = []
    for idx in ([-4, 7, 1], [0, 2, 1]):
        c = case.cast(torch.float32)
        c.kwargs["prefix_index"] = torch.tensor(idx)
        out = c.call(uf.prefix_attention, backend="triton")
        out.backward(torch.ones_like(out))
        results.append([out.detach(), *(t.grad for t in c.tensors(c.diff))])
    for bad, good in zip(*results, strict=True):
        assert torch.equal(bad, good)
    # and the in-range case is right (the reference with valid indices)
    case.kwargs["prefix_index"] = torch.tensor([0, 2, 1])
    check_parity(uf.prefix_attention, case, torch.float32, "triton")


# ---- grid limits ------------------------------------------------------------------------------


class _Recorder:
    """Stands in for a @triton.jit kernel: records the grid of each launch, runs nothing."""

    def __init__(self, name, grids):
        self.name, self.grids = name, grids

    def __getitem__(self, grid):
        return lambda *a, **k: self.grids.append((self.name, tuple(grid)))


def test_grids_keep_batch_times_heads_off_one_axis(monkeypatch):
    """B * H = 90000 > 65535 (the limit of grid axes 1 and 2): every launch fits."""
    kpa = _kmod("prefix_attention")
    grids: list = []
    for name in dir(kpa):
        if name.startswith("_") and name.endswith(("_kernel", "_preprocess")):
            monkeypatch.setattr(kpa, name, _Recorder(name, grids))
    monkeypatch.setattr(kpa, "_interpreting", lambda t: False)  # the GPU's configs
    B, H, L, D, T, P = 300, 300, 1, 16, 2, 16
    q = torch.zeros(1, dtype=torch.float16).expand(B, H, L, D)
    pk = torch.zeros(1, dtype=torch.float16).expand(T, H, P, D)
    idx = torch.zeros(B, dtype=torch.long)
    args = PrefixAttentionArgs(q, q, q, pk, pk, idx, None, None, True, 0.25)
    out, lse = kpa.forward(args)
    kpa.backward(args, q, out, lse)
    names = {n for n, _ in grids}
    assert names >= {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_prefix_sum_kernel"}
    for name, g in grids:
        assert g[0] < 2**31 and all(x <= 65535 for x in g[1:]), (name, g)


# ---- device guard -----------------------------------------------------------------------------


def test_launchers_enter_the_inputs_device(monkeypatch):
    """Every launcher runs inside the device context of its inputs (mocked on CPU; on CUDA it
    is torch.cuda.device(x.device), so a model split over GPUs launches on each layer's)."""
    entered: list = []

    class Ctx:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(_alloc, "device_context", Ctx)
    for mod in KERNEL_MODULES:
        assert getattr(_kmod(mod).forward, "__wrapped__", None) is not None, mod
        assert getattr(_kmod(mod).backward, "__wrapped__", None) is not None, mod
    x = torch.randn(2, 3, 16, requires_grad=True)
    w = torch.randn(16, 16)
    b = torch.randn(16, requires_grad=True)
    ga = gated_adapter_case(lead=(2, 3), d=16, r=16, gate_mode="token").cast(torch.float32)
    pa = prefix_attention_case(B=2, Lq=3, Lk=3, P=2).cast(torch.float32)
    for call in (
        lambda: uf.bias_only_linear(x, w, b, backend="triton"),
        lambda: uf.bias_only_layer_norm(x, torch.ones(16), b, backend="triton"),
        lambda: ga.call(uf.gated_adapter, backend="triton"),
        lambda: pa.call(uf.prefix_attention, backend="triton"),
    ):
        n = len(entered)
        call().sum().backward()
        assert len(entered) == n + 2  # forward and backward
    assert all(d == torch.device("cpu") for d in entered)


def test_device_context_is_the_cuda_guard():
    assert isinstance(_alloc.device_context(torch.device("cpu")), type(_nullcontext()))
    if torch.cuda.is_available():
        assert isinstance(_alloc.device_context(torch.device("cuda", 0)), torch.cuda.device)


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs"
)
def test_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    case = prefix_attention_case(B=2, Lq=70, Lk=70, P=16, D=64, mask=True, causal=True,
                                 device="cuda:1", layout="indexed", gate="b2")  # fmt: skip
    check_parity(uf.prefix_attention, case, torch.float16, "triton")
    ga = gated_adapter_case(lead=(2, 33), d=64, r=16, gate_mode="mean", device="cuda:1")
    check_parity(uf.gated_adapter, ga, torch.float16, "triton")


# ---- recompiles -------------------------------------------------------------------------------

# Sequence lengths / row counts that change from batch to batch: never specialised.
NOT_SPECIALISED = {
    "prefix_attention": {
        "_fwd_kernel": {"LQ", "LK", "P"},
        "_bwd_dkdv_kernel": {"LQ", "LK"},
        "_bwd_dq_kernel": {"LQ", "LK", "P"},
        "_bwd_prefix_sum_kernel": {"B", "N", "NPART", "NG"},
        "_task_sum_kernel": {"N"},
    },
    "gated_adapter": {
        "_ga_fwd_kernel": {"M", "L"},
        "_ga_bwd_rows_kernel": {"M"},
        "_ga_bwd_cols_kernel": {"M", "L", "blocks_per_split"},
    },
    "bias_only_linear": {"_act_fwd_kernel": {"numel"}, "_act_bias_bwd_kernel": {"M"}},
    "bias_only_layer_norm": {"_ln_bwd_kernel": {"M"}},
}


def _not_specialised(fn) -> set[str]:
    if hasattr(fn, "kwargs"):  # the interpreter's InterpretedFunction
        return set(fn.kwargs.get("do_not_specialize") or ())
    return {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}


@pytest.mark.parametrize("mod", list(NOT_SPECIALISED))
def test_sequence_lengths_do_not_recompile(mod):
    for name, args in NOT_SPECIALISED[mod].items():
        assert args <= _not_specialised(getattr(_kmod(mod), name)), name


# ---- the GPU's block sizes under the interpreter ----------------------------------------------

# UNIPELT_GPU_CONFIGS=1 makes the prefix_attention launcher pick its GPU configs under the
# interpreter (the other launchers always do): 128x64 forward, 32x32/32x64 dK/dV and
# 64x16 dQ (fp16, D <= 64/128), 64x32 / 32x32 for D > 128, 32x32 for fp32. Lengths
# straddle those tiles.
GPU_GRID = [
    (
        torch.float16,
        dict(
            B=2,
            H=2,
            Hkv=1,
            Lq=130,
            Lk=70,
            P=20,
            D=64,
            causal=True,
            mask=True,
            layout="indexed",
            T=2,
            gate="b2",
        ),
    ),  # fmt: skip
    (torch.float16, dict(B=1, H=2, Hkv=2, Lq=33, Lk=129, P=3, D=80, causal=True)),
    (torch.float16, dict(B=1, H=1, Hkv=1, Lq=40, Lk=70, P=16, D=160, mask=True, gate="b")),
    (torch.float32, dict(B=1, H=2, Hkv=1, Lq=45, Lk=33, P=5, D=64, causal=True)),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,cfg", GPU_GRID, ids=lambda x: getattr(x, "__name__", None))
def test_parity_at_gpu_block_sizes(dtype, cfg, monkeypatch):
    monkeypatch.setenv("UNIPELT_GPU_CONFIGS", "1")
    kpa = _kmod("prefix_attention")
    seen = []
    orig = kpa._configs
    monkeypatch.setattr(kpa, "_configs", lambda q, D: seen.append(orig(q, D)) or seen[-1])
    check_parity(uf.prefix_attention, prefix_attention_case(**cfg), dtype, "triton")
    assert seen and seen[0] == kpa.gpu_configs(dtype, cfg["D"])
