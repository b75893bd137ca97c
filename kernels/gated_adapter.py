"""Fused gated bottleneck adapter: ``residual + g * scaling * (act(x @ Wd.T + bd) @ Wu.T + bu)``.

Calling convention: see the top of ``unipelt_fast/ops.py`` (gated_adapter).

Forward. One program per block of rows. Walk 1 over d builds the bottleneck z = x @ Wd.T + bd
(BM x r, in registers) and the gate logit s = x . w_gate + b_gate from the same x tiles (a row
reduction beside the tl.dot, so r = 64 is not padded to 128 for one extra column); walk 2
over d writes ``residual + G * (act(z) @ Wu.T + bu)`` with G = g * scaling. No gate or the
"token" gate: one launch. "mean" gate: launch 1 writes only z (M x r) and s (M,), the
per-example mean of sigmoid(s) is a few torch ops on (B, L), launch 2 reads z back instead of x.

Backward (only z and s are saved besides the inputs; act(z) is recomputed):
  rows kernel   (row blocks):  t = dY @ Wu, dg_row = scaling * (sum_r t*h + dY . bu),
                               dz = G * t * act'(z)                  -> dz (M, r), dg (M,)
  torch, (M,)-sized:           ds = dg * g(1-g) (token) or through the per-example mean
  cols kernel   (d chunks x row splits; the weight-gradient idea of Liger-Kernel/FlashAttention:
                 tile the reduction dim per program, write partials, sum them after):
                               dx = dz @ Wd + ds w_gate (+ dY), dWu += (G dY)^T h,
                               dbu += sum G dY, dWd^T += x^T dz, dw_gate += x^T ds
  Each program writes its partial weight gradients to a (S, ...) buffer; a torch .sum(0)
  finishes them: deterministic, no atomics. Full-size traffic: dY read twice, x read once,
  dx written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from unipelt_fast._alloc import new_output, on_input_device

from .prefix_attention import _task_sum_kernel

Tensor = torch.Tensor

_ACT = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "tanh": 5}
_GATE_NONE, _GATE_TOKEN, _GATE_GIVEN = 0, 1, 2
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
def _example_rows(pid, idx_ptr, L, T, BM: tl.constexpr):
    """Rows of program ``pid`` when programs are (example, row block within it): a block never
    straddles two examples, so one task serves it. The task is clamped to [0, T): an
    out-of-range index never reads out of bounds."""
    n_lb = tl.cdiv(L, BM)
    ex = pid // n_lb
    lrow = (pid - ex * n_lb) * BM + tl.arange(0, BM)
    task = tl.load(idx_ptr + ex).to(tl.int64)
    task = tl.minimum(tl.maximum(task, 0), T - 1)
    return ex.to(tl.int64) * L + lrow, lrow < L, task


@triton.jit(do_not_specialize=["M", "L"])  # row counts vary per batch
def _ga_fwd_kernel(
    x_ptr, res_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, wg_ptr, bg_ptr, gv_ptr,
    out_ptr, z_ptr, s_ptr, idx_ptr,
    M, L, D, D_OUT, R, T, scaling,
    sxb, sxl, sxd, srb, srl, srd,
    swd_r, swd_d, swu_d, swu_r, swg,
    swd_t, swu_t, swg_t,
    ACT: tl.constexpr, GATE: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr,
    HAS_BG: tl.constexpr, SEP_RES: tl.constexpr, LOAD_Z: tl.constexpr,
    STORE_OUT: tl.constexpr, HAS_IDX: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    RP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if HAS_IDX:  # mixed tasks: a program is (example, row block of it), one task's weights
        rows, rmask, task = _example_rows(pid, idx_ptr, L, T, BM)
        wd_ptr += task * swd_t
        wu_ptr += task * swu_t
        wg_ptr += task * swg_t
        bd_ptr += task * R  # stacked biases arrive contiguous (T, r), (T, d), (T, 1)
        bu_ptr += task * D_OUT
        bg_ptr += task
    else:
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < M
    rows64 = rows.to(tl.int64)
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
            G = tl.load(gv_ptr + rows64, mask=rmask, other=0.0)
        else:
            G = tl.zeros((BM,), dtype=tl.float32) + scaling
        h = tl.where(kmask[None, :], _act(z, ACT), 0.0)
        hc = h.to(out_ptr.dtype.element_ty)
        if SEP_RES:
            r_row = b * srb + l * srl
        for d0 in range(0, D_OUT, BD):  # output width D_OUT (== D when the residual is x)
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


@triton.jit(do_not_specialize=["M"])  # row counts vary per batch
def _ga_bwd_rows_kernel(
    dy_ptr, z_ptr, gv_ptr, wu_ptr, bu_ptr, dz_ptr, dg_ptr, idx_ptr,
    M, L, D, R, T, scaling, swu_d, swu_r, swu_t,
    ACT: tl.constexpr, HAS_BU: tl.constexpr, NEED_DG: tl.constexpr, HAS_IDX: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if HAS_IDX:
        rows, rmask, task = _example_rows(pid, idx_ptr, L, T, BM)
        wu_ptr += task * swu_t
        bu_ptr += task * D
    else:
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < M
    rows64 = rows.to(tl.int64)
    ks = tl.arange(0, RP)
    kmask = ks < R
    z_offs = rows64[:, None] * R + ks[None, :]
    z_mask = rmask[:, None] & kmask[None, :]
    z = tl.load(z_ptr + z_offs, mask=z_mask, other=0.0)

    t = tl.zeros((BM, RP), dtype=tl.float32)
    dyb = tl.zeros((BM,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        cmask = cols < D
        cols64 = cols.to(tl.int64)
        dyt = tl.load(
            dy_ptr + rows64[:, None] * D + cols64[None, :],
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        )
        wut = tl.load(  # Wu chunk (BD, RP)
            wu_ptr + cols64[:, None] * swu_d + ks[None, :] * swu_r,
            mask=cmask[:, None] & kmask[None, :],
            other=0.0,
        )
        t = tl.dot(dyt, wut, acc=t, input_precision=PREC)
        if NEED_DG and HAS_BU:
            bu = tl.load(bu_ptr + cols64, mask=cmask, other=0.0).to(tl.float32)
            dyb += tl.sum(dyt.to(tl.float32) * bu[None, :], axis=1)

    G = tl.load(gv_ptr + rows64, mask=rmask, other=0.0)
    dz = G[:, None] * t * _act_grad(z, ACT)
    tl.store(dz_ptr + z_offs, dz, mask=z_mask)
    if NEED_DG:
        h = tl.where(kmask[None, :], _act(z, ACT), 0.0)
        dg = scaling * (tl.sum(t * h, axis=1) + dyb)
        tl.store(dg_ptr + rows64, dg, mask=rmask)


@triton.jit(do_not_specialize=["M", "L", "blocks_per_split"])  # row counts vary per batch
def _ga_bwd_cols_kernel(
    dy_ptr, x_ptr, z_ptr, dz_ptr, gv_ptr, ds_ptr, wd_ptr, wg_ptr,
    dx_ptr, pwu_ptr, pbu_ptr, pwd_ptr, pwg_ptr, idx_ptr,
    M, L, D, D_OUT, R, T, blocks_per_split,
    sxb, sxl, sxd, swd_r, swd_d, swg, swd_t, swg_t,
    ACT: tl.constexpr, HAS_GATE: tl.constexpr, HAS_BU: tl.constexpr,
    RES_IS_X: tl.constexpr, HAS_IDX: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    RP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)  # fastest axis: concurrent programs share row blocks (L2 reuse)
    pid_s = tl.program_id(1)  # a row split; with HAS_IDX an example (partials per example)
    if HAS_IDX:
        task = tl.load(idx_ptr + pid_s).to(tl.int64)
        task = tl.minimum(tl.maximum(task, 0), T - 1)
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
    if HAS_GATE:
        wg = tl.load(wg_ptr + cols64 * swg, mask=cmask, other=0.0).to(tl.float32)
        acc_wg = tl.zeros((BD,), dtype=tl.float32)
    acc_wu = tl.zeros((BD, RP), dtype=tl.float32)
    acc_wd = tl.zeros((BD, RP), dtype=tl.float32)
    acc_bu = tl.zeros((BD,), dtype=tl.float32)

    for i in range(0, blocks_per_split):
        if HAS_IDX:  # this example's row blocks only
            lrow = i * BM + tl.arange(0, BM)
            rows = pid_s.to(tl.int64) * L + lrow
            rmask = lrow < L
        else:
            rows = (pid_s * blocks_per_split + i) * BM + tl.arange(0, BM)
            rmask = rows < M
        rows64 = rows.to(tl.int64)
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
        z = tl.load(z_ptr + z_offs, mask=z_mask, other=0.0)
        dz = tl.load(dz_ptr + z_offs, mask=z_mask, other=0.0)
        G = tl.load(gv_ptr + rows64, mask=rmask, other=0.0)
        h = tl.where(kmask[None, :], _act(z, ACT), 0.0).to(dt)
        gdy = dyt.to(tl.float32) * G[:, None]
        acc_wu = tl.dot(tl.trans(gdy.to(dt)), h, acc=acc_wu, input_precision=PREC)
        if HAS_BU:
            acc_bu += tl.sum(gdy, axis=0)
        dzc = dz.to(dt)
        acc_wd = tl.dot(tl.trans(xt), dzc, acc=acc_wd, input_precision=PREC)
        dx = tl.dot(dzc, wdt, input_precision=PREC)
        if HAS_GATE:
            ds = tl.load(ds_ptr + rows64, mask=rmask, other=0.0)
            dx += ds[:, None] * wg[None, :]
            acc_wg += tl.sum(xt.to(tl.float32) * ds[:, None], axis=0)
        if RES_IS_X:
            dx += dyt.to(tl.float32)
        tl.store(dx_ptr + rows64[:, None] * D + cols64[None, :], dx.to(dt), mask=m2)

    # Partials: (S, D_OUT, R) for Wu, (S, R, D) for Wd (its own layout), (S, D_OUT) / (S, D).
    p_mask = cmask[:, None] & kmask[None, :]
    po_mask = omask[:, None] & kmask[None, :]
    base_o = pid_s.to(tl.int64) * D_OUT * R
    base = pid_s.to(tl.int64) * D * R
    tl.store(pwu_ptr + base_o + cols64[:, None] * R + ks[None, :], acc_wu, mask=po_mask)
    tl.store(pwd_ptr + base + ks[None, :] * D + cols64[:, None], acc_wd, mask=p_mask)
    if HAS_BU:
        tl.store(pbu_ptr + pid_s.to(tl.int64) * D_OUT + cols64, acc_bu, mask=omask)
    if HAS_GATE:
        tl.store(pwg_ptr + pid_s.to(tl.int64) * D + cols64, acc_wg, mask=cmask)


# ---- launchers -----------------------------------------------------------------------------


def _prec(dtype: torch.dtype) -> str | None:
    # fp32 must not silently drop to tf32 (2e-4 parity); "ieee" is accepted by triton >= 3.0.
    return "ieee" if dtype == torch.float32 else None


def _rpad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # every tl.dot dim >= 16 on GPU


def _cfg(M: int, D: int, bm: int, bd: int, warps: int) -> tuple[int, int, int]:
    bm = min(bm, max(16, triton.next_power_of_2(M)))
    return bm, min(bd, max(16, triton.next_power_of_2(D))), warps


# Block sizes: untimed (no GPU in this session), chosen from the sm_90 cubins of these kernels
# (triton's AOT compiler + cuobjdump -res-usage, bf16): no register spills at r <= 64 (128 for
# the backward), at most ~112 bytes of spill at r = 256. Small row blocks in the forward also keep walk 2's
# re-read of x (as the residual) in L2.
def _fwd_cfg(M: int, D: int, rp: int) -> tuple[int, int, int]:
    if rp <= 64:
        return _cfg(M, D, 16, 128, 4)
    return _cfg(M, D, 16, 64, 8)


def _rows_cfg(M: int, D: int, rp: int) -> tuple[int, int, int]:
    if rp <= 64:
        return _cfg(M, D, 32, 64, 4)
    return _cfg(M, D, 16, 64, 8)


def _cols_cfg(M: int, D: int, rp: int) -> tuple[int, int, int]:
    if rp <= 64:
        return _cfg(M, D, 32, 64, 8)
    return _cfg(M, D, 16, 32, 8)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: still split rows in two where possible to exercise the reduction


def _gate_rows(
    s: Tensor, B: int, L: int, gate_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """ "mean" gate on (B, L): per-row g (broadcast over the example), sigmoid(s), mask."""
    sig = torch.sigmoid(s.view(B, L))
    m = None if gate_mask is None else gate_mask.to(torch.float32)
    if m is None:
        gb = sig.mean(dim=1)
    else:
        # where, not sig * m: a NaN in an excluded token must not reach the mean.
        gb = torch.where(gate_mask, sig, 0.0).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    return gb[:, None].expand(B, L).reshape(-1), sig, m


def _contig(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _task_sum(part: Tensor, adapter_index: Tensor, T: int, dtype: torch.dtype) -> Tensor:
    """(B, ...) per-example partials -> (T, ...) per-task sums in a fixed order (no atomics)."""
    B = part.shape[0]
    N = part[0].numel()
    out = new_output((T, *part.shape[1:]), torch.float32, part.device)
    if N:
        block = 1024
        _task_sum_kernel[(triton.cdiv(N, block), T)](
            part.contiguous(), adapter_index, out, B, N, BLOCK=block
        )
    return out.to(dtype)


@on_input_device
def forward(
    x: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    residual: Tensor | None,
    w_gate: Tensor | None,
    b_gate: Tensor | None,
    gate_mask: Tensor | None,
    gate_mode: str,
    activation: str,
    scaling: float,
    *,
    adapter_index: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
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
    rp = _rpad(R)
    bm, bd, warps = _fwd_cfg(L if mixed else M, max(D, D_OUT), rp)
    res = x if residual is None else residual
    dummy = z  # never read: its flag is off
    common = dict(
        M=M, L=L, D=D, D_OUT=D_OUT, R=R, T=w_down.shape[0] if mixed else 1, scaling=float(scaling),
        sxb=x.stride(0), sxl=x.stride(1), sxd=x.stride(2),
        srb=res.stride(0), srl=res.stride(1), srd=res.stride(2),
        swd_r=w_down.stride(-2), swd_d=w_down.stride(-1),
        swu_d=w_up.stride(-2), swu_r=w_up.stride(-1),
        swg=w_gate.stride(-1) if has_gate else 0,
        swd_t=w_down.stride(0) if mixed else 0, swu_t=w_up.stride(0) if mixed else 0,
        swg_t=w_gate.stride(0) if mixed and has_gate else 0,
        ACT=_ACT[activation], HAS_BD=b_down is not None, HAS_BU=b_up is not None,
        HAS_BG=b_gate is not None, SEP_RES=residual is not None, HAS_IDX=mixed,
        BM=bm, BD=bd, RP=rp, PREC=_prec(dt), num_warps=warps,
    )  # fmt: skip
    ptrs = (
        x, res, w_down, dummy if b_down is None else b_down, w_up,
        dummy if b_up is None else b_up, w_gate if has_gate else dummy,
        dummy if b_gate is None else b_gate,
    )  # fmt: skip
    grid = (B * triton.cdiv(L, bm),) if mixed else (triton.cdiv(M, bm),)
    idx = adapter_index if mixed else dummy
    if not has_gate or gate_mode == "token":
        gate = _GATE_TOKEN if has_gate else _GATE_NONE
        _ga_fwd_kernel[grid](
            *ptrs, dummy, out, z, s, idx, GATE=gate, LOAD_Z=False, STORE_OUT=True, **common
        )
        return out, z, s
    # "mean": z and s first, the per-example mean on (B, L), then the output from z.
    _ga_fwd_kernel[grid](
        *ptrs, dummy, out, z, s, idx, GATE=_GATE_TOKEN, LOAD_Z=False, STORE_OUT=False, **common
    )
    g_rows, _, _ = _gate_rows(s, B, L, gate_mask)
    gv = (g_rows * float(scaling)).contiguous()
    _ga_fwd_kernel[grid](
        *ptrs, gv, out, z, s, idx, GATE=_GATE_GIVEN, LOAD_Z=True, STORE_OUT=True, **common
    )
    return out, z, s


@on_input_device
def backward(
    grad_out: Tensor,
    x: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    residual_is_x: bool,
    w_gate: Tensor | None,
    b_gate: Tensor | None,
    gate_mask: Tensor | None,
    z: Tensor,
    s: Tensor,
    gate_mode: str,
    activation: str,
    scaling: float,
    *,
    adapter_index: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None, Tensor | None]:
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
    scaling = float(scaling)
    if M == 0:
        zeros = lambda t: None if t is None else torch.zeros_like(t)
        return (
            new_output((B, L, D), dt, dev),
            torch.zeros_like(w_down), zeros(b_down), torch.zeros_like(w_up), zeros(b_up),
            zeros(w_gate), zeros(b_gate),
        )  # fmt: skip

    # Per-row G = g * scaling, from the saved logits: (M,) work only.
    sig = m = None
    if not has_gate:
        gv = torch.full((M,), scaling, dtype=torch.float32, device=dev)
    elif gate_mode == "token":
        sig = torch.sigmoid(s)
        gv = sig * scaling
    else:
        g_rows, sig, m = _gate_rows(s, B, L, gate_mask)
        gv = (g_rows * scaling).contiguous()

    rp = _rpad(R)
    bm, bd, warps = _rows_cfg(L if mixed else M, D_OUT, rp)
    prec = _prec(dt)
    dz = new_output((M, R), torch.float32, dev)
    dg = new_output((M if has_gate else 0,), torch.float32, dev)
    idx = adapter_index if mixed else z
    grid = (B * triton.cdiv(L, bm),) if mixed else (triton.cdiv(M, bm),)
    _ga_bwd_rows_kernel[grid](
        grad_out, z, gv, w_up, z if b_up is None else b_up, dz, dg, idx,
        M, L, D_OUT, R, T, scaling, w_up.stride(-2), w_up.stride(-1),
        w_up.stride(0) if mixed else 0,
        ACT=_ACT[activation], HAS_BU=b_up is not None, NEED_DG=has_gate, HAS_IDX=mixed,
        BM=bm, BD=bd, RP=rp, PREC=prec, num_warps=warps,
    )  # fmt: skip

    ds = None
    if has_gate:  # d logit, (M,)
        if gate_mode == "token":
            ds = dg * sig * (1.0 - sig)
        else:
            dsig = sig * (1.0 - sig)
            count = (
                torch.full((B, 1), float(L), device=dev)
                if m is None
                else m.sum(dim=1, keepdim=True).clamp_min(1.0)
            )
            dgb = dg.view(B, L).sum(dim=1, keepdim=True)  # every token of b uses g_b
            ds = dgb / count * dsig
            if m is not None:
                ds = torch.where(gate_mask, ds, 0.0)
            ds = ds.reshape(-1)
        ds = ds.contiguous()

    # Column-parallel pass: dx and the weight-gradient partials.
    bm, bd, warps = _cols_cfg(L if mixed else M, max(D, D_OUT), rp)
    n_dblocks = triton.cdiv(max(D, D_OUT), bd)
    if mixed:  # one split per example: its partials belong to its task
        per_split, S = triton.cdiv(L, bm), B
    else:
        n_mblocks = triton.cdiv(M, bm)
        want = max(1, triton.cdiv(2 * _num_sms(dev), n_dblocks))
        if dev.type != "cuda":
            want = 2
        per_split = triton.cdiv(n_mblocks, min(n_mblocks, want))
        S = triton.cdiv(n_mblocks, per_split)
    dx = new_output((B, L, D), dt, dev)
    pwu = new_output((S, D_OUT, R), torch.float32, dev)
    pwd = new_output((S, R, D), torch.float32, dev)
    pbu = new_output((S, D_OUT) if b_up is not None else (0,), torch.float32, dev)
    pwg = new_output((S, D) if has_gate else (0,), torch.float32, dev)
    _ga_bwd_cols_kernel[(n_dblocks, S)](
        grad_out, x, z, dz, gv, dz if ds is None else ds, w_down,
        w_gate if has_gate else dz,
        dx, pwu, pbu, pwd, pwg, idx,
        M, L, D, D_OUT, R, T, per_split,
        x.stride(0), x.stride(1), x.stride(2), w_down.stride(-2), w_down.stride(-1),
        w_gate.stride(-1) if has_gate else 0,
        w_down.stride(0) if mixed else 0, w_gate.stride(0) if mixed and has_gate else 0,
        ACT=_ACT[activation], HAS_GATE=has_gate, HAS_BU=b_up is not None,
        RES_IS_X=bool(residual_is_x), HAS_IDX=mixed,
        BM=bm, BD=bd, RP=rp, PREC=prec, num_warps=warps,
    )  # fmt: skip

    if mixed:  # per-example partials -> per-task sums, fixed order
        tsum = lambda p: _task_sum(p, adapter_index, T, dt)  # noqa: E731
        dw_up = tsum(pwu)
        dw_down = tsum(pwd)
        db_up = None if b_up is None else tsum(pbu)
        db_down = None if b_down is None else tsum(dz.view(B, L, R).sum(1))
        dw_gate = None if not has_gate else tsum(pwg.view(B, 1, D))
        db_gate = None if b_gate is None else tsum(ds.view(B, L).sum(1, keepdim=True))
        return dx, dw_down, db_down, dw_up, db_up, dw_gate, db_gate
    dw_up = pwu.sum(0).to(dt)
    dw_down = pwd.sum(0).to(dt)
    db_up = None if b_up is None else pbu.sum(0).to(dt)
    db_down = None if b_down is None else dz.sum(0).to(dt)
    dw_gate = None if not has_gate else pwg.sum(0).view(1, D).to(dt)
    db_gate = None if b_gate is None else ds.sum().view(1).to(dt)
    return dx, dw_down, db_down, dw_up, db_up, dw_gate, db_gate
