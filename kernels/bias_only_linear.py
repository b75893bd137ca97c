"""BitFit linear: ``act(x @ W.T + b)`` with W frozen; gradients for x and b only.

Forward: the GEMM runs on the vendor GEMM, which adds the bias in its epilogue. With no
activation that is all (``torch.addmm``); relu is fused into the epilogue as well
(``torch._addmm_activation``, cuBLASLt where it applies), so neither launches a Triton
kernel and relu saves only y. gelu/gelu_tanh/silu/tanh take one Triton pass that reads the
pre-activation (kept for the backward) and writes y. (A bias-less GEMM plus a Triton
bias+activation pass costs one more full-size write for gelu, and rounds the GEMM result
before the bias is added, which flips relu's sign near zero in fp16 relative to eager.)

Backward: one Triton launch reads grad_y (and the saved pre-activation or y), writes
``grad_pre = grad_y * act'(pre)`` and finishes ``dbias``: each program owns a column block
and walks every row in a fixed order with fp32 accumulation, so dbias is deterministic and
needs no partial sums or second stage. The column blocks are narrow enough (down to 16) to
give every SM programs. Then ``dx = grad_pre @ W`` on the vendor GEMM. No weight gradient
is computed or allocated.

Calling convention: see ``unipelt_fast/ops/bias_only_linear.py`` and docs/ops.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from unipelt_fast._alloc import new_output, on_input_device
from unipelt_fast._args import BiasOnlyLinearArgs

# activation codes (constexpr in the kernels)
_ACT = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "tanh": 5}

# Constants below: 0.70710678 = 1/sqrt(2), 0.39894228 = 1/sqrt(2*pi),
# 0.79788456 = sqrt(2/pi), 0.044715 = the tanh-GELU cubic coefficient.


@triton.jit
def _tanh(z):
    # tanh without libdevice (not available in the interpreter); stable for large |z|.
    t = tl.exp(-2.0 * tl.abs(z))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(z < 0, -r, r)


@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    """act(z) for fp32 z."""
    if ACT == 1:
        out = tl.maximum(z, 0.0)
    elif ACT == 2:
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 3:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        out = 0.5 * z * (1.0 + _tanh(u))
    elif ACT == 4:
        out = z * tl.sigmoid(z)
    elif ACT == 5:
        out = _tanh(z)
    else:
        out = z
    return out


@triton.jit
def _act_grad(g, s, ACT: tl.constexpr):
    """g * act'(pre) in fp32; s is the saved tensor (y for relu, pre otherwise)."""
    if ACT == 1:
        out = tl.where(s > 0.0, g, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.erf(s * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * s * s)
        out = g * (cdf + s * pdf)
    elif ACT == 3:
        u = 0.7978845608028654 * (s + 0.044715 * s * s * s)
        t = _tanh(u)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * s * s)
        out = g * (0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * du)
    elif ACT == 4:
        sg = tl.sigmoid(s)
        out = g * sg * (1.0 + s * (1.0 - sg))
    elif ACT == 5:
        t = _tanh(s)
        out = g * (1.0 - t * t)
    else:
        out = g
    return out


@triton.jit(do_not_specialize=["numel"])  # row counts vary per batch
def _act_fwd_kernel(
    pre_ptr,  # (numel,) contiguous pre-activation (the GEMM result, bias included)
    y_ptr,  # (numel,) contiguous; may alias pre_ptr (relu: overwritten in place)
    numel,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _act_fwd(z, ACT).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])  # row counts vary per batch
def _act_bias_bwd_kernel(
    gy_ptr,  # (M, N) contiguous
    s_ptr,  # (M, N) contiguous saved tensor (pre, or y for relu); unused for identity
    gp_ptr,  # (M, N) contiguous grad_pre output; unused when not WRITE_GP
    db_ptr,  # (N,) dbias, in grad_y's dtype
    M,
    N,
    ACT: tl.constexpr,
    WRITE_GP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per column block walks every row in a fixed order, so dbias is finished
    # here (one launch, no partials) and is deterministic.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ACT == 0:
            gp = g
        else:
            s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            gp = _act_grad(g, s, ACT)
        if WRITE_GP:
            tl.store(gp_ptr + offs, gp.to(gp_ptr.dtype.element_ty), mask=mask)
        # masked lanes hold g = 0 (and act' finite), so they add nothing
        acc += gp
    tl.store(db_ptr + cols, tl.sum(acc, axis=0).to(db_ptr.dtype.element_ty), mask=cmask)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs keep it fast


def _bwd_blocks(N: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): the widest column block (16..128) that still gives two programs
    per SM, and a tile of 4096 elements (whatever M is, so one config per N)."""
    target = 2 * _num_sms(device)
    block_n = 128
    while block_n > 16 and triton.cdiv(N, block_n) < target:
        block_n //= 2
    block_n = min(block_n, triton.next_power_of_2(max(N, 1)))
    return 4096 // block_n, block_n


@on_input_device
def forward(a: BiasOnlyLinearArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """y = act(x @ weight.T + bias), plus pre for gelu/gelu_tanh/silu/tanh (else (0,))."""
    x, weight, bias, activation = a.x, a.weight, a.bias, a.activation
    M, N = x.shape[0], weight.shape[0]
    act = _ACT[activation]
    empty = x.new_empty((0,))
    y = new_output((M, N), x.dtype, x.device)
    if act == 0:
        torch.addmm(bias, x, weight.t(), out=y)
        return y, empty
    if act == 1:
        # relu in the GEMM epilogue (cuBLASLt where it applies): no pass, y is all that
        # is saved (act'(pre) = y > 0).
        torch._addmm_activation(bias, x, weight.t(), use_gelu=False, out=y)
        return y, empty
    # Vendor GEMM with the bias in its epilogue (cuBLASLt): the pre-activation is rounded
    # once, exactly as in eager F.linear, so act'(pre) agrees with eager.
    pre = new_output((M, N), x.dtype, x.device)
    torch.addmm(bias, x, weight.t(), out=pre)
    numel = M * N
    if numel > 0:
        BLOCK = 4096
        # 8 warps: 16 elements a thread keeps tanh's math clear of spills
        _act_fwd_kernel[(triton.cdiv(numel, BLOCK),)](
            pre, y, numel, ACT=act, BLOCK=BLOCK, num_warps=8
        )
    return y, pre


@on_input_device
def backward(
    a: BiasOnlyLinearArgs, grad_y: torch.Tensor, saved: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dbias): grad_pre = grad_y * act'(pre) and its column sums in one launch, then
    dx = grad_pre @ weight. dbias is in grad_y's dtype, accumulated in fp32. a.x is an
    empty placeholder here (x is never saved)."""
    weight, activation = a.weight, a.activation
    M, N = grad_y.shape
    act = _ACT[activation]
    grad_y = grad_y.contiguous()
    if act != 0:
        saved = saved.contiguous()
    write_gp = act != 0
    gp = new_output((M, N), grad_y.dtype, grad_y.device) if write_gp else grad_y
    dbias = new_output((N,), grad_y.dtype, grad_y.device)
    if N > 0:  # M == 0 still launches: the loop is empty and dbias is written as zeros
        BLOCK_M, BLOCK_N = _bwd_blocks(N, grad_y.device)
        _act_bias_bwd_kernel[(triton.cdiv(N, BLOCK_N),)](
            grad_y,
            saved if act != 0 else grad_y,
            gp,
            dbias,
            M,
            N,
            ACT=act,
            WRITE_GP=write_gp,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            num_warps=8,
        )
    dx = torch.matmul(gp, weight)
    return dx, dbias
