"""BitFit linear: ``act(x @ W.T + b)`` with W frozen; gradients for x and b only.

Forward: the GEMM runs on the vendor GEMM (``torch.addmm``), which adds the bias in its
epilogue for free; one Triton pass then applies the activation. For relu that pass
overwrites the GEMM result in place (nothing else is saved); for gelu/gelu_tanh/silu/tanh
it reads the pre-activation (kept for the backward) and writes y. With no activation there
is no extra pass at all. (A bias-less GEMM plus a Triton bias+activation pass costs one more
full-size write for gelu, and rounds the GEMM result before the bias is added, which flips
relu's sign near zero in fp16 relative to eager.)

Backward: one Triton pass reads grad_y (and the saved pre-activation or y), writes
``grad_pre = grad_y * act'(pre)`` and per-program fp32 column sums; a second stage
(``partials.sum(0)``, fixed order) makes ``dbias``. Then ``dx = grad_pre @ W`` on the vendor
GEMM. No weight gradient is computed or allocated. The partial-sum-then-reduce scheme is the
usual deterministic bias-grad split (as in Liger-Kernel / the Triton LayerNorm tutorial).

Calling convention: see ``unipelt_fast/ops.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from unipelt_fast._alloc import new_output, on_input_device

# activation codes (constexpr in the kernels)
_ACT = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "tanh": 5}
_SAVES_PRE = ("gelu", "gelu_tanh", "silu", "tanh")

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


@triton.jit(do_not_specialize=["M", "rows_per_prog"])  # row counts vary per batch
def _act_bias_bwd_kernel(
    gy_ptr,  # (M, N) contiguous
    s_ptr,  # (M, N) contiguous saved tensor (pre, or y for relu); unused for identity
    gp_ptr,  # (M, N) contiguous grad_pre output; unused when not WRITE_GP
    part_ptr,  # (num_row_chunks, N) fp32 column partial sums
    M,
    N,
    rows_per_prog,  # a multiple of BLOCK_M
    ACT: tl.constexpr,
    WRITE_GP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row0 = pid_m * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, M)
    for start in range(row0, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ACT == 0:
            gp = g
        else:
            s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            gp = _act_grad(g, s, ACT)
        if WRITE_GP:
            gp_lo = gp.to(gp_ptr.dtype.element_ty)
            tl.store(gp_ptr + offs, gp_lo, mask=mask)
        # masked lanes hold g = 0 (and act' finite), so they add nothing
        acc += gp
    tl.store(part_ptr + pid_m * N + cols, tl.sum(acc, axis=0), mask=cmask)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs keep it fast


@on_input_device
def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = act(x @ weight.T + bias), plus pre for gelu/gelu_tanh/silu/tanh (else (0,))."""
    M, N = x.shape[0], weight.shape[0]
    act = _ACT[activation]
    pre = new_output((M, N), x.dtype, x.device)
    # Vendor GEMM with the bias in its epilogue (cuBLASLt): the pre-activation is rounded
    # once, exactly as in eager F.linear, so act'(pre) and relu's sign agree with eager.
    torch.addmm(bias, x, weight.t(), out=pre)
    if act == 0:
        return pre, x.new_empty((0,))
    save_pre = activation in _SAVES_PRE
    y = new_output((M, N), x.dtype, x.device) if save_pre else pre  # relu: in place
    numel = M * N
    if numel > 0:
        BLOCK = 4096
        _act_fwd_kernel[(triton.cdiv(numel, BLOCK),)](pre, y, numel, ACT=act, BLOCK=BLOCK)
    return y, (pre if save_pre else x.new_empty((0,)))


@on_input_device
def backward(
    grad_y: torch.Tensor, weight: torch.Tensor, saved: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dbias): grad_pre = grad_y * act'(pre) and its column sums in one pass, then
    dx = grad_pre @ weight. dbias is in grad_y's dtype, accumulated in fp32."""
    M, N = grad_y.shape
    act = _ACT[activation]
    grad_y = grad_y.contiguous()
    if act != 0:
        saved = saved.contiguous()
    write_gp = act != 0
    gp = new_output((M, N), grad_y.dtype, grad_y.device) if write_gp else grad_y
    BLOCK_N = min(128, triton.next_power_of_2(max(N, 1)))
    BLOCK_M = max(1, min(4096 // BLOCK_N, 32, triton.next_power_of_2(max(M, 1))))
    n_col = triton.cdiv(N, BLOCK_N)
    # Enough row chunks to fill the GPU, few enough that the partials stay small.
    row_tiles = triton.cdiv(M, BLOCK_M)
    chunks = max(1, min(row_tiles, triton.cdiv(8 * _num_sms(grad_y.device), max(n_col, 1))))
    rows_per_prog = triton.cdiv(row_tiles, chunks) * BLOCK_M
    chunks = triton.cdiv(M, rows_per_prog) if M > 0 else 0
    part = new_output((chunks, N), torch.float32, grad_y.device)
    if M > 0 and N > 0:
        _act_bias_bwd_kernel[(chunks, n_col)](
            grad_y,
            saved if act != 0 else grad_y,
            gp,
            part,
            M,
            N,
            rows_per_prog,
            ACT=act,
            WRITE_GP=write_gp,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
        )
    dbias = part.sum(0).to(grad_y.dtype)  # second stage: fixed-order, deterministic
    dx = torch.matmul(gp, weight)
    return dx, dbias
