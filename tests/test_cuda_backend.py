"""backend="cuda": the build logic of unipelt_fast/_cuda.py (CPU, runs everywhere) and GPU
parity of every op against the float64 eager reference (marked gpu)."""

import re
from pathlib import Path

import pytest
import torch

import unipelt_fast as uf
from tests.parity import (
    Case,
    bias_only_linear_case,
    check_parity,
    gated_adapter_case,
    noncontig,
    prefix_attention_case,
)
from unipelt_fast import _cuda, reference
from unipelt_fast._args import PrefixAttentionArgs
from unipelt_fast._backend import kernel_impl
from unipelt_fast._validation import ACTIVATIONS
from unipelt_fast.testing import assert_close

CSRC = Path(__file__).resolve().parent.parent / "csrc"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# ---- build logic (no GPU needed) -----------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("8.0;9.0", "8.0;9.0"),
        (" 9.0 , 8.0 ", "9.0;8.0"),
        ("sm_80 sm_90a", "8.0;9.0a"),
        ("80;8.0;86", "8.0;8.6"),
        ("8.6+PTX", "8.6+PTX"),
        ("sm_100;compute_120", "10.0;12.0"),
        ("Ampere;9.0", "Ampere;9.0"),
    ],
)
def test_parse_arch_list(text, want):
    assert _cuda.parse_arch_list(text) == want


@pytest.mark.parametrize("text", ["eight", "8.0;sm_8x", ";;", "9.0b"])
def test_parse_arch_list_rejects_garbage(text):
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        _cuda.parse_arch_list(text)


def test_arch_list_env_then_devices(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "sm_90;8.0")
    assert _cuda.arch_list() == "9.0;8.0"
    assert _cuda.detect_arch_list([(9, 0), (8, 0), (9, 0)]) == "8.0;9.0"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="set TORCH_CUDA_ARCH_LIST"):
        _cuda.arch_list()


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIPELT_CUDA_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cuda.cache_root() == tmp_path / "c"
    monkeypatch.delenv("UNIPELT_CUDA_CACHE")
    assert _cuda.cache_root() == tmp_path / "xdg" / "unipelt_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _cuda.cache_root() == tmp_path / "home" / ".cache" / "unipelt_fast"


def _fake_csrc(tmp_path, body="__global__ void k() {}\n"):
    d = tmp_path / "src"
    d.mkdir(exist_ok=True)
    (d / "op.cu").write_text(body)
    (d / "bindings.cpp").write_text("// binding\n")
    (d / "common.cuh").write_text("#pragma once\n")
    (d / "notes.txt").write_text("not a source\n")
    return d


def test_build_spec_hash_tracks_sources_headers_and_arch(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIPELT_CUDA_CACHE", str(tmp_path / "cache"))
    d = _fake_csrc(tmp_path)
    a = _cuda.build_spec("8.0", d)
    assert [p.name for p in a.sources] == ["bindings.cpp", "op.cu"]
    assert a.build_dir.parent == tmp_path / "cache"
    assert a.build_dir.name.startswith("cuda-") and a.name.startswith("unipelt_fast_cuda_")
    assert _cuda.build_spec("8.0", d) == a  # stable
    assert _cuda.build_spec("9.0", d).build_dir != a.build_dir
    (d / "common.cuh").write_text("#pragma once\n// changed\n")
    b = _cuda.build_spec("8.0", d)
    assert b.build_dir != a.build_dir and b.name != a.name
    (d / "notes.txt").write_text("changed, but not a source\n")
    assert _cuda.build_spec("8.0", d) == b


def test_build_spec_of_the_package_lists_every_source():
    spec = _cuda.build_spec("8.0")
    names = {p.name for p in spec.sources}
    assert {p.name for p in CSRC.glob("*.cu")} | {"bindings.cpp"} == names
    assert spec.include_dir.resolve() == CSRC.resolve()


def test_failed_build_raises_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIPELT_CUDA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    d = _fake_csrc(tmp_path, "__global__ void k() { oops; }\n")
    spec = _cuda.build_spec("8.0;9.0", d)
    noise = "\n".join(f"[{i}/3] nvcc line {i}" for i in range(100))
    compiler = 'op.cu(1): error: identifier "oops" is undefined'
    seen = {}

    def broken_loader(**kw):
        seen.update(kw, arch=_cuda.os.environ.get("TORCH_CUDA_ARCH_LIST"))
        raise RuntimeError(f"Error building extension '{kw['name']}': {noise}\n{compiler}\n")

    with pytest.raises(RuntimeError) as info:
        _cuda.jit_build(spec, loader=broken_loader)
    msg = str(info.value)
    assert "building the CUDA extension for backend='cuda' failed" in msg
    assert compiler in msg and "nvcc line 10\n" not in msg  # the tail, not everything
    assert f"full log: {spec.log}" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert compiler in spec.log.read_text() and "nvcc line 10\n" in spec.log.read_text()
    assert seen["build_directory"] == str(spec.build_dir) and seen["name"] == spec.name
    assert seen["arch"] == "8.0;9.0"  # the arch list reaches cpp_extension...
    assert "TORCH_CUDA_ARCH_LIST" not in _cuda.os.environ  # ...and is restored afterwards
    assert "--use_fast_math" not in seen["extra_cuda_cflags"]


def test_cached_build_is_reused_and_a_broken_one_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIPELT_CUDA_CACHE", str(tmp_path / "cache"))
    spec = _cuda.build_spec("8.0", _fake_csrc(tmp_path))
    spec.build_dir.mkdir(parents=True)
    spec.library.write_bytes(b"not a shared object")
    calls = []
    sentinel = object()
    loader = lambda **kw: calls.append(kw) or sentinel
    assert _cuda.jit_build(spec, loader=loader) is sentinel  # unloadable: rebuilt
    assert len(calls) == 1
    monkeypatch.setattr(_cuda, "_import_library", lambda name, path: ("imported", name, path))
    assert _cuda.jit_build(spec, loader=loader) == ("imported", spec.name, spec.library)
    assert len(calls) == 1


def test_is_built_never_builds(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIPELT_CUDA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    monkeypatch.setattr(_cuda, "_ext", None)
    monkeypatch.setattr(_cuda, "_import_aot", lambda: None)

    def no_build(*a, **kw):
        raise AssertionError("is_built() must not build")

    monkeypatch.setattr(_cuda, "jit_build", no_build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _cuda.is_built() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _cuda.is_built() is False
    spec = _cuda.build_spec("8.0")
    spec.build_dir.mkdir(parents=True)
    spec.library.write_bytes(b"")
    assert _cuda.is_built() is True
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "not an arch")
    assert _cuda.is_built() is False


def test_a_failed_build_is_not_retried(monkeypatch):
    monkeypatch.setattr(_cuda, "_ext", None)
    monkeypatch.setattr(_cuda, "_ext_error", None)
    monkeypatch.setattr(_cuda, "_import_aot", lambda: None)
    monkeypatch.setattr(_cuda, "build_spec", lambda: "spec")
    calls = []

    def failing(spec):
        calls.append(spec)
        raise RuntimeError("unipelt_fast: building the CUDA extension failed: boom")

    monkeypatch.setattr(_cuda, "jit_build", failing)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="boom"):
            _cuda.extension()
    assert calls == ["spec"]


def test_op_modules_follow_the_calling_convention():
    for op in ("prefix_attention", "gated_adapter", "bias_only_linear", "bias_only_layer_norm"):
        mod = kernel_impl(op, "cuda")  # would raise NotImplementedError without forward/backward
        assert callable(mod.forward) and callable(mod.backward)
    assert _cuda.op_module("no_such_op") is None


def test_activation_ids_match_the_header():
    text = (CSRC / "launchers.h").read_text()
    enum = re.search(r"enum UfAct \{([^}]*)\}", text).group(1)
    ids = {m.group(1).lower(): int(m.group(2)) for m in re.finditer(r"UF_(\w+) = (\d+)", enum)}
    assert ids == {name: i for i, name in enumerate(ACTIVATIONS)} == _cuda.ACT_ID


# ---- GPU parity (needs a CUDA device and a working nvcc for the JIT build) -----------------

CUDA = "cuda"


def _pa(**kw):
    return prefix_attention_case(device=CUDA, **kw)


PREFIX_CASES = {
    "base": {},
    "mha": dict(H=3, Hkv=3),
    "gqa4": dict(H=8, Hkv=2, Lq=33, Lk=33),
    "batch_layout": dict(layout="batch", gate="b2"),
    "indexed": dict(layout="indexed", T=3, B=5, gate="b"),
    "gate_b2_mask": dict(gate="b2", mask=True),
    "fully_padded": dict(fully_padded=True, gate="b2"),
    "fully_padded_no_prefix": dict(fully_padded=True, P=0),
    "causal": dict(causal=True, Lq=9, Lk=9),
    "causal_lq_lt_lk": dict(causal=True, Lq=5, Lk=13, mask=True),
    "causal_lq_gt_lk_no_prefix": dict(causal=True, Lq=13, Lk=5, P=0),  # empty rows
    "no_prefix": dict(P=0),
    "long_prefix": dict(P=37, Lq=3, Lk=1),
    "noncontiguous": dict(noncontiguous=True, layout="indexed", gate="b2", mask=True),
    "d64_tiles": dict(B=2, H=4, Hkv=1, Lq=70, Lk=97, P=11, D=64, causal=True, mask=True),
    "d80": dict(D=80, Lq=17, Lk=40, gate="b2"),
    "d128": dict(D=128, Lq=65, Lk=65, P=5, layout="batch"),
    "d256_big_smem": dict(D=256, Lq=33, Lk=34, P=2, gate="b2"),
    "scale": dict(scale=0.3, mask=True),
    "lq1": dict(Lq=1, Lk=1, P=1),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(PREFIX_CASES))
def test_prefix_attention_parity(name, dtype):
    check_parity(uf.prefix_attention, _pa(**PREFIX_CASES[name]), dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefix_attention_lse_and_determinism(dtype):
    case = _pa(layout="indexed", T=2, B=6, gate="b2", mask=True, causal=True, Lq=20, Lk=24)
    c = case.cast(dtype)
    q, k, v, pk, pv = c.args.values()
    kw = c.kwargs
    gate = kw["prefix_gate"].float().contiguous()
    scale = q.shape[-1] ** -0.5
    fwd = _cuda.op_module("prefix_attention")
    args = PrefixAttentionArgs(
        q, k, v, pk, pv, kw["prefix_index"], gate, kw["key_padding_mask"], True, scale
    )
    out, lse = fwd.forward(args)
    r = c.cast(torch.float64)
    want = reference.prefix_attention_lse(
        r.args["q"],
        r.args["k"],
        r.args["prefix_k"],
        prefix_index=kw["prefix_index"],
        prefix_gate=r.kwargs["prefix_gate"],
        key_padding_mask=kw["key_padding_mask"],
        causal=True,
    )
    assert_close(lse, want, dtype, "lse")
    g = torch.randn_like(out)
    first = fwd.backward(args, g, out, lse)
    second = fwd.backward(args, g, out, lse)
    for a, b in zip(first, second, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)  # bitwise: no atomics


GATED_CASES = {
    "plain": {},
    "token": dict(gate_mode="token"),
    "mean": dict(gate_mode="mean"),
    "mean_masked": dict(gate_mode="mean", masked=True),
    "mean_fully_padded": dict(gate_mode="mean", fully_padded=True, gate_bias=False),
    "residual": dict(gate_mode="token", residual=True, scaling=0.5),
    "no_biases": dict(bias_down=False, bias_up=False, gate_mode="token"),
    "gelu": dict(activation="gelu", gate_mode="mean"),
    "gelu_tanh": dict(activation="gelu_tanh"),
    "silu": dict(activation="silu", gate_mode="token"),
    "tanh": dict(activation="tanh", residual=True),
    "identity": dict(activation="identity", scaling=2.0),
    "noncontiguous": dict(noncontiguous=True, gate_mode="token"),
    "noncontiguous_mean": dict(noncontiguous=True, gate_mode="mean", masked=True),
    "rows_2d": dict(lead=(7,), gate_mode="token"),
    "one_token": dict(lead=(1, 1), gate_mode="mean"),
    "odd_dims": dict(lead=(3, 33), d=33, r=5, gate_mode="token"),
    "wide": dict(lead=(2, 65), d=1030, r=64, gate_mode="mean", masked=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(GATED_CASES))
def test_gated_adapter_parity(name, dtype):
    case = gated_adapter_case(device=CUDA, **GATED_CASES[name])
    check_parity(uf.gated_adapter, case, dtype, "cuda", check_grads=dtype == torch.float32)
    if dtype != torch.float32:
        _check_grads_same_grad_out(uf.gated_adapter, case, dtype, "cuda")


def _check_grads_same_grad_out(fn, case, dtype, backend):
    """check_parity's gradient check, with the float64 reference fed the same dtype-rounded
    grad_out as the backend. The gate's gradients (b_gate, w_gate) hang on one dot product
    <grad_out, adapter output> per token, which can nearly cancel: rounding grad_out alone
    moves them past the bf16 tolerance for a few percent of random draws (measured on the
    float64 reference), whatever the backend. Fed the same grad_out, the CPU emulation of
    these kernels lands near 3e-3 on those gradients in bf16."""
    test = case.cast(dtype)
    ref = test.cast(torch.float64)
    out = test.call(fn, backend=backend)
    expected = ref.call(fn, backend="eager")
    g = torch.randn_like(expected).to(dtype)
    got = torch.autograd.grad(out, test.tensors(case.diff), g)
    want = torch.autograd.grad(expected, ref.tensors(case.diff), g.double())
    for name, a, e in zip(case.diff, got, want, strict=True):
        assert a.shape == e.shape, f"d{name}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
        assert_close(a, e, dtype, f"d{name}")


LINEAR_CASES = {
    "none": {},
    "relu": dict(activation="relu"),
    "gelu": dict(activation="gelu", d_out=65),
    "gelu_tanh": dict(activation="gelu_tanh"),
    "silu": dict(activation="silu", noncontiguous=True),
    "tanh": dict(activation="tanh", lead=(33,)),
    "identity": dict(activation="identity", lead=(1,), d_in=7, d_out=1),
    "many_rows": dict(activation="gelu", lead=(4, 1025), d_in=40, d_out=300),
    "noncontiguous_relu": dict(activation="relu", noncontiguous=True, lead=(3, 5)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LINEAR_CASES))
def test_bias_only_linear_parity(name, dtype):
    case = bias_only_linear_case(device=CUDA, **LINEAR_CASES[name])
    check_parity(uf.bias_only_linear, case, dtype, "cuda")


def _layer_norm_case(lead, d, noncontiguous=False, eps=1e-5):
    f = lambda *s: torch.randn(*s, dtype=torch.float64, device=CUDA)
    x = f(*lead, d) * 3 + 1
    if noncontiguous:
        x = noncontig(x)
    args = {"x": x, "weight": f(d), "bias": f(d)}
    return Case(args, {"eps": eps}, ("x", "bias"))


LAYER_NORM_CASES = {
    "small": dict(lead=(2, 7), d=24),
    "one_row": dict(lead=(1,), d=3),  # d <= 2 makes dx vanish: relative error is undefined
    "odd": dict(lead=(33,), d=129),
    "wide": dict(lead=(3, 5), d=1537),
    "noncontiguous": dict(lead=(4, 9), d=40, noncontiguous=True),
    "many_rows": dict(lead=(8, 1025), d=64, eps=1e-6),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYER_NORM_CASES))
def test_bias_only_layer_norm_parity(name, dtype):
    check_parity(uf.bias_only_layer_norm, _layer_norm_case(**LAYER_NORM_CASES[name]), dtype, "cuda")


@pytest.mark.gpu
def test_auto_uses_cuda_when_triton_is_missing(monkeypatch):
    from unipelt_fast import _backend

    monkeypatch.setattr(_backend, "triton_import_error", lambda: "ImportError: no triton")
    _cuda.extension()  # build first: auto only picks an already built extension
    assert uf.resolve_backend("auto", torch.device(CUDA), "gated_adapter") == "cuda"


# ---- the kernels themselves, run on the CPU by emulation (no GPU needed) -------------------
# csrc/*.cu are compiled with g++ after a textual rewrite of the launches, against a small
# emulation of the CUDA subset they use: one std::thread per CUDA thread, std::barrier for
# __syncthreads and the warp shuffles, shared memory poisoned with NaN, exited threads
# dropping out of barriers. This runs the real index arithmetic, tiling, masking and
# reductions; the GEMMs the binding does in cuBLAS are done here with torch, mirroring
# csrc/bindings.cpp.

_EMU_H = r"""
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
using std::max;
using std::min;
struct uint3_ { unsigned x = 0, y = 0, z = 0; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
template <typename K>
inline cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int v) {
  return v <= 227 * 1024 ? cudaSuccess : cudaErrorInvalidValue;
}
struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.x, 2); return (float)f; }
inline __half __float2half_rn(float v) {
  _Float16 f = (_Float16)v; __half h; std::memcpy(&h.x, &f, 2); return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = uint32_t(b.x) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u; std::memcpy(&u, &v, 4); u += 0x7fff + ((u >> 16) & 1);
  __nv_bfloat16 b; b.x = uint16_t(u >> 16); return b;
}
namespace emu {
struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> wbar;
  std::vector<float> wslot, dyn, stat;
};
inline thread_local uint3_ tIdx, bIdx;
inline thread_local dim3 bDim, gDim;
inline thread_local Block* blk = nullptr;
inline float* dyn_smem() { return blk->dyn.data(); }
inline float* static_shared(int) { return blk->stat.data(); }
inline float shfl(float v, int src) {
  const int w = tIdx.x >> 5, lane = tIdx.x & 31;
  blk->wslot[w * 32 + lane] = v;
  blk->wbar[w]->arrive_and_wait();
  const float r = blk->wslot[w * 32 + (src & 31)];
  blk->wbar[w]->arrive_and_wait();
  return r;
}
template <typename F>
void launch(dim3 g, dim3 b, size_t smem, F body) {
  const unsigned nt = b.x * b.y * b.z;
  for (unsigned bz = 0; bz < g.z; ++bz)
    for (unsigned by = 0; by < g.y; ++by)
      for (unsigned bx = 0; bx < g.x; ++bx) {
        Block B;
        B.bar = std::make_unique<std::barrier<>>(nt);
        for (unsigned w = 0; w < (nt + 31) / 32; ++w)
          B.wbar.push_back(std::make_unique<std::barrier<>>(std::min(32u, nt - 32 * w)));
        B.wslot.assign(((nt + 31) / 32) * 32, 0.f);
        B.dyn.assign(smem / 4 + 1, std::numeric_limits<float>::quiet_NaN());
        B.stat.assign(1024, std::numeric_limits<float>::quiet_NaN());
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < nt; ++t)
          ts.emplace_back([&, t] {
            tIdx = {t, 0, 0}; bIdx = {bx, by, bz}; bDim = b; gDim = g; blk = &B;
            body();
            B.bar->arrive_and_drop();
            B.wbar[t / 32]->arrive_and_drop();
          });
        for (auto& th : ts) th.join();
      }
}
}  // namespace emu
#define threadIdx emu::tIdx
#define blockIdx emu::bIdx
#define blockDim emu::bDim
#define gridDim emu::gDim
inline void __syncthreads() { emu::blk->bar->arrive_and_wait(); }
inline float __shfl_sync(unsigned, float v, int src) { return emu::shfl(v, src); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  return emu::shfl(v, (int(threadIdx.x) & 31) ^ o);
}
"""

_EMU_WRAP = r"""
#include "launchers.h"
#include <vector>
extern "C" {
int emu_attn(int bwd, const void* const* p, const int64_t* st, const int* dm, int causal,
             float scale, int dtype, void* const* o) {
  UfAttnArgs a;
  a.q = p[0]; a.k = p[1]; a.v = p[2]; a.pk = p[3]; a.pv = p[4];
  a.prefix_index = static_cast<const int64_t*>(p[5]);
  a.gate = static_cast<const float*>(p[6]);
  a.kpm = static_cast<const bool*>(p[7]);
  a.bias = p[8];
  for (int i = 0; i < 4; ++i) {
    a.sq[i] = st[i]; a.sk[i] = st[4 + i]; a.sv[i] = st[8 + i];
    a.spk[i] = st[12 + i]; a.spv[i] = st[16 + i]; a.sb[i] = st[20 + i];
  }
  a.B = dm[0]; a.H = dm[1]; a.Hkv = dm[2]; a.Lq = dm[3]; a.Lk = dm[4]; a.P = dm[5];
  a.T = dm[6]; a.D = dm[7]; a.bias_f32 = dm[8]; a.causal = causal; a.scale = scale;
  if (!bwd) return uf_prefix_attention_forward(a, dtype, o[0], static_cast<float*>(o[1]), nullptr);
  std::vector<float> ws(uf_prefix_attention_workspace_floats(a) + 1, 1e30f);
  std::vector<int> iws(uf_prefix_attention_workspace_ints(a) + 1, -7);
  return uf_prefix_attention_backward(a, dtype, o[0], o[1], static_cast<const float*>(o[2]),
                                      o[3], o[4], o[5], o[6], o[7], static_cast<float*>(o[8]),
                                      ws.data(), iws.data(), nullptr);
}
int emu_colsum_chunks(int64_t M) { return uf_colsum_chunks(M); }
int emu_colsum(const void* src, int f32, int dt, int64_t M, int64_t N, int64_t ld, float* part,
               void* out) { return uf_colsum(src, f32, dt, M, N, ld, part, out, 0, nullptr); }
int emu_lin_epi(const void* mm, const void* b, void* y, void* pre, int64_t M, int64_t N, int act,
                int dt) { return uf_linear_epilogue(mm, b, y, pre, M, N, act, dt, nullptr); }
int emu_lin_bwd(const void* gy, const void* sv, void* dpre, void* db, float* part, int64_t M,
                int64_t N, int act, int dt) {
  return uf_linear_backward(gy, sv, dpre, db, part, M, N, act, dt, nullptr);
}
int emu_ln_fwd(const void* x, int64_t s0, int64_t s1, const void* w, const void* b, void* y,
               float* mu, float* rs, int64_t M, int64_t N, float eps, int dt) {
  return uf_layer_norm_forward(x, s0, s1, w, b, y, mu, rs, M, N, eps, dt, nullptr);
}
int emu_ln_bwd(const void* gy, const void* x, int64_t s0, int64_t s1, const void* w,
               const float* mu, const float* rs, void* dx, void* db, float* part, int64_t M,
               int64_t N, int dt) {
  return uf_layer_norm_backward(gy, x, s0, s1, w, mu, rs, dx, db, part, M, N, dt, nullptr);
}
int emu_ad_down(const float* mm, const void* bd, const void* bg, float* z, void* h, float* s,
                int64_t M, int r, int gated, int act, int dt) {
  return uf_adapter_down_epilogue(mm, bd, bg, z, h, s, M, r, gated, act, dt, nullptr);
}
int emu_ad_gate(const float* s, const bool* mask, float* g, int64_t B, int64_t L, int mode) {
  return uf_adapter_gate(s, mask, g, B, L, mode, nullptr);
}
int emu_ad_out(const void* u, const void* bu, const void* res, const int64_t* sres,
               const float* g, void* out, int64_t B, int64_t L, int64_t d, float sc, int dt) {
  return uf_adapter_out_epilogue(u, bu, res, sres, g, out, B, L, d, sc, dt, nullptr);
}
int emu_ad_bwd_up(const void* go, const float* g, const float* u, const void* bu, void* da,
                  float* dg, int64_t M, int64_t d, float sc, int dt) {
  return uf_adapter_bwd_up(go, g, u, bu, da, dg, M, d, sc, dt, nullptr);
}
int emu_ad_gate_bwd(const float* s, const bool* mask, const float* dg, float* ds, int64_t B,
                    int64_t L, int mode) {
  return uf_adapter_gate_backward(s, mask, dg, ds, B, L, mode, nullptr);
}
int emu_ad_bwd_down(const void* dh, const float* z, const float* ds, float* dzc, void* dzcx,
                    int64_t M, int r, int gated, int act, int dt) {
  return uf_adapter_bwd_down(dh, z, ds, dzc, dzcx, M, r, gated, act, dt, nullptr);
}
int emu_ad_act(const float* z, void* h, int64_t n, int act, int dt) {
  return uf_adapter_act(z, h, n, act, dt, nullptr);
}
}
"""

_LAUNCH = re.compile(r"([\w:]+(?:<[\w:]+>)?)\s*<<<(.*?)>>>\((.*?)\);", re.S)


def _split_top(text):
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        depth += (ch == "(") - (ch == ")")
        cur += ch
    return parts + [cur.strip()]


def _emulable(src: str) -> str:
    """A .cu source rewritten for the emulation: launches become emu::launch calls."""
    src = src.replace("extern __shared__ float smem[];", "float* smem = emu::dyn_smem();")
    src = re.sub(r"__shared__ float (\w+)\[(\d+)\];", r"float* \1 = emu::static_shared(\2);", src)

    def launch(m):
        cfg = _split_top(m.group(2)) + ["0", "0"]
        return f"emu::launch({cfg[0]}, {cfg[1]}, {cfg[2]}, [&] {{ {m.group(1)}({m.group(3)}); }});"

    src = _LAUNCH.sub(launch, src)
    assert "<<<" not in src
    return src


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    import ctypes
    import shutil
    import subprocess

    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("the CPU emulation needs g++ (C++20 <barrier>, _Float16)")
    d = tmp_path_factory.mktemp("cuda_emu")
    inc = d / "inc"
    inc.mkdir()
    (inc / "emu.h").write_text(_EMU_H)
    for name in ("cuda_runtime.h", "cuda_runtime_api.h", "cuda_fp16.h", "cuda_bf16.h"):
        (inc / name).write_text('#pragma once\n#include "emu.h"\n')
    srcs = []
    for cu in sorted(CSRC.glob("*.cu")):
        out = d / (cu.stem + ".cpp")
        out.write_text(_emulable(cu.read_text()))
        srcs.append(str(out))
    (d / "wrap.cpp").write_text(_EMU_WRAP)
    lib = d / "libufemu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", f"-I{inc}", f"-I{CSRC}"]
    cmd += ["-include", "emu.h", *srcs, str(d / "wrap.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and ("barrier" in proc.stderr or "_Float16" in proc.stderr):
        pytest.skip(f"this g++ cannot build the emulation: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(str(lib))


_TAG = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _p(t):
    import ctypes

    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _nan(shape, dtype):
    return torch.full(tuple(shape), float("nan"), dtype=dtype)


def _grads(expected, ref_case, names):
    g = torch.randn(expected.shape, dtype=torch.float64)
    return g, dict(
        zip(names, torch.autograd.grad(expected, ref_case.tensors(names), g), strict=True)
    )


EMU_PREFIX_CASES = {
    "indexed_gqa_causal_mask_gate": dict(
        B=3, H=4, Hkv=2, Lq=9, Lk=11, P=3, layout="indexed", T=3, gate="b2", mask=True, causal=True
    ),
    "noncontiguous_two_tiles_d40": dict(
        B=1, H=2, Hkv=1, Lq=10, Lk=41, P=5, D=40, noncontiguous=True, gate="b"
    ),
    "fully_padded_no_prefix_causal": dict(fully_padded=True, P=0, causal=True, Lq=6, Lk=4),
    "bias_broadcast_heads_gqa_causal": dict(
        B=2, H=4, Hkv=2, Lq=9, Lk=11, P=3, gate="b2", mask=True, causal=True, bias="1hqk"
    ),
    "bias_broadcast_rows_indexed": dict(
        B=3, H=2, Hkv=1, Lq=5, Lk=7, P=4, layout="indexed", T=2, gate="b", bias="b11k"
    ),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(EMU_PREFIX_CASES))
def test_emulated_prefix_attention_kernels(emu, name, dtype):
    import ctypes

    from tests.convention_backend import op_module

    ops = op_module("prefix_attention")
    case = prefix_attention_case(**EMU_PREFIX_CASES[name]).cast(dtype)
    ref = case.cast(torch.float64)
    q, k, v, pk, pv = (t.detach() for t in case.args.values())
    kw = case.kwargs
    B, H, Lq, D = q.shape
    pk4, pv4, idx = ops._canonical_prefix(pk, pv, kw.get("prefix_index"), B)
    gate = kw.get("prefix_gate")
    gate = None if gate is None else gate.float().reshape(B, -1).expand(B, 2).contiguous()
    kpm = kw.get("key_padding_mask")
    causal = kw["causal"]
    scale = D**-0.5
    bias = kw.get("attn_bias")  # as the op hands it over: a stride-0 (B, H, Lq, P + Lk) view
    if bias is not None:
        bias = bias.detach().expand(B, H, Lq, pk4.shape[2] + k.shape[2])
    b_st = (0, 0, 0, 0) if bias is None else bias.stride()
    st = (ctypes.c_int64 * 24)(*(s for t in (q, k, v, pk4, pv4) for s in t.stride()), *b_st)
    dims = (B, H, k.shape[1], Lq, k.shape[2], pk4.shape[2], pk4.shape[0], D)
    dm = (ctypes.c_int * 9)(*dims, int(bias is not None and bias.dtype == torch.float32))
    held = (q, k, v, pk4, pv4, idx.contiguous(), gate, kpm, bias)
    ins = (ctypes.c_void_p * 9)(*(_p(t) for t in held))
    out, lse = _nan(q.shape, dtype), _nan((B, H, Lq), torch.float32)
    assert (
        emu.emu_attn(
            0,
            ins,
            st,
            dm,
            causal,
            ctypes.c_float(scale),
            _TAG[dtype],
            (ctypes.c_void_p * 2)(_p(out), _p(lse)),
        )
        == 0
    )
    expected = uf.prefix_attention(*ref.args.values(), **ref.kwargs, backend="eager")
    assert_close(out, expected, dtype, "out")
    lse_kw = {
        n: ref.kwargs[n]
        for n in ("prefix_index", "prefix_gate", "key_padding_mask", "causal", "attn_bias")
        if n in ref.kwargs
    }
    want_lse = reference.prefix_attention_lse(
        ref.args["q"], ref.args["k"], ref.args["prefix_k"], **lse_kw
    )
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    if finite.any():
        assert_close(lse[finite], want_lse[finite], torch.float32, "lse")
    g, want = _grads(expected, ref, ref.diff)
    grads = [_nan(t.shape, dtype) for t in (q, k, v, pk4, pv4)]
    dgate = None if gate is None else _nan((B, 2), torch.float32)
    keep = (g.to(dtype), out, lse, *grads, dgate)  # alive across the call: raw pointers
    outs = (ctypes.c_void_p * 9)(*(_p(t) for t in keep))
    assert emu.emu_attn(1, ins, st, dm, causal, ctypes.c_float(scale), _TAG[dtype], outs) == 0
    for n, got in zip(("q", "k", "v", "prefix_k", "prefix_v"), grads, strict=True):
        assert_close(got.reshape(want[n].shape), want[n], dtype, f"d{n}")
    if gate is not None:
        wg = want["prefix_gate"]
        assert_close(dgate if wg.dim() == 2 else dgate.sum(1), wg, dtype, "dprefix_gate", 2.0)


def _i64(v):
    import ctypes

    return ctypes.c_int64(v)


def _emu_linear(emu, x, w, b, act):
    """bias_only_linear forward + backward through the emulated kernels (GEMMs in torch, as
    bindings.cpp does them in cuBLAS). Returns (y, backward(grad_y) -> (dx, dbias))."""
    dt = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    M, N = x2.shape[0], w.shape[0]
    mm = (x2 @ w.T).contiguous()
    y = _nan((M, N), dt)
    pre = _nan((M, N), dt) if act in ("gelu", "gelu_tanh", "silu", "tanh") else None
    assert (
        emu.emu_lin_epi(
            _p(mm), _p(b), _p(y), _p(pre), _i64(M), _i64(N), _cuda.ACT_ID[act], _TAG[dt]
        )
        == 0
    )

    def backward(gy):
        gy = gy.reshape(M, N).contiguous()
        dpre = None if act == "identity" else _nan((M, N), dt)
        db = _nan((N,), dt)
        part = _nan((max(1, emu.emu_colsum_chunks(_i64(M)) * N),), torch.float32)
        saved = y if act == "relu" else pre
        assert (
            emu.emu_lin_bwd(
                _p(gy),
                _p(saved),
                _p(dpre),
                _p(db),
                _p(part),
                _i64(M),
                _i64(N),
                _cuda.ACT_ID[act],
                _TAG[dt],
            )
            == 0
        )
        return (gy if dpre is None else dpre) @ w, db

    return y, backward


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["gelu", "relu", "identity", "silu"])
def test_emulated_bias_only_linear_kernels(emu, act, dtype):
    case = bias_only_linear_case(lead=(3, 5), d_in=12, d_out=37, activation=act, noncontiguous=True)
    c = case.cast(dtype)
    ref = c.cast(torch.float64)
    x, w, b = (t.detach() for t in c.args.values())
    y, backward = _emu_linear(emu, x, w, b, act)
    expected = uf.bias_only_linear(*ref.args.values(), activation=act, backend="eager")
    assert_close(y.view(expected.shape), expected, dtype, "y")
    g, want = _grads(expected, ref, ("x", "bias"))
    dx, db = backward(g.to(dtype))
    assert_close(dx.view(want["x"].shape), want["x"], dtype, "dx")
    assert_close(db, want["bias"], dtype, "dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, d", [((2, 7), 24), ((3,), 1100), ((1,), 3)])
def test_emulated_bias_only_layer_norm_kernels(emu, lead, d, dtype):
    case = Case(
        {
            "x": noncontig(torch.randn(*lead, d, dtype=torch.float64) * 3 + 1),
            "weight": torch.randn(d, dtype=torch.float64),
            "bias": torch.randn(d, dtype=torch.float64),
        },
        {},
        ("x", "bias"),
    )
    c = case.cast(dtype)
    ref = c.cast(torch.float64)
    x, w, b = (t.detach() for t in c.args.values())
    x2 = x.reshape(-1, d)
    M = x2.shape[0]
    y, mu, rs = _nan((M, d), dtype), _nan((M,), torch.float32), _nan((M,), torch.float32)
    strides = (_i64(x2.stride(0)), _i64(x2.stride(1)))
    import ctypes

    assert (
        emu.emu_ln_fwd(
            _p(x2),
            *strides,
            _p(w),
            _p(b),
            _p(y),
            _p(mu),
            _p(rs),
            _i64(M),
            _i64(d),
            ctypes.c_float(1e-5),
            _TAG[dtype],
        )
        == 0
    )
    expected = uf.bias_only_layer_norm(*ref.args.values(), backend="eager")
    assert_close(y.view(expected.shape), expected, dtype, "y")
    g, want = _grads(expected, ref, ("x", "bias"))
    gy = g.to(dtype).reshape(M, d).contiguous()
    dx, db = _nan((M, d), dtype), _nan((d,), dtype)
    part = _nan((max(1, emu.emu_colsum_chunks(_i64(M)) * d),), torch.float32)
    assert (
        emu.emu_ln_bwd(
            _p(gy),
            _p(x2),
            *strides,
            _p(w),
            _p(mu),
            _p(rs),
            _p(dx),
            _p(db),
            _p(part),
            _i64(M),
            _i64(d),
            _TAG[dtype],
        )
        == 0
    )
    assert_close(dx.view(want["x"].shape), want["x"], dtype, "dx")
    assert_close(db, want["bias"], dtype, "dbias")


EMU_GATED_CASES = {
    "mean_masked_gelu": dict(gate_mode="mean", masked=True, activation="gelu", noncontiguous=True),
    "token_residual_no_bias": dict(gate_mode="token", residual=True, bias_down=False, scaling=0.5),
    "fully_padded_silu": dict(
        gate_mode="mean", fully_padded=True, gate_bias=False, activation="silu"
    ),
    "no_gate_rows": dict(lead=(9,), activation="tanh", d=40, r=5),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(EMU_GATED_CASES))
def test_emulated_gated_adapter_kernels(emu, name, dtype):
    """Forward and backward through the emulated kernels, orchestrated as bindings.cpp does."""
    import ctypes

    case = gated_adapter_case(**EMU_GATED_CASES[name])
    c = case.cast(dtype)
    ref = c.cast(torch.float64)
    A = {
        n: (t.detach() if isinstance(t, torch.Tensor) else t)
        for n, t in {**c.args, **c.kwargs}.items()
    }
    x, wd, bd, wu, bu = (A[n] for n in ("x", "w_down", "b_down", "w_up", "b_up"))
    wg, bg, mask, res = (A.get(n) for n in ("w_gate", "b_gate", "gate_mask", "residual"))
    act, sc = A["activation"], float(A["scaling"])
    mode = _cuda.GATE_MODE_ID[None if wg is None else A["gate_mode"]]
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    B, L, d = x3.shape
    M, r, gated = B * L, wd.shape[0], int(mode != 0)
    R1, T, a_id = r + gated, _TAG[dtype], _cuda.ACT_ID[act]
    mk = mask.contiguous() if (mask is not None and mode == 2) else None
    x2 = x3.reshape(M, d)
    wcat = torch.cat([wd, wg]) if gated else wd
    mm = (x2.float() @ wcat.float().T).contiguous()
    z, h = _nan((M, r), torch.float32), _nan((M, r), dtype)
    s = _nan((M,), torch.float32) if gated else None
    assert (
        emu.emu_ad_down(_p(mm), _p(bd), _p(bg), _p(z), _p(h), _p(s), _i64(M), r, gated, a_id, T)
        == 0
    )
    g = _nan((M,), torch.float32)
    assert emu.emu_ad_gate(_p(s), _p(mk), _p(g), _i64(B), _i64(L), mode) == 0
    u = (h @ wu.T).contiguous()
    rr = x3 if res is None else res.reshape(B, L, d)
    out = _nan((B, L, d), dtype)
    sres = (ctypes.c_int64 * 3)(*rr.stride())
    assert (
        emu.emu_ad_out(
            _p(u),
            _p(bu),
            _p(rr),
            sres,
            _p(g),
            _p(out),
            _i64(B),
            _i64(L),
            _i64(d),
            ctypes.c_float(sc),
            T,
        )
        == 0
    )
    expected = uf.gated_adapter(*ref.args.values(), **ref.kwargs, backend="eager")
    assert_close(out.view(expected.shape), expected, dtype, "out")
    gd = torch.randn(expected.shape, dtype=torch.float64).to(dtype)  # both sides get it rounded
    want = dict(
        zip(
            ref.diff, torch.autograd.grad(expected, ref.tensors(ref.diff), gd.double()), strict=True
        )
    )
    go2 = gd.reshape(M, d).contiguous()
    h2 = _nan((M, r), dtype)
    assert emu.emu_ad_act(_p(z), _p(h2), _i64(M * r), a_id, T) == 0
    u32 = None
    if gated:
        h32 = _nan((M, r), torch.float32)
        assert emu.emu_ad_act(_p(z), _p(h32), _i64(M * r), a_id, 0) == 0
        u32 = (h32 @ wu.float().T).contiguous()
    da, dg = _nan((M, d), dtype), _nan((M,), torch.float32)
    assert (
        emu.emu_ad_bwd_up(
            _p(go2), _p(g), _p(u32), _p(bu), _p(da), _p(dg), _i64(M), _i64(d), ctypes.c_float(sc), T
        )
        == 0
    )
    part = _nan((max(1, emu.emu_colsum_chunks(_i64(M)) * max(d, R1)),), torch.float32)
    got = {"w_up": da.T @ h2, "x": None}
    if bu is not None:
        got["b_up"] = _nan((d,), dtype)
        assert (
            emu.emu_colsum(_p(da), 0, T, _i64(M), _i64(d), _i64(d), _p(part), _p(got["b_up"])) == 0
        )
    dh = (da @ wu).contiguous()
    ds = _nan((M,), torch.float32)
    if gated:
        assert emu.emu_ad_gate_bwd(_p(s), _p(mk), _p(dg), _p(ds), _i64(B), _i64(L), mode) == 0
    dzc, dzcx = _nan((M, R1), torch.float32), _nan((M, R1), dtype)
    assert (
        emu.emu_ad_bwd_down(_p(dh), _p(z), _p(ds), _p(dzc), _p(dzcx), _i64(M), r, gated, a_id, T)
        == 0
    )
    if bd is not None:
        got["b_down"] = _nan((r,), dtype)
        assert (
            emu.emu_colsum(_p(dzc), 1, T, _i64(M), _i64(r), _i64(R1), _p(part), _p(got["b_down"]))
            == 0
        )
    if gated and bg is not None:
        got["b_gate"] = _nan((1,), dtype)
        col = ctypes.c_void_p(dzc.data_ptr() + 4 * r)
        assert (
            emu.emu_colsum(col, 1, T, _i64(M), _i64(1), _i64(R1), _p(part), _p(got["b_gate"])) == 0
        )
    dw = dzcx.T @ x2
    got["w_down"] = dw[:r]
    if gated:
        got["w_gate"] = dw[r:]
    got["x"] = dzcx @ wcat + (go2 if res is None else 0)
    if res is not None:
        got["residual"] = go2
    assert set(got) == set(want)
    for n, e in want.items():
        assert_close(got[n].reshape(e.shape), e, dtype, f"d{n}")
