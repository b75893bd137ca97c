"""BitFit LayerNorm: ``(x - mean) * rstd * gamma + beta`` with gamma frozen.

Forward: one program per row, statistics in fp32 (two-pass mean/variance, no E[x^2]
cancellation). Backward: a grid of a few programs per SM (bounded by the GPU, not by M);
each walks its chunk of rows a row block (up to 32 rows, a tile of about 8192 elements) at
a time, writing dx and accumulating its own fp32 partial column sum of grad_y (= d beta).
A second launch, one program per column block, sums the partial rows in a fixed order
into d beta (deterministic, in x's dtype). d gamma is never computed. The per-program
partial rows follow the Triton LayerNorm tutorial's idea, without its lock-based
accumulation.

Rows that fit one block (N <= 16384) stay in registers; wider rows loop over N in blocks.

Calling convention: see ``unipelt_fast/ops/bias_only_layer_norm.py`` and docs/ops.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from unipelt_fast import _alloc
from unipelt_fast._alloc import new_output, on_input_device
from unipelt_fast._args import BiasOnlyLayerNormArgs

MAX_BLOCK_N = 16384  # widest row kept whole in registers; tests lower it to cover the loop
MAX_BLOCK_M = 32  # most rows per backward row block; tests lower it to cover the row loop
_DBIAS_BLOCK_N = 32  # narrow column blocks: N / 32 programs finish dbias


@triton.jit
def _ln_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,  # (M, N) contiguous
    mean_ptr,
    rstd_ptr,
    N,
    stride_xm,
    stride_xn,
    eps,
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    y_row = y_ptr + row * N
    if SINGLE:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_row + cols.to(tl.int64) * stride_xn, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / N
        d = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (d * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            acc += tl.load(x_row + cols.to(tl.int64) * stride_xn, mask=cols < N, other=0.0).to(
                tl.float32
            )
        mean = tl.sum(acc, axis=0) / N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(x_row + cols.to(tl.int64) * stride_xn, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - mean, 0.0)
            acc += d * d
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(x_row + cols.to(tl.int64) * stride_xn, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * w + b
            tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit(do_not_specialize=["M", "rows_per_prog"])  # row counts vary per batch
def _ln_bwd_kernel(
    dy_ptr,  # (M, N) contiguous
    x_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    part_ptr,  # (num_programs, N) fp32 partial column sums of dy
    M,
    N,
    rows_per_prog,
    stride_xm,
    stride_xn,
    stride_dxm,
    stride_dxn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,
):
    pid = tl.program_id(0)
    row0 = pid * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, M)
    part_row = part_ptr + pid.to(tl.int64) * N
    if SINGLE:
        # Row blocks of BLOCK_M rows at a time: each row's sums reduce along axis 1.
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        xcol = cols.to(tl.int64) * stride_xn
        dxcol = cols.to(tl.int64) * stride_dxn
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(row0, row_end, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            rmask = rows < row_end
            mask = rmask[:, None] & cmask[None, :]
            r = rows.to(tl.int64)[:, None]
            x = tl.load(x_ptr + r * stride_xm + xcol[None, :], mask=mask, other=0.0)
            dy = tl.load(dy_ptr + r * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)[:, None]
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)[:, None]
            xhat = tl.where(mask, (x.to(tl.float32) - mean) * rstd, 0.0)
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=1)[:, None] / N
            c2 = tl.sum(wdy, axis=1)[:, None] / N
            dx = (wdy - (xhat * c1 + c2)) * rstd
            tl.store(
                dx_ptr + r * stride_dxm + dxcol[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask
            )
            db += dy  # masked lanes hold dy = 0
        tl.store(part_row + cols, tl.sum(db, axis=0), mask=cmask)
    else:
        # Wide rows: two sweeps per row (row sums, then dx); this program owns its partial
        # row, so the read-add-write below is race-free and in a fixed order.
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            tl.store(part_row + cols, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=cols < N)
        row0_64 = row0.to(tl.int64)
        for i in range(0, row_end - row0):
            r = row0_64 + i
            mean = tl.load(mean_ptr + r)
            rstd = tl.load(rstd_ptr + r)
            a1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
            a2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(
                    x_ptr + r * stride_xm + cols.to(tl.int64) * stride_xn, mask=mask, other=0.0
                )
                dy = tl.load(dy_ptr + r * N + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x.to(tl.float32) - mean) * rstd, 0.0)
                a1 += xhat * w * dy
                a2 += w * dy
            c1 = tl.sum(a1, axis=0) / N
            c2 = tl.sum(a2, axis=0) / N
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(
                    x_ptr + r * stride_xm + cols.to(tl.int64) * stride_xn, mask=mask, other=0.0
                )
                dy = tl.load(dy_ptr + r * N + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = (x.to(tl.float32) - mean) * rstd
                dx = (w * dy - (xhat * c1 + c2)) * rstd
                tl.store(
                    dx_ptr + r * stride_dxm + cols.to(tl.int64) * stride_dxn,
                    dx.to(dx_ptr.dtype.element_ty),
                    mask=mask,
                )
                p = tl.load(part_row + cols, mask=mask, other=0.0)
                tl.store(part_row + cols, p + dy, mask=mask)


@triton.jit(do_not_specialize=["P"])  # the partial-row count follows M when M is small
def _ln_dbias_kernel(
    part_ptr,  # (P, N) fp32 partial column sums, contiguous
    db_ptr,  # (N,) dbias in x's dtype
    P,
    N,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per column block sums every partial row in a fixed order: deterministic.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows[:, None] < P) & cmask[None, :]
        acc += tl.load(
            part_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0
        )
    tl.store(db_ptr + cols, tl.sum(acc, axis=0).to(db_ptr.dtype.element_ty), mask=cmask)


def _block_n(N: int) -> tuple[int, bool]:
    block = triton.next_power_of_2(max(N, 1))
    if block <= MAX_BLOCK_N:
        return block, True
    return MAX_BLOCK_N, False


def _block_m(block_n: int) -> int:
    """Rows per block in the backward: a tile of about 8192 elements (one row at 16384)."""
    return max(1, min(MAX_BLOCK_M, 8192 // block_n))


def _num_warps(tile: int) -> int:
    return max(1, min(16, tile // 512))


@on_input_device
def forward(a: BiasOnlyLayerNormArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd): y (M, N) contiguous in x's dtype; mean, rstd float32 (M,)."""
    x, weight, bias, eps = a.x, a.weight, a.bias, a.eps
    M, N = x.shape
    y = new_output((M, N), x.dtype, x.device)
    mean = new_output((M,), torch.float32, x.device)
    rstd = new_output((M,), torch.float32, x.device)
    if M > 0:
        block, single = _block_n(N)
        _ln_fwd_kernel[(M,)](
            x,
            weight,
            bias,
            y,
            mean,
            rstd,
            N,
            x.stride(0),
            x.stride(1),
            float(eps),
            BLOCK_N=block,
            SINGLE=single,
            num_warps=_num_warps(block),
        )
    return y, mean, rstd


@on_input_device
def backward(
    a: BiasOnlyLayerNormArgs, grad_y: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dbias): dx in x's dtype and layout (as the op's fake impl promises), dbias in
    x's dtype accumulated in fp32. d gamma is never computed."""
    x, weight = a.x, a.weight
    M, N = x.shape
    grad_y = grad_y.contiguous()
    # empty_like keeps a dense x's layout, matching the registered fake (torch.empty_like).
    dx = torch.empty_like(x)
    if _alloc.NAN_FILL:
        dx.fill_(float("nan"))
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    block, single = _block_n(N)
    block_m = _block_m(block) if single else 1
    # 4 chunks of rows per SM (1 row block at least each): a grid bounded by the GPU, not
    # by M, and few partial rows for the dbias kernel to finish.
    rows_per_prog = triton.cdiv(triton.cdiv(max(M, 1), 4 * sms), block_m) * block_m
    progs = triton.cdiv(M, rows_per_prog)
    part = new_output((progs, N), torch.float32, x.device)
    if M > 0:
        _ln_bwd_kernel[(progs,)](
            grad_y,
            x,
            weight,
            mean,
            rstd,
            dx,
            part,
            M,
            N,
            rows_per_prog,
            x.stride(0),
            x.stride(1),
            dx.stride(0),
            dx.stride(1),
            BLOCK_M=block_m,
            BLOCK_N=block,
            SINGLE=single,
            num_warps=_num_warps(block_m * block),
        )
    dbias = new_output((N,), x.dtype, x.device)
    if N > 0:  # M == 0 still launches: no partial rows, dbias is written as zeros
        db_n = min(_DBIAS_BLOCK_N, triton.next_power_of_2(N))
        db_p = max(1, min(4096 // db_n, triton.next_power_of_2(max(progs, 1))))
        _ln_dbias_kernel[(triton.cdiv(N, db_n),)](part, dbias, progs, N, BLOCK_P=db_p, BLOCK_N=db_n)
    return dx, dbias
