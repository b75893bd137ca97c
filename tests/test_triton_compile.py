"""Compile the Triton kernels for real GPUs (sm_80, sm_90) without a GPU.

The interpreter runs the kernels' math but not the GPU compiler, which rejects things the
interpreter accepts (tl.dot dims < 16, non-constexpr globals, shared memory over budget).
Triton's ahead-of-time compiler needs no device, so CI compiles the launch configurations
the launchers pick on a GPU (their block sizes, warps, stages) for representative variants.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
try:  # the AOT entry points (triton >= 3.0)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:  # pragma: no cover - depends on the triton build
    pytest.skip(f"this triton has no AOT compiler API: {e}", allow_module_level=True)

# Under TRITON_INTERPRET=1 (the test command) @triton.jit yields interpreter objects, which
# the compiler cannot take: the compile tests then run in a child pytest without it.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not INTERPRETING, reason="the compile tests run directly in this process")
def test_compile_in_a_process_without_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " passed" in res.stdout, res.stdout


needs_jit = pytest.mark.skipif(INTERPRETING, reason="run by the child process (see above)")

TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Pointer arguments that are not in the op's dtype.
FP32_PTRS = {
    "LSE", "DELTA", "GATE", "DPK", "DPV", "DG", "PART",  # prefix_attention
    "z_ptr", "dz_ptr", "gv_ptr", "ds_ptr", "s_ptr", "dg_ptr",  # gated_adapter
    "pwu_ptr", "pbu_ptr", "pwd_ptr", "pwg_ptr",
    "part_ptr", "mean_ptr", "rstd_ptr",  # bias-only
}  # fmt: skip
OTHER_PTRS = {"IDX": "*i64", "KPM": "*u8", "idx_ptr": "*i64"}
FLOATS = {"qk_scale", "sm_scale", "scaling", "eps"}
SIZES = {"H", "HKV", "GROUP", "LQ", "LK", "P", "B", "N", "M", "L", "D", "R", "T"}


def _kernel(mod: str, name: str):
    return getattr(importlib.import_module(f"unipelt_fast.kernels.{mod}"), name)


def _signature(fn, dtype: torch.dtype, consts: dict) -> dict[str, str]:
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a in OTHER_PTRS:
            sig[a] = OTHER_PTRS[a]
        elif a in FP32_PTRS:
            sig[a] = "*fp32"
        elif a.endswith("_ptr") or (a.isupper() and a.isalpha() and len(a) <= 5 and a not in SIZES):
            sig[a] = "*" + TY[dtype]
        elif a in FLOATS:
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
    return sig


def _compile(mod, name, dtype, consts, arch, num_warps=4, num_stages=2):
    fn = _kernel(mod, name)
    src = ASTSource(fn, _signature(fn, dtype, consts), constexprs=consts)
    return triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )


def _gpu_tensor_stub(dtype):
    """A CPU tensor the launchers' config helpers treat as if it were on a GPU."""
    return torch.empty(1, dtype=dtype)


ARCHS = [80, 90]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "dtype,D", [(torch.bfloat16, 128), (torch.float16, 80), (torch.float32, 64)]
)
@needs_jit
def test_prefix_attention_compiles(arch, dtype, D, monkeypatch):
    pa = importlib.import_module("unipelt_fast.kernels.prefix_attention")
    monkeypatch.setattr(pa, "_interpreting", lambda t: False)
    cfg = pa._configs(_gpu_tensor_stub(dtype), D)
    bd = pa._block_d(D)
    prec = "ieee" if dtype == torch.float32 else "tf32"
    even = bd == D
    common = dict(HEAD_DIM=D, BLOCK_D=bd, PRECISION=prec)
    jobs = [
        ("_fwd_kernel", "fwd", dict(HAS_GATE=True, HAS_MASK=True, CAUSAL=True, EVEN_D=even)),
        ("_bwd_dkdv_kernel", "dkdv", dict(HAS_MASK=True, CAUSAL=True)),
        ("_bwd_prefix_dkdv_kernel", "dkdv", dict(HAS_GATE=True)),
        ("_bwd_dq_kernel", "dq", dict(HAS_GATE=True, HAS_MASK=True, CAUSAL=True, EVEN_D=even)),
    ]
    for name, which, extra in jobs:
        bm, bn, warps, stages = cfg[which]
        consts = {**common, "BLOCK_M": bm, "BLOCK_N": bn, **extra}
        k = _compile("prefix_attention", name, dtype, consts, arch, warps, stages)
        assert k.metadata.shared <= (227 if arch == 90 else 163) * 1024, name
    _compile(
        "prefix_attention", "_bwd_preprocess", dtype,
        dict(HEAD_DIM=D, BLOCK_M=cfg["dq"][0], BLOCK_D=bd), arch, 4, 1,
    )  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "dtype,r,act", [(torch.bfloat16, 64, 3), (torch.float16, 1, 2), (torch.float32, 200, 4)]
)
@needs_jit
def test_gated_adapter_compiles(arch, dtype, r, act):
    ga = importlib.import_module("unipelt_fast.kernels.gated_adapter")
    rp = ga._rpad(r)
    M, D = 16384, 4096  # the launchers' GPU configs at a realistic size
    prec = ga._prec(dtype)
    bm, bd, warps = ga._fwd_cfg(M, D, rp)
    # The mixed-task (HAS_IDX) variants for bf16 only: they differ in indexing, not dtype,
    # and each compile costs CI seconds.
    with_idx = (False, True) if dtype == torch.bfloat16 else (False,)
    for gate, load_z, store_out, mixed in [
        (1, False, True, False),
        (1, False, False, False),
        (2, True, True, False),
        *([(1, False, True, True), (2, True, True, True)] if True in with_idx else []),
    ]:
        consts = dict(GATE=gate, HAS_BD=True, HAS_BU=True, HAS_BG=True, SEP_RES=gate == 1,
                      LOAD_Z=load_z, STORE_OUT=store_out, HAS_IDX=mixed, ACT=act, BM=bm,
                      BD=bd, RP=rp, PREC=prec)  # fmt: skip
        _compile("gated_adapter", "_ga_fwd_kernel", dtype, consts, arch, warps)
    for mixed in with_idx:
        bm, bd, warps = ga._rows_cfg(M, D, rp)
        _compile("gated_adapter", "_ga_bwd_rows_kernel", dtype,
                 dict(HAS_BU=True, NEED_DG=True, HAS_IDX=mixed, ACT=act, BM=bm, BD=bd, RP=rp,
                      PREC=prec), arch, warps)  # fmt: skip
        bm, bd, warps = ga._cols_cfg(M, D, rp)
        _compile("gated_adapter", "_ga_bwd_cols_kernel", dtype,
                 dict(HAS_GATE=True, HAS_BU=True, RES_IS_X=True, HAS_IDX=mixed, ACT=act, BM=bm,
                      BD=bd, RP=rp, PREC=prec), arch, warps)  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@needs_jit
def test_bias_only_kernels_compile(arch, dtype):
    for act in range(6):
        _compile("bias_only_linear", "_act_fwd_kernel", dtype, dict(ACT=act, BLOCK=4096), arch)
        _compile("bias_only_linear", "_act_bias_bwd_kernel", dtype,
                 dict(ACT=act, WRITE_GP=act != 0, BLOCK_M=32, BLOCK_N=128), arch)  # fmt: skip
    ln = importlib.import_module("unipelt_fast.kernels.bias_only_layer_norm")
    for block, single in [(16384, True), (1024, False)]:
        w = ln._num_warps(block)
        _compile("bias_only_layer_norm", "_ln_fwd_kernel", dtype,
                 dict(BLOCK_N=block, SINGLE=single), arch, w)  # fmt: skip
        _compile("bias_only_layer_norm", "_ln_bwd_kernel", dtype,
                 dict(BLOCK_N=block, SINGLE=single), arch, w)  # fmt: skip
