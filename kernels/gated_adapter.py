"""Fused gated bottleneck adapter: ``residual + g * scaling * (act(x @ Wd.T + bd) @ Wu.T + bu)``.

Calling convention: ``forward(a)``/``backward(a, ...)`` with ``a`` the op's argument record;
see ``unipelt_fast/ops/gated_adapter.py`` and docs/ops.md.

Forward. One program per block of BM rows (64-128 on a GPU, autotuned: each program streams
all of Wd and Wu from L2, so larger row blocks read them fewer times). Walk 1 over d builds
the bottleneck z = x @ Wd.T + bd (BM x r, in registers) and the gate logit s = x . w_gate +
b_gate from the same x tiles (a row reduction beside the tl.dot, so r = 64 is not padded to
128 for one extra column); walk 2 over d, last chunk first (the chunks of x walk 1 read
last are the likeliest still in L2 when re-read as the residual), writes
``residual + G * (act(z) @ Wu.T + bu)`` with G = g * scaling. No gate or the "token" gate:
one launch. "mean" gate: launch 1 writes z (M x r) and s (M,); launch 2 (row blocks within
one example) takes the example's mean of sigmoid(s) from its (L,) logits and reads z back
instead of x. Mixed tasks (adapter_index) use the same per-example row blocks.

Backward (only z and s are saved besides the inputs), three launches, no torch ops:
  rows kernel   (row blocks):  t = dY @ Wu, dg = scaling * (sum_r t*h + dY . bu) from fp32
                               z and h = act(z); writes h and dz = G * t * act'(z) in the
                               compute dtype, G (M,), ds (token) or ds / dgb ("mean": the
                               per-row factor, plus a per-block sum of dg), and db_down
                               partials (fp32, per row block)
  cols kernel   (d chunks x row splits, the splits sized so the grid is whole waves; the
                 weight-gradient idea of Liger-Kernel/FlashAttention: tile the reduction dim
                 per program, write partials, sum them after):
                               dx = dz @ Wd + ds w_gate (+ dY), dWu += (G dY)^T h,
                               dbu += sum G dY, dWd^T += x^T dz, dw_gate += x^T ds,
                               db_gate += sum ds
  finish kernel:               sums every partial in a fixed order (per task with
                               adapter_index) and casts: deterministic, no atomics.
  Full-size traffic: dY read twice, x read once, dx written once.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from unipelt_fast import _autotune
from unipelt_fast._alloc import new_output, on_input_device
from unipelt_fast._args import GatedAdapterArgs

Tensor = torch.Tensor

_ACT = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "tanh": 5}
_GATE_NONE, _GATE_TOKEN, _GATE_MEAN = 0, 1, 2
# Literal constants inside the kernels (1/sqrt(2), 1/sqrt(2 pi), sqrt(2/pi)): compiled triton
# rejects non-constexpr globals.


@triton.jit
def _tanh(u):
    # tl has no portable tanh across triton 3.2..3.9 (it moved to libdevice); this is exact math.
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:
        y = tl.maximum(z, 0.0)
    elif ACT == 2:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        y = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 4:
        y = z * tl.sigmoid(z)
    elif ACT == 5:
        y = _tanh(z)
    else:
        y = z
    return y


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 1:
        dy = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        dy = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(
            -0.5 * z * z
        )
    elif ACT == 3:
        th = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        dy = 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * 0.7978845608028654 * (
            1.0 + 0.134145 * z * z
        )
    elif ACT == 4:
        sg = tl.sigmoid(z)
        dy = sg * (1.0 + z * (1.0 - sg))
    elif ACT == 5:
        th = _tanh(z)
        dy = 1.0 - th * th
    else:
        dy = tl.zeros_like(z) + 1.0
    return dy


@triton.jit
def _row_block(pid, M, L, BM: tl.constexpr, EX_ROWS: tl.constexpr):
    """Row block ``pid``: (its example, rows, row mask). Consecutive rows, or with EX_ROWS
    (mixed tasks, the "mean" gate) the blocks of one example: a block never straddles two,
    so one task and one mean gate serve it."""
    if EX_ROWS:
        n_lb = tl.cdiv(L, BM)
        ex = pid // n_lb
        lrow = (pid - ex * n_lb) * BM + tl.arange(0, BM)
        return ex, ex.to(tl.int64) * L + lrow, lrow < L
    rows = pid * BM + tl.arange(0, BM)
    return pid * 0, rows.to(tl.int64), rows < M


@triton.jit
def _task_of(idx_ptr, ex, T):
    # clamped to [0, T): an out-of-range index never reads out of bounds
    task = tl.load(idx_ptr + ex).to(tl.int64)
    return tl.minimum(tl.maximum(task, 0), T - 1)


@triton.jit
def _mean_gate(s_ptr, gm_ptr, ex, L, smb, sml, HAS_MASK: tl.constexpr, BL: tl.constexpr):
    """Example ``ex``'s "mean" gate from its (L,) logits: (mean of sigmoid(s) over its real
    tokens, their count clamped to >= 1; an example with none gets g = 0)."""
    acc = tl.zeros((BL,), dtype=tl.float32)
    cnt = tl.zeros((BL,), dtype=tl.float32)
    ex64 = ex.to(tl.int64)
    for l0 in range(0, L, BL):
        ls = l0 + tl.arange(0, BL)
        keep = ls < L
        sig = tl.sigmoid(tl.load(s_ptr + ex64 * L + ls, mask=keep, other=0.0))
        if HAS_MASK:
            keep = keep & (tl.load(gm_ptr + ex64 * smb + ls * sml, mask=keep, other=0) != 0)
        # where, not sig * mask: a NaN in an excluded token must not reach the mean
        acc += tl.where(keep, sig, 0.0)
        cnt += tl.where(keep, 1.0, 0.0)
    count = tl.maximum(tl.sum(cnt, axis=0), 1.0)
    return tl.sum(acc, axis=0) / count, count


@triton.jit(do_not_specialize=["M", "L"])  # row counts vary per batch
def _ga_fwd_kernel(
    x_ptr, res_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, wg_ptr, bg_ptr, gm_ptr,
    out_ptr, z_ptr, s_ptr, idx_ptr,
    M, L, D, D_OUT, R, T, scaling,
    sxb, sxl, sxd, srb, srl, srd,
    swd_r, swd_d, swu_d, swu_r, swg,
    swd_t, swu_t, swg_t, smb, sml,
    ACT: tl.constexpr, GATE: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr,
    HAS_BG: tl.constexpr, HAS_MASK: tl.constexpr, SEP_RES: tl.constexpr,
    LOAD_Z: tl.constexpr, STORE_OUT: tl.constexpr, EX_ROWS: tl.constexpr,
    HAS_IDX: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, RP: tl.constexpr,
    BL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    ex, rows64, rmask = _row_block(tl.program_id(0), M, L, BM, EX_ROWS)
    if HAS_IDX:  # mixed tasks: one task's weights per block
        task = _task_of(idx_ptr, ex, T)
        wd_ptr += task * swd_t
        wu_ptr += task * swu_t
        wg_ptr += task * swg_t
        bd_ptr += task * R  # stacked biases arrive contiguous (T, r), (T, d), (T, 1)
        bu_ptr += task * D_OUT
        bg_ptr += task
    b = rows64 // L
    l = rows64 - b * L
    x_row = b * sxb + l * sxl  # any (B, L, d) strides: no copy of x
    ks = tl.arange(0, RP)
    kmask = ks < R
    z_offs = rows64[:, None] * R + ks[None, :]
    z_mask = rmask[:, None] & kmask[None, :]

    if LOAD_Z:  # second launch of the "mean" gate: the bottleneck is already in memory
        z = tl.load(z_ptr + z_offs, mask=z_mask, other=0.0)
    else:
        acc = tl.zeros((BM, RP), dtype=tl.float32)
        s_acc = tl.zeros((BM,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            cmask = cols < D
            cols64 = cols.to(tl.int64)
            xt = tl.load(
                x_ptr + x_row[:, None] + cols64[None, :] * sxd,
                mask=rmask[:, None] & cmask[None, :],
                other=0.0,
            )
            wt = tl.load(  # Wd^T chunk (BD, RP)
                wd_ptr + ks[None, :] * swd_r + cols64[:, None] * swd_d,
                mask=cmask[:, None] & kmask[None, :],
                other=0.0,
            )
            acc = tl.dot(xt, wt, acc=acc, input_precision=PREC)
            if GATE != 0:  # the gate logit from the same x tile
                wg = tl.load(wg_ptr + cols64 * swg, mask=cmask, other=0.0).to(tl.float32)
                s_acc += tl.sum(xt.to(tl.float32) * wg[None, :], axis=1)
        if HAS_BD:
            acc += tl.load(bd_ptr + ks, mask=kmask, other=0.0).to(tl.float32)[None, :]
        z = acc
        tl.store(z_ptr + z_offs, z, mask=z_mask)
        if GATE != 0:
            s = s_acc
            if HAS_BG:
                s += tl.load(bg_ptr).to(tl.float32)
            tl.store(s_ptr + rows64, s, mask=rmask)

    if STORE_OUT:
        if GATE == 1:
            G = tl.sigmoid(s) * scaling
        elif GATE == 2:
            g, _ = _mean_gate(s_ptr, gm_ptr, ex, L, smb, sml, HAS_MASK, BL)
            G = tl.zeros((BM,), dtype=tl.float32) + g * scaling
        else:
            G = tl.zeros((BM,), dtype=tl.float32) + scaling
        h = tl.where(kmask[None, :], _act(z, ACT), 0.0)
        hc = h.to(out_ptr.dtype.element_ty)
        if SEP_RES:
            r_row = b * srb + l * srl
        n_chunks = tl.cdiv(D_OUT, BD)
        for i in range(0, n_chunks):  # output width D_OUT (== D when the residual is x)
            d0 = (n_chunks - 1 - i) * BD  # last chunk first: walk 1 read it last (L2)
            cols = d0 + tl.arange(0, BD)
            cmask = cols < D_OUT
            cols64 = cols.to(tl.int64)
            m2 = rmask[:, None] & cmask[None, :]
            wut = tl.load(  # Wu^T chunk (RP, BD)
                wu_ptr + cols64[None, :] * swu_d + ks[:, None] * swu_r,
                mask=kmask[:, None] & cmask[None, :],
                other=0.0,
            )
            u = tl.dot(hc, wut, input_precision=PREC)
            if HAS_BU:
                u += tl.load(bu_ptr + cols64, mask=cmask, other=0.0).to(tl.float32)[None, :]
            if SEP_RES:
                res = tl.load(res_ptr + r_row[:, None] + cols64[None, :] * srd, mask=m2, other=0.0)
            else:
                res = tl.load(x_ptr + x_row[:, None] + cols64[None, :] * sxd, mask=m2, other=0.0)
            o = res.to(tl.float32) + G[:, None] * u
            tl.store(
                out_ptr + rows64[:, None] * D_OUT + cols64[None, :],
                o.to(out_ptr.dtype.element_ty),
                mask=m2,
            )


@triton.jit(do_not_specialize=["M", "L"])  # row counts vary per batch
def _ga_bwd_rows_kernel(
    dy_ptr, z_ptr, s_ptr, gm_ptr, wu_ptr, bu_ptr,
    h_ptr, dz_ptr, gv_ptr, dsq_ptr, pdg_ptr, pbd_ptr, idx_ptr,
    M, L, D_OUT, R, T, scaling, swu_d, swu_r, swu_t, smb, sml,
    ACT: tl.constexpr, GATE: tl.constexpr, HAS_BU: tl.constexpr, HAS_BD: tl.constexpr,
    HAS_MASK: tl.constexpr, EX_ROWS: tl.constexpr, HAS_IDX: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, RP: tl.constexpr, BL: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    ex, rows64, rmask = _row_block(pid, M, L, BM, EX_ROWS)
    if HAS_IDX:
        task = _task_of(idx_ptr, ex, T)
        wu_ptr += task * swu_t
        bu_ptr += task * D_OUT
    ks = tl.arange(0, RP)
    kmask = ks < R
    z_offs = rows64[:, None] * R + ks[None, :]
    z_mask = rmask[:, None] & kmask[None, :]
    z = tl.load(z_ptr + z_offs, mask=z_mask, other=0.0)

    t = tl.zeros((BM, RP), dtype=tl.float32)
    dyb = tl.zeros((BM,), dtype=tl.float32)
    for d0 in range(0, D_OUT, BD):
        cols = d0 + tl.arange(0, BD)
        cmask = cols < D_OUT
        cols64 = cols.to(tl.int64)
        dyt = tl.load(
            dy_ptr + rows64[:, None] * D_OUT + cols64[None, :],
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        )
        wut = tl.load(  # Wu chunk (BD, RP)
            wu_ptr + cols64[:, None] * swu_d + ks[None, :] * swu_r,
            mask=cmask[:, None] & kmask[None, :],
            other=0.0,
        )
        t = tl.dot(dyt, wut, acc=t, input_precision=PREC)
        if GATE != 0 and HAS_BU:
            bu = tl.load(bu_ptr + cols64, mask=cmask, other=0.0).to(tl.float32)
            dyb += tl.sum(dyt.to(tl.float32) * bu[None, :], axis=1)

    if GATE == 1:
        sig = tl.sigmoid(tl.load(s_ptr + rows64, mask=rmask, other=0.0))
        G = sig * scaling
    elif GATE == 2:
        g, count = _mean_gate(s_ptr, gm_ptr, ex, L, smb, sml, HAS_MASK, BL)
        G = tl.zeros((BM,), dtype=tl.float32) + g * scaling
    else:
        G = tl.zeros((BM,), dtype=tl.float32) + scaling
    dz = tl.where(z_mask, G[:, None] * t * _act_grad(z, ACT), 0.0)
    h = tl.where(kmask[None, :], _act(z, ACT), 0.0)
    dt = h_ptr.dtype.element_ty  # the cols kernel's dots take these in the compute dtype
    tl.store(h_ptr + z_offs, h.to(dt), mask=z_mask)
    tl.store(dz_ptr + z_offs, dz.to(dt), mask=z_mask)
    if HAS_BD:  # db_down from fp32 dz, before the rounding
        tl.store(pbd_ptr + pid.to(tl.int64) * R + ks, tl.sum(dz, axis=0), mask=kmask)
    if GATE != 0:
        # The gate gradient's dot nearly cancels (sum_r t*h against dY . bu, both large), so
        # h comes from the saved fp32 z here, never from the rounded copy written above.
        dg = scaling * (tl.sum(t * h, axis=1) + dyb)
        tl.store(gv_ptr + rows64, G, mask=rmask)
        if GATE == 1:  # d logit
            tl.store(dsq_ptr + rows64, dg * sig * (1.0 - sig), mask=rmask)
        else:  # d logit = (sum of the example's dg) * q, q from this row: the cols kernel
            sig = tl.sigmoid(tl.load(s_ptr + rows64, mask=rmask, other=0.0))
            keep = rmask
            if HAS_MASK:
                b = rows64 // L
                gm = tl.load(gm_ptr + b * smb + (rows64 - b * L) * sml, mask=rmask, other=0)
                keep = keep & (gm != 0)
            tl.store(dsq_ptr + rows64, tl.where(keep, sig * (1.0 - sig) / count, 0.0), mask=rmask)
            tl.store(pdg_ptr + pid, tl.sum(tl.where(rmask, dg, 0.0), axis=0))


@triton.jit(do_not_specialize=["M", "L", "blocks_per_split", "n_blocks", "n_lb_rows"])
def _ga_bwd_cols_kernel(
    dy_ptr, x_ptr, h_ptr, dz_ptr, gv_ptr, dsq_ptr, pdg_ptr, wd_ptr, wg_ptr,
    dx_ptr, part_ptr, idx_ptr,
    M, L, D, D_OUT, R, T, NT, off_bu, off_wg, off_bg, blocks_per_split, n_blocks, n_lb_rows,
    scaling, sxb, sxl, sxd, swd_r, swd_d, swg, swd_t, swg_t,
    GATE: tl.constexpr, HAS_BU: tl.constexpr, HAS_BG: tl.constexpr,
    RES_IS_X: tl.constexpr, EX_ROWS: tl.constexpr, HAS_IDX: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, RP: tl.constexpr, NLB: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)  # fastest axis: concurrent programs share row blocks (L2 reuse)
    pid_s = tl.program_id(1)  # a split of the row blocks; with HAS_IDX one example
    if HAS_IDX:
        task = _task_of(idx_ptr, pid_s, T)
        wd_ptr += task * swd_t
        wg_ptr += task * swg_t
    cols = pid_d * BD + tl.arange(0, BD)  # input cols (x, Wd, w_gate) and output cols (dY, Wu)
    cmask = cols < D
    omask = cols < D_OUT
    cols64 = cols.to(tl.int64)
    ks = tl.arange(0, RP)
    kmask = ks < R
    dt = dx_ptr.dtype.element_ty
    wdt = tl.load(  # Wd chunk (RP, BD), reused for every row block
        wd_ptr + ks[:, None] * swd_r + cols64[None, :] * swd_d,
        mask=kmask[:, None] & cmask[None, :],
        other=0.0,
    )
    if GATE != 0:
        wg = tl.load(wg_ptr + cols64 * swg, mask=cmask, other=0.0).to(tl.float32)
        acc_wg = tl.zeros((BD,), dtype=tl.float32)
        acc_bg = tl.sum(tl.zeros((BM,), dtype=tl.float32), axis=0)
    acc_wu = tl.zeros((BD, RP), dtype=tl.float32)
    acc_wd = tl.zeros((BD, RP), dtype=tl.float32)
    acc_bu = tl.zeros((BD,), dtype=tl.float32)

    for i in range(0, blocks_per_split):
        blk = pid_s * blocks_per_split + i
        ex, rows64, rmask = _row_block(blk, M, L, BM, EX_ROWS)
        rmask = rmask & ((rows64 * 0 + blk) < n_blocks)  # the last split's tail
        b = rows64 // L
        l = rows64 - b * L
        m2 = rmask[:, None] & cmask[None, :]
        z_offs = rows64[:, None] * R + ks[None, :]
        z_mask = rmask[:, None] & kmask[None, :]
        dyt = tl.load(
            dy_ptr + rows64[:, None] * D_OUT + cols64[None, :],
            mask=rmask[:, None] & omask[None, :],
            other=0.0,
        )
        xt = tl.load(
            x_ptr + (b * sxb + l * sxl)[:, None] + cols64[None, :] * sxd, mask=m2, other=0.0
        )
        h = tl.load(h_ptr + z_offs, mask=z_mask, other=0.0)
        dz = tl.load(dz_ptr + z_offs, mask=z_mask, other=0.0)
        if GATE != 0:
            G = tl.load(gv_ptr + rows64, mask=rmask, other=0.0)
        else:
            G = tl.zeros((BM,), dtype=tl.float32) + scaling
        gdy = dyt.to(tl.float32) * G[:, None]
        acc_wu = tl.dot(tl.trans(gdy.to(dt)), h, acc=acc_wu, input_precision=PREC)
        if HAS_BU:
            acc_bu += tl.sum(gdy, axis=0)
        acc_wd = tl.dot(tl.trans(xt), dz, acc=acc_wd, input_precision=PREC)
        dx = tl.dot(dz, wdt, input_precision=PREC)
        if GATE != 0:
            ds = tl.load(dsq_ptr + rows64, mask=rmask, other=0.0)
            if GATE == 2:  # times the example's sum of dg, from the rows kernel's block sums
                dgb = tl.zeros((NLB,), dtype=tl.float32)
                for j0 in range(0, n_lb_rows, NLB):
                    js = j0 + tl.arange(0, NLB)
                    dgb += tl.load(
                        pdg_ptr + ex.to(tl.int64) * n_lb_rows + js,
                        mask=(js < n_lb_rows) & ((js * 0 + blk) < n_blocks),
                        other=0.0,
                    )
                ds = ds * tl.sum(dgb, axis=0)
            dx += ds[:, None] * wg[None, :]
            acc_wg += tl.sum(xt.to(tl.float32) * ds[:, None], axis=0)
            acc_bg += tl.sum(ds, axis=0)
        if RES_IS_X:
            dx += dyt.to(tl.float32)
        tl.store(dx_ptr + rows64[:, None] * D + cols64[None, :], dx.to(dt), mask=m2)

    # This split's partials, one (NT,) row: [dWu (D_OUT, R) | dWd (R, D) | dbu | dw_gate | db_gate]
    part = part_ptr + pid_s.to(tl.int64) * NT
    tl.store(part + cols64[:, None] * R + ks[None, :], acc_wu, mask=omask[:, None] & kmask[None, :])
    tl.store(
        part + D_OUT * R + ks[None, :] * D + cols64[:, None],
        acc_wd,
        mask=cmask[:, None] & kmask[None, :],
    )
    if HAS_BU:
        tl.store(part + off_bu + cols64, acc_bu, mask=omask)
    if GATE != 0:
        tl.store(part + off_wg + cols64, acc_wg, mask=cmask)
        if HAS_BG:
            if pid_d == 0:
                tl.store(part + off_bg, acc_bg)


@triton.jit
def _seg_store(out_ptr, acc, offs, mask, lo, hi, t):
    """Store the part of ``acc`` (flat offsets ``offs``) that falls in [lo, hi) into task
    ``t``'s row of a contiguous (T, hi - lo) output."""
    sel = mask & (offs >= lo) & (offs < hi)
    tl.store(out_ptr + t.to(tl.int64) * (hi - lo) + (offs - lo), acc, mask=sel)


@triton.jit(do_not_specialize=["S", "S_BD", "LB_BD"])
def _ga_finish_kernel(
    part_ptr, pbd_ptr, idx_ptr, dwu_ptr, dwd_ptr, dbu_ptr, dwg_ptr, dbg_ptr, dbd_ptr,
    S, NT, S_BD, LB_BD, R, off_wd, off_bu, off_wg, off_bg, n_main,
    HAS_IDX: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Every weight gradient: the column partials (S, NT) summed over the splits, db_down's
    (S_BD, R) over the rows kernel's blocks, in increasing order (bit-reproducible), per
    task with HAS_IDX (split s is example s; block j of db_down example j // LB_BD), cast
    to the output dtype."""
    pid = tl.program_id(0)
    t = tl.program_id(1)
    T = tl.num_programs(1)
    if pid < n_main:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < NT
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        ptrs = part_ptr + offs  # advanced by NT per split: 64-bit pointer arithmetic
        for s in range(0, S):
            if HAS_IDX:
                sel = (tl.zeros((BLOCK,), tl.int64) + _task_of(idx_ptr, s, T)) == t
                acc += tl.load(ptrs, mask=mask & sel, other=0.0)
            else:
                acc += tl.load(ptrs, mask=mask, other=0.0)
            ptrs += NT
        grad = acc.to(dwu_ptr.dtype.element_ty)
        _seg_store(dwu_ptr, grad, offs, mask, 0, off_wd, t)
        _seg_store(dwd_ptr, grad, offs, mask, off_wd, off_bu, t)
        _seg_store(dbu_ptr, grad, offs, mask, off_bu, off_wg, t)
        _seg_store(dwg_ptr, grad, offs, mask, off_wg, off_bg, t)
        _seg_store(dbg_ptr, grad, offs, mask, off_bg, NT, t)
    else:
        offs = (pid - n_main) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < R
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        ptrs = pbd_ptr + offs
        for j in range(0, S_BD):
            if HAS_IDX:
                sel = (tl.zeros((BLOCK,), tl.int64) + _task_of(idx_ptr, j // LB_BD, T)) == t
                acc += tl.load(ptrs, mask=mask & sel, other=0.0)
            else:
                acc += tl.load(ptrs, mask=mask, other=0.0)
            ptrs += R
        tl.store(dbd_ptr + t.to(tl.int64) * R + offs, acc.to(dbd_ptr.dtype.element_ty), mask=mask)


# ---- launchers -----------------------------------------------------------------------------


def _prec(dtype: torch.dtype) -> str | None:
    # fp32 must not silently drop to tf32 (2e-4 parity); "ieee" is accepted by triton >= 3.0.
    return "ieee" if dtype == torch.float32 else None


def _rpad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # every tl.dot dim >= 16 on GPU


def _interpreting(t: Tensor) -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" or t.device.type != "cuda"


def _gpu_blocks(t: Tensor) -> bool:
    """GPU block sizes, or small ones under the interpreter (fast, and small shapes still
    span several blocks) unless UNIPELT_GPU_CONFIGS=1 asks for the GPU's there too (tests)."""
    return not _interpreting(t) or os.environ.get("UNIPELT_GPU_CONFIGS") == "1"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter; ``unipelt-fast resources`` patches in an H100's count


# Block sizes: untimed (no GPU in this session), chosen from the sm_80/sm_90 cubins of these
# kernels (``unipelt-fast resources``, d = 4096, r in 16/64/256): no register spills in
# fp16/bf16 for any candidate; fp32 (IEEE dots on FMA units) at most ~90 bytes (forward) and
# 8 bytes (column kernel). BL: the "mean" gate's walk over an example's logits;
# NLB: the walk over its rows-kernel block sums of dg.
BL, NLB, FINISH_BLOCK = 256, 64, 1024


def fwd_configs(dtype: torch.dtype, rp: int) -> list[tuple[int, int, int, int]]:
    """Forward candidates (BM, BD, num_warps, num_stages), the default first: row blocks of
    64-128 so that every program's read of Wd and Wu from L2 serves that many rows."""
    if dtype == torch.float32:
        if rp <= 64:
            return [(64, 32, 8, 1), (64, 32, 4, 2)]
        return [(64, 16, 8, 1), (64, 32, 8, 1)]
    if rp <= 64:
        wide = [(64, 128, 4, 3)] if rp > 16 else []  # spills at r = 16 (sm_80)
        return [(64, 64, 4, 3), *wide, (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 8, 4)]
    return [(64, 64, 8, 3), (64, 32, 8, 3), (64, 64, 8, 2)]


def rows_config(dtype: torch.dtype, rp: int) -> tuple[int, int, int]:
    """Backward rows kernel (BM, BD, num_warps)."""
    if dtype == torch.float32:
        return (32, 32, 4) if rp <= 64 else (32, 16, 8)
    return (64, 64, 4) if rp <= 64 else (32, 32, 8)


def cols_config(dtype: torch.dtype, rp: int) -> tuple[int, int, int, int, int]:
    """Backward column kernel (BM, BD, num_warps, num_stages, resident programs per SM):
    the grid is sized to whole waves of that many programs per SM. fp32: one stage (the
    pipelined loads spilled 2-8 KB)."""
    if dtype == torch.float32:
        return (32, 32, 8, 1, 2) if rp <= 64 else (16, 16, 8, 1, 2)
    return (32, 64, 8, 3, 1) if rp <= 64 else (16, 32, 8, 3, 1)


def _clamp(n: int, block: int) -> int:
    return min(block, max(16, triton.next_power_of_2(n)))


def _contig(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _mask_args(gate_mask: Tensor | None, dummy: Tensor) -> tuple[Tensor, int, int]:
    if gate_mask is None:
        return dummy, 0, 0
    gm = gate_mask.view(torch.uint8)  # bool -> bytes, no copy
    return gm, gm.stride(0), gm.stride(1)


@on_input_device
def forward(a: GatedAdapterArgs) -> tuple[Tensor, Tensor, Tensor]:
    """(out, z, s) for canonical arguments (the contract: unipelt_fast/ops/gated_adapter.py)."""
    x, w_down, b_down, w_up, b_up = a.x, a.w_down, a.b_down, a.w_up, a.b_up
    residual, w_gate, b_gate, gate_mode = a.residual, a.w_gate, a.b_gate, a.gate_mode
    gate_mask, activation, scaling, adapter_index = a.gate_mask, a.activation, a.scaling, a.adapter_index
    B, L, D = x.shape
    R = w_down.shape[-2]
    M = B * L
    dev, dt = x.device, x.dtype
    D_OUT = w_up.shape[-2]  # output width: D unless a separate residual says otherwise
    mixed = adapter_index is not None
    if mixed:
        b_down, b_up, b_gate = _contig(b_down), _contig(b_up), _contig(b_gate)
    out = new_output((B, L, D_OUT), dt, dev)
    z = new_output((M, R), torch.float32, dev)
    has_gate = w_gate is not None
    s = new_output((M if has_gate else 0,), torch.float32, dev)
    if M == 0:
        return out, z, s
    mean = has_gate and gate_mode == "mean"
    ex_rows = mixed or mean  # row blocks within one example
    rp = _rpad(R)
    res = x if residual is None else residual
    dummy = z  # never read: its flag is off
    gm, smb, sml = _mask_args(gate_mask if mean else None, dummy)
    common = dict(
        M=M, L=L, D=D, D_OUT=D_OUT, R=R, T=w_down.shape[0] if mixed else 1, scaling=float(scaling),
        sxb=x.stride(0), sxl=x.stride(1), sxd=x.stride(2),
        srb=res.stride(0), srl=res.stride(1), srd=res.stride(2),
        swd_r=w_down.stride(-2), swd_d=w_down.stride(-1),
        swu_d=w_up.stride(-2), swu_r=w_up.stride(-1),
        swg=w_gate.stride(-1) if has_gate else 0,
        swd_t=w_down.stride(0) if mixed else 0, swu_t=w_up.stride(0) if mixed else 0,
        swg_t=w_gate.stride(0) if mixed and has_gate else 0, smb=smb, sml=sml,
        ACT=_ACT[activation], HAS_BD=b_down is not None, HAS_BU=b_up is not None,
        HAS_BG=b_gate is not None, HAS_MASK=mean and gate_mask is not None,
        SEP_RES=residual is not None, EX_ROWS=ex_rows, HAS_IDX=mixed, RP=rp, PREC=_prec(dt),
    )  # fmt: skip
    ptrs = (
        x, res, w_down, dummy if b_down is None else b_down, w_up,
        dummy if b_up is None else b_up, w_gate if has_gate else dummy,
        dummy if b_gate is None else b_gate, gm,
    )  # fmt: skip
    idx = adapter_index if mixed else dummy
    n_rows = L if ex_rows else M
    width = max(D, D_OUT)
    if _gpu_blocks(x):
        configs, bl = fwd_configs(dt, rp), BL
    else:
        configs, bl = [(16, 32, 1, 1)], 16
    configs = list(
        dict.fromkeys((_clamp(n_rows, c[0]), _clamp(width, c[1]), *c[2:]) for c in configs)
    )
    if _interpreting(x):
        configs = configs[:1]  # nothing to time

    def launch(cfg: tuple[int, int, int, int]) -> None:
        bm, bd, warps, stages = cfg
        grid = (B * triton.cdiv(L, bm),) if ex_rows else (triton.cdiv(M, bm),)
        kw = dict(common, BM=bm, BD=bd, BL=bl, num_warps=warps, num_stages=stages)
        if not mean:
            gate = _GATE_TOKEN if has_gate else _GATE_NONE
            _ga_fwd_kernel[grid](
                *ptrs, out, z, s, idx, GATE=gate, LOAD_Z=False, STORE_OUT=True, **kw
            )
            return
        # "mean": z and s first; then each block takes its example's mean and reads z back.
        _ga_fwd_kernel[grid](
            *ptrs, out, z, s, idx, GATE=_GATE_TOKEN, LOAD_Z=False, STORE_OUT=False, **kw
        )
        _ga_fwd_kernel[grid](
            *ptrs, out, z, s, idx, GATE=_GATE_MEAN, LOAD_Z=True, STORE_OUT=True, **kw
        )

    key = (dt, D, D_OUT, R, gate_mode if has_gate else None, activation, mixed,
           residual is not None, b_down is not None, b_up is not None, tuple(configs))  # fmt: skip
    launch(_autotune.choose("gated_adapter.forward", key, configs, launch))
    return out, z, s


@on_input_device
def backward(
    a: GatedAdapterArgs, grad_out: Tensor, z: Tensor, s: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dw_down, db_down, dw_up, db_up, dw_gate, db_gate) (the contract:
    unipelt_fast/ops/gated_adapter.py); a.residual is None when the residual was x."""
    x, w_down, b_down, w_up, b_up = a.x, a.w_down, a.b_down, a.w_up, a.b_up
    w_gate, b_gate, gate_mode, gate_mask = a.w_gate, a.b_gate, a.gate_mode, a.gate_mask
    activation, scaling, adapter_index = a.activation, a.scaling, a.adapter_index
    residual_is_x = a.residual is None
    B, L, D = x.shape
    R = w_down.shape[-2]
    D_OUT = w_up.shape[-2]
    M = B * L
    dev, dt = x.device, x.dtype
    mixed = adapter_index is not None
    T = w_down.shape[0] if mixed else 1
    if mixed:
        b_up = _contig(b_up)
    has_gate = w_gate is not None
    mean = has_gate and gate_mode == "mean"
    ex_rows = mixed or mean
    scaling = float(scaling)
    lead = (T,) if mixed else ()
    dwu = new_output(w_up.shape, dt, dev)
    dwd = new_output(w_down.shape, dt, dev)
    dbd = None if b_down is None else new_output((*lead, R), dt, dev)
    dbu = None if b_up is None else new_output((*lead, D_OUT), dt, dev)
    dwg = None if not has_gate else new_output((*lead, 1, D), dt, dev)
    dbg = None if b_gate is None else new_output((*lead, 1), dt, dev)
    if M == 0:
        for g in (dwu, dwd, dbd, dbu, dwg, dbg):
            if g is not None:
                g.zero_()
        return new_output((B, L, D), dt, dev), dwd, dbd, dwu, dbu, dwg, dbg

    rp = _rpad(R)
    prec = _prec(dt)
    gpu = _gpu_blocks(x)
    n_rows = L if ex_rows else M
    if gpu:
        (bm, bd, warps), bl, nlb, fblock = rows_config(dt, rp), BL, NLB, FINISH_BLOCK
        cbm, cbd, cwarps, cstages, ctas = cols_config(dt, rp)
    else:
        (bm, bd, warps), bl, nlb, fblock = (16, 32, 1), 16, 16, 128
        cbm, cbd, cwarps, cstages, ctas = 16, 32, 1, 1, 1
    dummy = z
    gm, smb, sml = _mask_args(gate_mask if mean else None, dummy)
    idx = adapter_index if mixed else dummy

    # 1. rows: h and dz (compute dtype), G and the gate's d logit factor (M,), block sums.
    bm, bd = _clamp(n_rows, bm), _clamp(D_OUT, bd)
    n_lb = triton.cdiv(L, bm)
    n_rb = B * n_lb if ex_rows else triton.cdiv(M, bm)
    h = new_output((M, R), dt, dev)
    dz = new_output((M, R), dt, dev)
    gv = new_output((M if has_gate else 0,), torch.float32, dev)
    dsq = new_output((M if has_gate else 0,), torch.float32, dev)
    pdg = new_output((n_rb if mean else 0,), torch.float32, dev)
    pbd = new_output((n_rb, R) if b_down is not None else (0,), torch.float32, dev)
    _ga_bwd_rows_kernel[(n_rb,)](
        grad_out, z, s if has_gate else dummy, gm, w_up, dummy if b_up is None else b_up,
        h, dz, gv, dsq, pdg, pbd, idx,
        M, L, D_OUT, R, T, scaling, w_up.stride(-2), w_up.stride(-1),
        w_up.stride(0) if mixed else 0, smb, sml,
        ACT=_ACT[activation], GATE=_GATE_MEAN if mean else int(has_gate), HAS_BU=b_up is not None,
        HAS_BD=b_down is not None, HAS_MASK=mean and gate_mask is not None, EX_ROWS=ex_rows,
        HAS_IDX=mixed, BM=bm, BD=bd, RP=rp, BL=bl, PREC=prec, num_warps=warps,
    )  # fmt: skip

    # 2. columns: dx and the weight-gradient partials, the grid sized to whole waves.
    cbm, cbd = _clamp(n_rows, cbm), _clamp(max(D, D_OUT), cbd)
    n_dblocks = triton.cdiv(max(D, D_OUT), cbd)
    c_lb = triton.cdiv(L, cbm)
    if mixed:  # one split per example: its partials belong to its task
        n_blocks, per_split, S = B * c_lb, c_lb, B
    else:
        n_blocks = B * c_lb if ex_rows else triton.cdiv(M, cbm)
        S = max(1, ctas * _num_sms(dev) // n_dblocks)  # n_dblocks * S fills the waves
        if _interpreting(x):
            S = max(S, 2)  # still exercise the cross-split reduction
        per_split = triton.cdiv(n_blocks, min(S, n_blocks))
        S = triton.cdiv(n_blocks, per_split)
    n_bu = D_OUT if b_up is not None else 0
    off_wd = D_OUT * R
    off_bu = off_wd + R * D
    off_wg = off_bu + n_bu
    off_bg = off_wg + (D if has_gate else 0)
    NT = off_bg + (1 if b_gate is not None else 0)
    dx = new_output((B, L, D), dt, dev)
    part = new_output((S, NT), torch.float32, dev)
    _ga_bwd_cols_kernel[(n_dblocks, S)](
        grad_out, x, h, dz, gv, dsq, pdg, w_down, w_gate if has_gate else dummy,
        dx, part, idx,
        M, L, D, D_OUT, R, T, NT, off_bu, off_wg, off_bg, per_split, n_blocks, n_lb, scaling,
        x.stride(0), x.stride(1), x.stride(2), w_down.stride(-2), w_down.stride(-1),
        w_gate.stride(-1) if has_gate else 0,
        w_down.stride(0) if mixed else 0, w_gate.stride(0) if mixed and has_gate else 0,
        GATE=_GATE_MEAN if mean else int(has_gate), HAS_BU=b_up is not None,
        HAS_BG=b_gate is not None, RES_IS_X=bool(residual_is_x), EX_ROWS=ex_rows,
        HAS_IDX=mixed, BM=cbm, BD=cbd, RP=rp, NLB=nlb, PREC=prec, num_warps=cwarps,
        num_stages=cstages,
    )  # fmt: skip

    # 3. finish: every weight gradient summed (per task) in a fixed order and cast.
    n_main = triton.cdiv(NT, fblock)
    n_bd = triton.cdiv(R, fblock) if b_down is not None else 0
    pick = lambda g: dwu if g is None else g  # noqa: E731  (an empty segment: never stored)
    _ga_finish_kernel[(n_main + n_bd, T)](
        part, pbd, idx, dwu, dwd, pick(dbu), pick(dwg), pick(dbg), pick(dbd),
        S, NT, n_rb, n_lb, R, off_wd, off_bu, off_wg, off_bg, n_main,
        HAS_IDX=mixed, BLOCK=fblock, num_warps=4,
    )  # fmt: skip
    return dx, dwd, dbd, dwu, dbu, dwg, dbg
