"""Fused prefix-KV attention (Triton): softmax(q [g_k Pk ; K]^T * scale) [g_v Pv ; V].

Flash-attention style (online softmax in base 2, fp32 accumulation, recomputation in
backward; ideas from Dao et al.'s FlashAttention-2 and Triton's fused-attention tutorial).
The concatenation [prefix ; tokens] is never built: each query block first walks the prefix
blocks, read straight from ``prefix_k``/``prefix_v`` of the example's task
(``prefix_index``), then the token blocks. The per-example gate scales the prefix logits
and the prefix values. An optional additive ``attn_bias`` (HAS_BIAS; e.g. T5's position
bias) is read in tiles through its own strides (0 on broadcast dims) and added after the
gate, before the masks. Masks (causal, bottom-right aligned; key padding) apply to token keys
only. GQA maps query head h to kv head h // (H // Hkv); K/V are never repeated in memory.
Only ``out`` and the row log-sum-exp are kept for backward.

Attention dropout (DROPOUT, a constexpr: with p = 0 no dropout instruction is compiled)
drops probabilities over prefix and token keys with 1/(1-p) rescaling. The keep-mask is
never stored: counter-based Philox (``tl.rand4x``, one call per 4 mask columns of a row, at
counter ((b*H + h)*Lq + row)*NC4 + column // 4 in int64; prefix columns first, token
columns from P rounded up to 4, NC4 groups per row) regenerates it in every backward
kernel, from a seed that torch's generator drew on the device (read through a pointer: no
host sync). The saved lse is that of the un-dropped softmax. ``dropout_keep_mask`` returns the mask of a
call, so the eager reference can reproduce it exactly.

Three more constexpr flags, each compiled out when off (so a call without them runs the
kernels it did before they existed): SOFTCAP caps every scaled logit, cap * tanh(s / cap)
(in base-2 units the cap is cap * log2 e), before the bias, and backward multiplies dS by
1 - tanh^2; HAS_SINKS starts each row's online softmax with its head's sink logit as the
first term (m = sink, l = 1), so lse includes it and out = acc / l, and the dQ kernel writes
per-query-block partials of d sink = -sum p_sink * delta (summed in a fixed order after);
WINDOW (query i sees token key j iff i + LK - LQ - j < W) starts the token loop at the first
key block any row of the query block can see, masks per element only the blocks on the
window's edge, and in dK/dV stops at the last query row that sees the key block.

Backward, three launches; dO and O are read through their own strides (no copies):
1. dQ per query block, which also computes delta = rowsum(dO * O) for step 2 and, from the
   prefix's p and dS it has anyway, this block's fp32 partials of d prefix_k, d prefix_v
   (B, H, n_query_blocks, P, D) and of the gate gradients;
2. dK/dV per token key block (it loops over the query heads of its GQA group: no atomics);
3. the partials summed per task (and the gate's per example) in a fixed order.
Every reduction is deterministic.

Calling convention: ``forward(a)``/``backward(a, ...)`` with ``a`` the op's argument record;
see ``unipelt_fast/ops/prefix_attention.py`` and docs/ops.md.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from unipelt_fast import _autotune
from unipelt_fast._alloc import new_output, new_output_like, on_input_device
from unipelt_fast._args import PrefixAttentionArgs

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _online_block(
    q,
    kb,
    vb,
    vis,
    m_i,
    l_i,
    acc,
    logit_scale,
    v_scale,
    bias,
    keep,
    drop_scale,
    MASKED: tl.constexpr,
    SCALE_V: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
    softcap,
    SOFTCAP: tl.constexpr,
):
    """One key block of the online softmax. With MASKED, ``vis`` (broadcastable to
    (BLOCK_M, BLOCK_N)) marks the visible keys. With HAS_BIAS, ``bias`` is the block's
    additive bias in base-2 logit units, added after the (gated) scale. With DROPOUT,
    ``keep`` is the block's keep-mask: the normaliser l_i (and so the lse) sums the
    un-dropped probabilities, the values see the dropped ones times ``drop_scale``. With
    SOFTCAP the scaled logits are capped (``softcap`` in base-2 units) before the bias."""
    s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * logit_scale
    if SOFTCAP:
        s = softcap * _tanh(s / softcap)
    if HAS_BIAS:
        s = s + bias
    if MASKED:
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so that
    # exp2 gives 0 rather than NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(keep, p * drop_scale, 0.0)
    if SCALE_V:  # the gated value gv * v: fold gv into the probabilities
        p = p * v_scale
    # Accumulate inside the MMA (acc as the dot's accumulator), as in the Triton tutorial.
    acc = tl.dot(p.to(vb.dtype), vb, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _tanh(x):
    """tanh through exp2, 1 - 2 / (e^(2x) + 1): exact at +-inf, absolute error ~1e-7 near 0,
    and the same code under the interpreter and on a GPU."""
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _window_bounds(m0, LQ, LK, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query rows [m0, m0 + BLOCK_M) and a sliding window W: (lo, clean), multiples
    of BLOCK_N. Row i sees token keys j >= i + LK - LQ - W + 1, so keys below ``lo`` are
    outside every row's window and blocks from ``clean`` on inside every row's."""
    first = m0 + LK - LQ - W + 1
    lo = (tl.maximum(first, 0) // BLOCK_N) * BLOCK_N
    clean = ((tl.maximum(first + BLOCK_M - 1, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    return lo, clean


@triton.jit
def _token_bounds(m0, LQ, LK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For the query rows [m0, m0 + BLOCK_M): (full, hi). Token key blocks below ``full``
    are inside LK and (causal) visible to every row, so they need no per-element mask;
    blocks in [full, hi) need one; keys >= hi are visible to none of these rows."""
    even = (LK // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(LK, m0 + BLOCK_M + LK - LQ)
        x = m0 + LK - LQ + 1  # row m0 sees keys < x
        full = tl.minimum(tl.where(x > 0, (x // BLOCK_N) * BLOCK_N, 0), even)
    else:
        hi = LK
        full = even
    return full, hi


@triton.jit
def _load_d(ptrs, mask_d, EVEN_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile whose rows are all in range; pad D only if needed."""
    if EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=mask_d[None, :], other=0.0)
    return x


@triton.jit
def _task(IDX, b, T):
    """Example b's task, clamped to [0, T - 1]: validation reads the range only where that
    needs no device sync (see _validation._check_index), so no index may read out of bounds."""
    return tl.minimum(tl.maximum(tl.load(IDX + b).to(tl.int64), 0), T - 1)


@triton.jit
def _keep(seed, row_base, rows, col0, NC4, dropout_p, BLOCK_N: tl.constexpr):
    """Attention-dropout keep-mask (True with prob 1 - p) of query rows ``rows`` x the
    BLOCK_N mask columns from ``col0`` (a multiple of 4), as (rows, BLOCK_N). One Philox
    call (``tl.rand4x``) gives columns 4c..4c+3 of a row, at counter
    (row_base + row) * NC4 + c in int64 (row_base = (b * H + h) * LQ, NC4 = mask
    columns / 4): a quarter of the Philox state of one call per element."""
    r64 = row_base + rows.to(tl.int64)
    c4 = col0 // 4 + tl.arange(0, BLOCK_N // 4).to(tl.int64)
    u0, u1, u2, u3 = tl.rand4x(seed, r64[:, None] * NC4 + c4[None, :])
    u = tl.join(tl.join(u0, u2), tl.join(u1, u3))  # [r, c, i, j] = u_{2i+j}
    u = tl.reshape(u, (r64.shape[0], BLOCK_N))  # column 4c + 2i + j
    return u >= dropout_p


@triton.jit
def _load_bias(base, rows, cols, srow, scol, mask, HAS_BIAS: tl.constexpr):
    """The attn_bias tile [rows, cols] in base-2 units (fp32); 0 without a bias. Broadcast
    dims have stride 0, so nothing bigger than the caller's tensor is ever read."""
    if HAS_BIAS:
        x = tl.load(base + rows[:, None] * srow + cols[None, :] * scol, mask=mask, other=0.0)
        x = x.to(tl.float32) * 1.4426950408889634
    else:
        x = 0.0
    return x


@triton.jit(do_not_specialize=["LQ", "LK", "P", "window"])
def _fwd_kernel(
    Q,
    K,
    V,
    PK,
    PV,
    IDX,
    GATE,
    KPM,
    BIAS,
    SEED,
    OUT,
    LSE,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    spkt,
    spkh,
    spkn,
    spkd,
    spvt,
    spvh,
    spvn,
    spvd,
    smb,
    smn,
    sbb,
    sbh,
    sbm,
    sbn,
    sob,
    soh,
    som,
    sod,
    H,
    GROUP,
    LQ,
    LK,
    P,
    T,
    qk_scale,
    dropout_p,
    drop_scale,
    SINKS,
    softcap,
    window,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    SOFTCAP: tl.constexpr = False,
    HAS_SINKS: tl.constexpr = False,
    WINDOW: tl.constexpr = False,
):
    # (query block, head, example) on three grid axes: B * H may pass axis 1's 65535.
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: launch them first (less tail)
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)  # 64-bit offsets inside one example's slice too
    bh = b * H + h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM  # head dims that are not a power of two: padded, masked
    row_ok = offs_m < LQ
    bias_base = BIAS + b * sbb + h * sbh  # columns: [prefix (P) ; tokens (LK)]

    rows64 = offs_m.to(tl.int64)
    q_ptrs = Q + b * sqb + h * sqh + rows64[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS:  # the sink is the softmax's first term: max = sink, sum = exp(0) = 1
        sink = tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
        m_i = tl.zeros([BLOCK_M], tl.float32) + sink
        l_i = l_i + 1.0
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0
    # Mask columns: prefix keys at [0, P), token key j at PP + j (PP = P rounded up to 4, so
    # that every block starts a Philox group of 4); NC4 groups per row.
    PP = (P + 3) // 4 * 4
    NC4 = PP // 4 + (LK + 3) // 4

    # ---- prefix keys: always visible, gated
    if HAS_GATE:
        gk = tl.load(GATE + 2 * b)
        gv = tl.load(GATE + 2 * b + 1)
    else:
        gk = 1.0
        gv = 1.0
    t = _task(IDX, b, T)
    pk_base = PK + t * spkt + hk * spkh
    pv_base = PV + t * spvt + hk * spvh
    # BLOCK_P-wide tiles (the launcher sizes them to P: a 16-key prefix is not a 64-wide tile)
    for start_n in range(0, P, BLOCK_P):
        cols = start_n + offs_p
        col_ok = cols < P
        kv_mask = col_ok[:, None] & mask_d[None, :]
        kb = tl.load(
            pk_base + cols[:, None] * spkn + offs_d[None, :] * spkd, mask=kv_mask, other=0.0
        )
        vb = tl.load(
            pv_base + cols[:, None] * spvn + offs_d[None, :] * spvd, mask=kv_mask, other=0.0
        )
        bias = _load_bias(
            bias_base, offs_m, cols, sbm, sbn, row_ok[:, None] & col_ok[None, :], HAS_BIAS
        )
        if DROPOUT:
            keep = _keep(seed, bh * LQ, offs_m, start_n, NC4, dropout_p, BLOCK_P)
        else:
            keep = 0
        m_i, l_i, acc = _online_block(
            q, kb, vb, col_ok[None, :], m_i, l_i, acc, qk_scale * gk, gv, bias, keep,
            drop_scale, True, HAS_GATE, HAS_BIAS, PRECISION, DROPOUT, softcap, SOFTCAP,
        )  # fmt: skip

    # ---- token keys: causal (bottom-right) and padding masks
    full, hi = _token_bounds(pid_m * BLOCK_M, LQ, LK, BLOCK_M, BLOCK_N, CAUSAL)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    if WINDOW:  # keys below lo: outside every row's window; [lo, clean): masked per element
        lo, clean = _window_bounds(pid_m * BLOCK_M, LQ, LK, window, BLOCK_M, BLOCK_N)
        a_lo = tl.maximum(lo, tl.minimum(clean, full))
        b_lo = tl.maximum(full, lo)
        for start_n in range(lo, tl.minimum(clean, full), BLOCK_N):
            cols = start_n + offs_n
            c64 = cols.to(tl.int64)
            kb = _load_d(k_base + c64[:, None] * skn + offs_d[None, :] * skd, mask_d, EVEN_D)
            vb = _load_d(v_base + c64[:, None] * svn + offs_d[None, :] * svd, mask_d, EVEN_D)
            vis = (offs_m[:, None] + (LK - LQ)) - cols[None, :] < window
            if HAS_MASK:
                vis = vis & (tl.load(KPM + b * smb + cols * smn) != 0)[None, :]
            bias = _load_bias(bias_base, offs_m, P + cols, sbm, sbn, row_ok[:, None], HAS_BIAS)
            if DROPOUT:
                keep = _keep(seed, bh * LQ, offs_m, PP + start_n, NC4, dropout_p, BLOCK_N)
            else:
                keep = 0
            m_i, l_i, acc = _online_block(
                q, kb, vb, vis, m_i, l_i, acc, qk_scale, 1.0, bias, keep, drop_scale, True,
                False, HAS_BIAS, PRECISION, DROPOUT, softcap, SOFTCAP,
            )  # fmt: skip
    else:
        a_lo = 0
        b_lo = full
    # Blocks every row sees (rows past LQ compute harmless values that are never stored):
    # no per-element mask, only the per-column padding mask if any.
    for start_n in range(a_lo, full, BLOCK_N):
        cols = start_n + offs_n
        c64 = cols.to(tl.int64)
        kb = _load_d(k_base + c64[:, None] * skn + offs_d[None, :] * skd, mask_d, EVEN_D)
        vb = _load_d(v_base + c64[:, None] * svn + offs_d[None, :] * svd, mask_d, EVEN_D)
        if HAS_MASK:
            vis = (tl.load(KPM + b * smb + cols * smn) != 0)[None, :]
        else:
            vis = 0
        bias = _load_bias(bias_base, offs_m, P + cols, sbm, sbn, row_ok[:, None], HAS_BIAS)
        if DROPOUT:
            keep = _keep(seed, bh * LQ, offs_m, PP + start_n, NC4, dropout_p, BLOCK_N)
        else:
            keep = 0
        m_i, l_i, acc = _online_block(
            q, kb, vb, vis, m_i, l_i, acc, qk_scale, 1.0, bias, keep, drop_scale, HAS_MASK,
            False, HAS_BIAS, PRECISION, DROPOUT, softcap, SOFTCAP,
        )  # fmt: skip
    # The causal diagonal and the ragged tail (and, with WINDOW, the window's edge there).
    for start_n in range(b_lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        kv_mask = col_ok[:, None] & mask_d[None, :]
        c64 = cols.to(tl.int64)
        kb = tl.load(k_base + c64[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        vb = tl.load(v_base + c64[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        if HAS_MASK:
            col_ok = col_ok & (tl.load(KPM + b * smb + cols * smn, mask=col_ok, other=0) != 0)
        vis = col_ok[None, :]
        if CAUSAL:
            vis = vis & (cols[None, :] <= offs_m[:, None] + (LK - LQ))
        if WINDOW:
            vis = vis & ((offs_m[:, None] + (LK - LQ)) - cols[None, :] < window)
        bias = _load_bias(
            bias_base, offs_m, P + cols, sbm, sbn, row_ok[:, None] & (cols < LK)[None, :],
            HAS_BIAS,
        )  # fmt: skip
        if DROPOUT:
            keep = _keep(seed, bh * LQ, offs_m, PP + start_n, NC4, dropout_p, BLOCK_N)
        else:
            keep = 0
        m_i, l_i, acc = _online_block(
            q, kb, vb, vis, m_i, l_i, acc, qk_scale, 1.0, bias, keep, drop_scale, True,
            False, HAS_BIAS, PRECISION, DROPOUT, softcap, SOFTCAP,
        )  # fmt: skip

    # Rows with no visible key: out 0, lse -inf (backward reads that as "no key"); with
    # HAS_SINKS l_i >= its sink's term, so such a row has out 0 and lse = its sink.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = OUT + b * sob + h * soh + rows64[:, None] * som + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & mask_d[None, :])
    tl.store(LSE + bh * LQ + offs_m, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _dkdv_rows(
    dk,
    dv,
    kb,
    vb,
    cols,
    row_start,
    row_end,
    q_base,
    do_base,
    LSE,
    DELTA,
    sqm,
    sqd,
    sdm,
    sdd,
    LQ,
    LK,
    logit_scale,
    v_scale,
    bias_base,
    sbm,
    sbn,
    ncols,
    seed,
    rng_base,
    rng_col0,
    NC4,
    dropout_p,
    drop_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
    softcap,
    window,
    SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Accumulate dS^T q and P^T dO over query rows [row_start, row_end) of one head for one
    key block (dk, dv: keys are rows). Rows past LQ and rows with no visible key get
    P = 0 through their lse (+inf). Key rows that are padding or past the end are left
    unmasked here (they only affect their own rows of dk/dv); the caller zeroes them."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    for start_m in range(row_start, row_end, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < LQ
        rd_mask = row_ok[:, None] & mask_d[None, :]
        r64 = rows.to(tl.int64)
        qb = tl.load(q_base + r64[:, None] * sqm + offs_d[None, :] * sqd, mask=rd_mask, other=0.0)
        dob = tl.load(do_base + r64[:, None] * sdm + offs_d[None, :] * sdd, mask=rd_mask, other=0.0)
        lse = tl.load(LSE + rows, mask=row_ok, other=float("-inf"))
        # -inf marks a row with no visible key (or no row): +inf makes its P exactly 0.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        # Queries as rows, as in the forward (its keep-mask layout: no transposed Philox
        # tile); P and dS are transposed only as the dV / dK dot operands.
        s = tl.dot(qb, tl.trans(kb), input_precision=PRECISION) * logit_scale
        if SOFTCAP:  # the forward's cap; dS gets its derivative 1 - tanh^2 below
            tc = _tanh(s / softcap)
            s = softcap * tc
        if HAS_BIAS:  # the same bias as the forward
            s += _load_bias(
                bias_base, rows, cols, sbm, sbn, row_ok[:, None] & (cols < ncols)[None, :], True
            )
        p = tl.math.exp2(s - lse2[:, None])
        if CAUSAL_MASK:
            p = tl.where(cols[None, :] <= rows[:, None] + (LK - LQ), p, 0.0)
        if WINDOW:
            p = tl.where((rows[:, None] + (LK - LQ)) - cols[None, :] < window, p, 0.0)
        dp = tl.dot(dob, tl.trans(vb), input_precision=PRECISION) * v_scale
        if DROPOUT:  # the forward's mask
            keep = _keep(seed, rng_base, rows, rng_col0, NC4, dropout_p, BLOCK_N)
            pd = tl.where(keep, p * drop_scale, 0.0)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        else:
            pd = p
        dv = tl.dot(tl.trans(pd.to(dob.dtype)), dob, dv, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - tc * tc)
        dk = tl.dot(tl.trans(ds.to(qb.dtype)), qb, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_loop(
    kb,
    vb,
    cols,
    lo,
    diag_end,
    b,
    hk,
    Q,
    DO,
    LSE,
    DELTA,
    sqb,
    sqh,
    sqm,
    sqd,
    sdb,
    sdh,
    sdm,
    sdd,
    H,
    GROUP,
    LQ,
    LK,
    logit_scale,
    v_scale,
    BIAS,
    sbb,
    sbh,
    sbm,
    sbn,
    col_off,
    ncols,
    seed,
    rng_col0,
    NC4,
    dropout_p,
    drop_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
    row_end,
    softcap,
    window,
    SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Sum over the group's query heads (GQA, in a fixed order: no atomics) and query rows
    >= lo; with CAUSAL, rows [lo, diag_end) get the causal mask and later rows none.
    Returns (dk, dv) in fp32, dk not yet multiplied by softmax_scale. The bias columns of
    this block start at ``col_off`` (0 for the prefix, P for tokens); ``ncols`` bounds them.
    Rows >= ``row_end`` (LQ, or with WINDOW the first row past the block) are skipped."""
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for hh in range(0, GROUP):
        h = hk * GROUP + hh
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        row_base = (b * H + h) * LQ
        bias_base = BIAS + b * sbb + h * sbh + col_off * sbn
        if CAUSAL:
            dk, dv = _dkdv_rows(
                dk, dv, kb, vb, cols, lo, diag_end, q_base, do_base, LSE + row_base,
                DELTA + row_base, sqm, sqd, sdm, sdd, LQ, LK, logit_scale, v_scale,
                bias_base, sbm, sbn, ncols, seed, row_base, rng_col0, NC4, dropout_p,
                drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, True, HAS_BIAS, PRECISION,
                DROPOUT, softcap, window, SOFTCAP, WINDOW,
            )  # fmt: skip
            start = diag_end
        else:
            start = lo
        dk, dv = _dkdv_rows(
            dk, dv, kb, vb, cols, start, row_end, q_base, do_base, LSE + row_base,
            DELTA + row_base, sqm, sqd, sdm, sdd, LQ, LK, logit_scale, v_scale,
            bias_base, sbm, sbn, ncols, seed, row_base, rng_col0, NC4, dropout_p,
            drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, False, HAS_BIAS, PRECISION,
            DROPOUT, softcap, window, SOFTCAP, WINDOW,
        )  # fmt: skip
    return dk, dv


@triton.jit(do_not_specialize=["LQ", "LK", "window"])
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    KPM,
    BIAS,
    SEED,
    DK,
    DV,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sdb,
    sdh,
    sdm,
    sdd,
    smb,
    smn,
    sbb,
    sbh,
    sbm,
    sbn,
    sgkb,
    sgkh,
    sgkn,
    sgkd,
    sgvb,
    sgvh,
    sgvn,
    sgvd,
    H,
    HKV,
    GROUP,
    LQ,
    LK,
    P,
    qk_scale,
    sm_scale,
    dropout_p,
    drop_scale,
    softcap,
    window,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    SOFTCAP: tl.constexpr = False,
    WINDOW: tl.constexpr = False,
):
    """Token keys: one program per (key block, kv head, example)."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    c64 = cols.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < LK
    kv_mask = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    kb = tl.load(
        K + b * skb + hk * skh + c64[:, None] * skn + offs_d[None, :] * skd,
        mask=kv_mask,
        other=0.0,
    )
    vb = tl.load(
        V + b * svb + hk * svh + c64[:, None] * svn + offs_d[None, :] * svd,
        mask=kv_mask,
        other=0.0,
    )
    lo = 0
    diag_end = 0
    if CAUSAL:
        # Query i sees key j iff j <= i + LK - LQ: rows < lo see none of this block, rows
        # from start_n + BLOCK_N - 1 - (LK - LQ) on see all of it (no mask needed there).
        lo = tl.maximum(start_n - (LK - LQ), 0)
        first_full = tl.maximum(lo, start_n + BLOCK_N - 1 - (LK - LQ))
        diag_end = lo + ((first_full - lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if WINDOW:  # query i sees key j iff i + LK - LQ - j < W: later rows see none of the block
        row_end = tl.minimum(LQ, tl.maximum(start_n + BLOCK_N - 1 + window - (LK - LQ), 0))
    else:
        row_end = LQ
    seed = tl.load(SEED) if DROPOUT else 0
    dk, dv = _dkdv_loop(
        kb, vb, cols, lo, diag_end, b, hk, Q, DO, LSE, DELTA,
        sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd, H, GROUP, LQ, LK, qk_scale, 1.0,
        BIAS, sbb, sbh, sbm, sbn, P, LK, seed, (P + 3) // 4 * 4 + start_n,
        (P + 3) // 4 + (LK + 3) // 4, dropout_p, drop_scale,
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL, HAS_BIAS, PRECISION, DROPOUT,
        row_end, softcap, window, SOFTCAP, WINDOW,
    )  # fmt: skip
    if HAS_MASK:  # a padding key is seen by no query: its gradients are 0
        col_ok = col_ok & (tl.load(KPM + b * smb + cols * smn, mask=col_ok, other=0) != 0)
        dk = tl.where(col_ok[:, None], dk, 0.0)
        dv = tl.where(col_ok[:, None], dv, 0.0)
    # dK/dV in k's / v's layouts: HF's (B, L, Hkv, D) views take them back without a copy.
    dk_off = b * sgkb + hk * sgkh + c64[:, None] * sgkn + offs_d[None, :] * sgkd
    dv_off = b * sgvb + hk * sgvh + c64[:, None] * sgvn + offs_d[None, :] * sgvd
    tl.store(DK + dk_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + dv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["B", "N", "NPART", "NG"])
def _bwd_prefix_sum_kernel(
    DPK_PART,
    DPV_PART,
    DG_PART,
    IDX,
    DPK,
    DPV,
    DG,
    B,
    HKV,
    N,
    NPART,
    NG,
    T,
    BLOCK: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HAS_GATE: tl.constexpr,
):
    """DPK[t, hk] = sum of the (P * D = N)-sized partials of every example b of task t
    (clamped as in the other kernels), every query head of kv head hk's group and every
    query block (NPART = GROUP * n_query_blocks of them, consecutive), in increasing b then
    partial: a fixed order, so bit-reproducible (no atomics); likewise DPV. With HAS_GATE,
    program (0, 0, t) also finishes DG[b] (NG = H * n_query_blocks partials) for t's b."""
    pid = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    t = tl.program_id(2).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc_k = tl.zeros([BLOCK], tl.float32)
    acc_v = tl.zeros([BLOCK], tl.float32)
    for b in range(0, B):
        if _task(IDX, b, T) == t:
            base = (b * HKV + hk) * NPART * N  # int64 (hk is)
            for _j in range(0, NPART):
                acc_k += tl.load(DPK_PART + base + offs, mask=mask, other=0.0)
                acc_v += tl.load(DPV_PART + base + offs, mask=mask, other=0.0)
                base += N
    out = (t * HKV + hk) * N + offs
    tl.store(DPK + out, acc_k.to(DPK.dtype.element_ty), mask=mask)
    tl.store(DPV + out, acc_v.to(DPV.dtype.element_ty), mask=mask)
    if HAS_GATE:
        if (pid == 0) & (hk == 0):
            offs_g = tl.arange(0, BLOCK_G)
            two = tl.arange(0, 2)
            g_ptrs = DG_PART + offs_g[:, None] * 2 + two[None, :]  # advanced by 2 NG per b
            for b in range(0, B):
                if _task(IDX, b, T) == t:
                    acc_g = tl.zeros([BLOCK_G, 2], tl.float32)
                    for g0 in range(0, NG, BLOCK_G):
                        acc_g += tl.load(
                            g_ptrs + g0 * 2, mask=((g0 + offs_g) < NG)[:, None], other=0.0
                        )
                    tl.store(DG + b * 2 + two, tl.sum(acc_g, 0))
                g_ptrs += 2 * NG


@triton.jit(do_not_specialize=["N"])
def _task_sum_kernel(PART, IDX, OUT, B, N, BLOCK: tl.constexpr):
    """OUT[t] = sum over examples b with IDX[b] == t of PART[b], in increasing b: a fixed
    order, so the result is bit-reproducible (no atomics)."""
    pid = tl.program_id(0)
    t = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], tl.float32)
    ptrs = PART + offs  # advanced by N per example: 64-bit pointer arithmetic
    for b in range(0, B):
        # clamped as in the other kernels: an out-of-range index counts as task 0 or T - 1
        tb = _task(IDX, b, tl.num_programs(1))
        sel = (tl.zeros([BLOCK], tl.int64) + tb) == t
        acc += tl.load(ptrs, mask=mask & sel, other=0.0)
        ptrs += N
    tl.store(OUT + t.to(tl.int64) * N + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["LQ", "LK", "P", "window"])
def _bwd_dq_kernel(
    Q,
    K,
    V,
    PK,
    PV,
    IDX,
    GATE,
    KPM,
    BIAS,
    SEED,
    OUT,
    DO,
    LSE,
    DELTA,
    DQ,
    DPK_PART,
    DPV_PART,
    DG_PART,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    spkt,
    spkh,
    spkn,
    spkd,
    spvt,
    spvh,
    spvn,
    spvd,
    sob,
    soh,
    som,
    sod,
    sdb,
    sdh,
    sdm,
    sdd,
    smb,
    smn,
    sbb,
    sbh,
    sbm,
    sbn,
    sgqb,
    sgqh,
    sgqm,
    sgqd,
    H,
    GROUP,
    LQ,
    LK,
    P,
    T,
    qk_scale,
    sm_scale,
    dropout_p,
    drop_scale,
    SINKS,
    DSINK_PART,
    softcap,
    window,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    SOFTCAP: tl.constexpr = False,
    HAS_SINKS: tl.constexpr = False,
    WINDOW: tl.constexpr = False,
):
    # (query block, head, example) on three grid axes: B * H may pass axis 1's 65535.
    pid_m = tl.program_id(0)
    if CAUSAL:  # as in the forward: the blocks that see the most keys first
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)  # 64-bit offsets inside one example's slice too
    bh = b * H + h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    row_ok = offs_m < LQ
    rd_mask = row_ok[:, None] & mask_d[None, :]
    rows64 = offs_m.to(tl.int64)
    qb = tl.load(
        Q + b * sqb + h * sqh + rows64[:, None] * sqm + offs_d[None, :] * sqd,
        mask=rd_mask,
        other=0.0,
    )
    dob = tl.load(
        DO + b * sdb + h * sdh + rows64[:, None] * sdm + offs_d[None, :] * sdd,
        mask=rd_mask,
        other=0.0,
    )
    # delta = rowsum(dO * O), through O's and dO's own strides; stored for the dK/dV
    # kernel, which runs after this one (so no preprocess launch).
    ob = tl.load(
        OUT + b * sob + h * soh + rows64[:, None] * som + offs_d[None, :] * sod,
        mask=rd_mask,
        other=0.0,
    )
    delta = tl.sum(ob.to(tl.float32) * dob.to(tl.float32), 1)
    row_base = bh * LQ
    tl.store(DELTA + row_base + offs_m, delta, mask=row_ok)
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    if HAS_SINKS:  # this block's d sink_h = -sum_rows p_sink * delta, p_sink = exp(sink - lse)
        psink = tl.math.exp2(tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634 - lse2)
        tl.store(DSINK_PART + bh * tl.num_programs(0) + pid_m, -tl.sum(psink * delta, 0))
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bias_base = BIAS + b * sbb + h * sbh
    seed = tl.load(SEED) if DROPOUT else 0
    # Mask columns: prefix keys at [0, P), token key j at PP + j (PP = P rounded up to 4, so
    # that every block starts a Philox group of 4); NC4 groups per row.
    PP = (P + 3) // 4 * 4
    NC4 = PP // 4 + (LK + 3) // 4

    # ---- prefix keys (gated): dq += gk * dS pk
    if HAS_GATE:
        gk = tl.load(GATE + 2 * b)
        gv = tl.load(GATE + 2 * b + 1)
    else:
        gk = 1.0
        gv = 1.0
    t = _task(IDX, b, T)
    pk_base = PK + t * spkt + hk * spkh
    pv_base = PV + t * spvt + hk * spvh
    # This block's share of d prefix_k / d prefix_v (fp32, (B, H, n_query_blocks, P, D)),
    # from the p and dS it has anyway; _bwd_prefix_sum_kernel adds them up per task in a
    # fixed order. Rows past LQ or without a visible key have p = dS = 0.
    part = ((bh * tl.num_programs(0) + pid_m) * P) * HEAD_DIM
    dgk = 0.0
    dgv = 0.0
    for start_n in range(0, P, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < P
        kv_mask = col_ok[:, None] & mask_d[None, :]
        kb = tl.load(
            pk_base + cols[:, None] * spkn + offs_d[None, :] * spkd, mask=kv_mask, other=0.0
        )
        vb = tl.load(
            pv_base + cols[:, None] * spvn + offs_d[None, :] * spvd, mask=kv_mask, other=0.0
        )
        s = tl.dot(qb, tl.trans(kb), input_precision=PRECISION) * (qk_scale * gk)
        if SOFTCAP:
            tc = _tanh(s / softcap)
            s = softcap * tc
        if HAS_BIAS:
            s += _load_bias(
                bias_base, offs_m, cols, sbm, sbn, row_ok[:, None] & col_ok[None, :], True
            )
        p = tl.where(col_ok[None, :], tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(dob, tl.trans(vb), input_precision=PRECISION) * gv
        if DROPOUT:
            keep = _keep(seed, row_base, offs_m, start_n, NC4, dropout_p, BLOCK_N)
            dp = tl.where(keep, dp * drop_scale, 0.0)
            pd = tl.where(keep, p * drop_scale, 0.0)
        else:
            pd = p
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - tc * tc)
        dq = tl.dot((ds * gk).to(kb.dtype), kb, dq, input_precision=PRECISION)
        # d(gk pk) = scale dS^T q and d(gv pv) = P_dropped^T dO; the gated key/value's
        # gradients times the gates are prefix_k's and prefix_v's.
        dkey = tl.dot(tl.trans(ds.to(qb.dtype)), qb, input_precision=PRECISION) * sm_scale
        dval = tl.dot(tl.trans(pd.to(dob.dtype)), dob, input_precision=PRECISION)
        p_off = part + cols[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(DPK_PART + p_off, dkey * gk, mask=kv_mask)
        tl.store(DPV_PART + p_off, dval * gv, mask=kv_mask)
        if HAS_GATE:  # d gk = sum pk . d(gk pk); d gv = sum pv . d(gv pv)
            dgk += tl.sum(tl.sum(kb.to(tl.float32) * dkey, 1), 0)
            dgv += tl.sum(tl.sum(vb.to(tl.float32) * dval, 1), 0)
    if HAS_GATE:
        g_off = (bh * tl.num_programs(0) + pid_m) * 2
        tl.store(DG_PART + g_off, dgk)
        tl.store(DG_PART + g_off + 1, dgv)

    # ---- token keys (same split as the forward)
    full, hi = _token_bounds(pid_m * BLOCK_M, LQ, LK, BLOCK_M, BLOCK_N, CAUSAL)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    if WINDOW:  # the forward's split: [lo, clean) masked per element
        lo, clean = _window_bounds(pid_m * BLOCK_M, LQ, LK, window, BLOCK_M, BLOCK_N)
        a_lo = tl.maximum(lo, tl.minimum(clean, full))
        b_lo = tl.maximum(full, lo)
        for start_n in range(lo, tl.minimum(clean, full), BLOCK_N):
            cols = start_n + offs_n
            c64 = cols.to(tl.int64)
            kb = _load_d(k_base + c64[:, None] * skn + offs_d[None, :] * skd, mask_d, EVEN_D)
            vb = _load_d(v_base + c64[:, None] * svn + offs_d[None, :] * svd, mask_d, EVEN_D)
            vis = (offs_m[:, None] + (LK - LQ)) - cols[None, :] < window
            if HAS_MASK:
                vis = vis & (tl.load(KPM + b * smb + cols * smn) != 0)[None, :]
            s = tl.dot(qb, tl.trans(kb), input_precision=PRECISION) * qk_scale
            if SOFTCAP:
                tc = _tanh(s / softcap)
                s = softcap * tc
            if HAS_BIAS:
                s += _load_bias(bias_base, offs_m, P + cols, sbm, sbn, row_ok[:, None], True)
            p = tl.where(vis, tl.math.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(dob, tl.trans(vb), input_precision=PRECISION)
            if DROPOUT:
                keep = _keep(seed, row_base, offs_m, PP + start_n, NC4, dropout_p, BLOCK_N)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - tc * tc)
            dq = tl.dot(ds.to(kb.dtype), kb, dq, input_precision=PRECISION)
    else:
        a_lo = 0
        b_lo = full
    for start_n in range(a_lo, full, BLOCK_N):
        cols = start_n + offs_n
        c64 = cols.to(tl.int64)
        kb = _load_d(k_base + c64[:, None] * skn + offs_d[None, :] * skd, mask_d, EVEN_D)
        vb = _load_d(v_base + c64[:, None] * svn + offs_d[None, :] * svd, mask_d, EVEN_D)
        s = tl.dot(qb, tl.trans(kb), input_precision=PRECISION) * qk_scale
        if SOFTCAP:
            tc = _tanh(s / softcap)
            s = softcap * tc
        if HAS_BIAS:
            s += _load_bias(bias_base, offs_m, P + cols, sbm, sbn, row_ok[:, None], True)
        p = tl.math.exp2(s - lse2[:, None])
        if HAS_MASK:
            p = tl.where((tl.load(KPM + b * smb + cols * smn) != 0)[None, :], p, 0.0)
        dp = tl.dot(dob, tl.trans(vb), input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(seed, row_base, offs_m, PP + start_n, NC4, dropout_p, BLOCK_N)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - tc * tc)
        dq = tl.dot(ds.to(kb.dtype), kb, dq, input_precision=PRECISION)
    for start_n in range(b_lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        kv_mask = col_ok[:, None] & mask_d[None, :]
        c64 = cols.to(tl.int64)
        kb = tl.load(k_base + c64[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        vb = tl.load(v_base + c64[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        if HAS_MASK:
            col_ok = col_ok & (tl.load(KPM + b * smb + cols * smn, mask=col_ok, other=0) != 0)
        vis = col_ok[None, :]
        if CAUSAL:
            vis = vis & (cols[None, :] <= offs_m[:, None] + (LK - LQ))
        if WINDOW:
            vis = vis & ((offs_m[:, None] + (LK - LQ)) - cols[None, :] < window)
        s = tl.dot(qb, tl.trans(kb), input_precision=PRECISION) * qk_scale
        if SOFTCAP:
            tc = _tanh(s / softcap)
            s = softcap * tc
        if HAS_BIAS:
            s += _load_bias(
                bias_base, offs_m, P + cols, sbm, sbn, row_ok[:, None] & col_ok[None, :], True
            )
        p = tl.where(vis, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(dob, tl.trans(vb), input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(seed, row_base, offs_m, PP + start_n, NC4, dropout_p, BLOCK_N)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - tc * tc)
        dq = tl.dot(ds.to(kb.dtype), kb, dq, input_precision=PRECISION)

    dq_ptrs = DQ + b * sgqb + h * sgqh + rows64[:, None] * sgqm + offs_d[None, :] * sgqd
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rd_mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _interpreting(t: torch.Tensor) -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" or t.device.type != "cuda"


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def gpu_configs(dtype: torch.dtype, D: int) -> dict[str, tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel on a GPU ("psum":
    _bwd_prefix_sum_kernel's (BLOCK, BLOCK_G, num_warps, num_stages)). Every tl.dot dim
    >= 16; smaller tiles for fp32 and for D > 128 so that shared memory and registers stay
    within an sm80/sm90. The half-type backward tiles (D <= 128) were picked from a few
    candidates as ones that spill no register on sm_80 or sm_90 in any variant (dropout and
    attn_bias included); 32x128 dK/dV and 128x32 dQ spill with this kernel. The launch and
    ``unipelt-fast resources`` both read this, so the report is of what is launched."""
    bd = _block_d(D)
    if dtype == torch.float32:  # IEEE fp32 dots run on FMA units: small tiles avoid spills
        if bd <= 64:
            c = {"fwd": (32, 32, 4, 2), "dkdv": (32, 32, 4, 2), "dq": (32, 32, 4, 2)}
        elif bd <= 128:
            c = {"fwd": (32, 32, 8, 2), "dkdv": (32, 32, 8, 2), "dq": (32, 32, 8, 2)}
        else:
            c = {"fwd": (32, 16, 8, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 4, 1)}
    elif bd <= 64:  # fwd 128x64 with 4 warps spills 4 B on sm_80 (causal, no padding mask)
        c = {"fwd": (128, 64, 8, 3), "dkdv": (32, 32, 4, 2), "dq": (64, 16, 4, 2)}
    elif bd <= 128:
        c = {"fwd": (128, 64, 8, 3), "dkdv": (32, 64, 8, 1), "dq": (64, 16, 8, 2)}
    else:
        c = {"fwd": (64, 32, 8, 2), "dkdv": (32, 32, 8, 1), "dq": (32, 32, 8, 1)}
    return {**c, "psum": (512, 64, 4, 3)}


# The attn_bias forward's tiles (HAS_BIAS: its (BLOCK_M, BLOCK_N) bias tile and pointers
# hold as many registers again as the logits). With the plain set, nearly every candidate
# spilled: the 128x64 default up to 10 KB per thread on sm_80 and 8-60 B on sm_90, 64x64
# with 4 warps 8-44 B, 128x128 up to 544 B (docs/resources.md has the table). These are the
# tiles that compile without spills (bf16/fp16, D = 64, 80, 128), first the default.
BIAS_FWD = {
    (64, 80): [(128, 32, 8, 2), (64, 64, 4, 1), (64, 32, 4, 2)],
    (64, 90): [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)],
    (128, 80): [(64, 64, 8, 2), (64, 32, 4, 2)],
    (128, 90): [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
}


def fwd_candidates(
    dtype: torch.dtype,
    D: int,
    arch: int = 90,
    dropout: bool = False,
    attn_bias: bool = False,
    features: bool = False,
) -> list[tuple[int, int, int, int]]:
    """The forward's autotuning set (BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU of
    compute capability ``arch`` (80 for sm_80...), the ``gpu_configs`` default first, so
    autotuning never picks something slower than it. Each compiles without spills for its
    arch in fp16/bf16 (``unipelt-fast resources`` reports every one; autotuning also drops
    a candidate whose compile spills, see ``_autotune``); 128-wide key tiles halve the
    online-softmax rescales per key. 128x128 at D = 128 spills on sm_80 (255 registers,
    128 B), and on sm_90 at D = 80 (48-128 B) and D = 128 without causal (44 B). With ``dropout`` (the Philox keep-masks hold many more
    registers) the default and most large tiles spill, so the set is the tiles that do not,
    for that arch (sm_90 D=64: 128x64 268 B, 128x128 240-272 B; sm_80 D=128: 128x64
    2.5 KB). With ``attn_bias``, ``BIAS_FWD``'s tiles for the arch (its first the default).
    With ``features`` (softcap, sinks or window on) at D > 64, the tiles that spilled with
    all three on are left out: 64x128 w8 s2 (4 B on sm_90, D = 80 and 128) and, on sm_80,
    the 128x64 default (4 B at D = 80; 128x32 w8 s3 goes first)."""
    default = gpu_configs(dtype, D)["fwd"]
    bd = _block_d(D)
    if dtype == torch.float32 or bd > 128:
        return [default]
    if attn_bias:  # with dropout too: the bias tiles (the report's matrix has no such row)
        return list(BIAS_FWD[(bd if bd > 64 else 64, 90 if arch >= 90 else 80)])
    if dropout:
        if bd <= 64:
            return [(128, 32, 4, 3)] + ([(64, 64, 4, 3)] if arch >= 90 else [])
        if arch >= 90:  # 64x64 spills 24 B where D is padded (D = 80)
            return [default, (128, 32, 8, 3)] + ([(64, 64, 4, 3)] if bd == D else [])
        return [(64, 64, 4, 3), (64, 128, 8, 2)]
    if bd <= 64:  # 128x128 w8 s2 spills 8 B on sm_80 (without causal)
        extra = [(128, 128, 8, 2)] if arch >= 90 else []
        extra += [(128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)]
    else:  # 128x128 spills here on sm_90 too (D=80: up to 128 B; D=128 non-causal: 44 B)
        extra = [(64, 64, 4, 3), (128, 32, 8, 3), (64, 128, 8, 2)]
        if features:
            extra.remove((64, 128, 8, 2))
            if arch < 90:
                default = (128, 32, 8, 3)
    return [default] + [c for c in extra if c != default]


def _arch(device: torch.device) -> int:
    """The GPU's compute capability as 80, 90... (``unipelt-fast resources`` patches it;
    CPU tensors, which reach here only when a test mocks the GPU path, count as sm_90)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def prefix_block(P: int, block_n: int) -> int:
    """The prefix's key tile: the widest power of two in 16..block_n whose padding of P
    stays within 25% of the least padding (16-wide tiles), since wider tiles cost fewer
    online-softmax rescales. P = 16 walks one 16-wide tile, not a 64-wide one (+300%)."""
    widths = [w for w in (16, 32, 64, 128) if w <= block_n] or [block_n]
    padded = lambda w: triton.cdiv(max(P, 1), w) * w  # noqa: E731
    least = min(padded(w) for w in widths)
    return max(w for w in widths if padded(w) * 4 <= least * 5)


def _bucket(n: int) -> int:
    """Autotuning buckets for lengths: powers of two, capped (configs rarely change above)."""
    return min(triton.next_power_of_2(max(n, 1)), 8192)


def _configs(q: torch.Tensor, D: int) -> dict[str, tuple[int, int, int, int]]:
    """The GPU's configs, or 16x16 blocks under the interpreter (fast, and small shapes still
    span several blocks) unless UNIPELT_GPU_CONFIGS=1 asks for the GPU's there too (tests)."""
    if _interpreting(q) and os.environ.get("UNIPELT_GPU_CONFIGS") != "1":
        c = (16, 16, 1, 1)
        return {"fwd": c, "dkdv": c, "dq": c, "psum": (64, 4, 1, 1)}
    return gpu_configs(q.dtype, D)


def _precision(q: torch.Tensor) -> str:
    # fp32 must stay fp32 (no TF32) to meet the fp32 tolerance; half types ignore this.
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _check_head_dim(q: torch.Tensor, D: int) -> None:
    if D > 256 and not _interpreting(q):
        raise NotImplementedError(
            f"prefix_attention: the triton kernel supports head dims up to 256, got {D}; "
            "use backend='eager'"
        )


def _bias_args(
    attn_bias: torch.Tensor | None, q: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """(pointer, strides) of the (B, H, Lq, P + Lk) bias view; a placeholder without one."""
    if attn_bias is None:
        return q, (0, 0, 0, 0)
    return attn_bias, tuple(attn_bias.stride())


def _feature_args(a: PrefixAttentionArgs, q: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """(sinks pointer, softcap in base-2 logit units, window): placeholders when off, and
    SOFTCAP/HAS_SINKS/WINDOW=False compile the kernels without any of it."""
    sinks = q if a.sinks is None else a.sinks
    softcap = 0.0 if a.softcap is None else float(a.softcap) * LOG2E
    return sinks, softcap, 0 if a.window is None else int(a.window)


def _feature_flags(a: PrefixAttentionArgs) -> dict[str, bool]:
    return dict(SOFTCAP=a.softcap is not None, WINDOW=a.window is not None)


def _dropout_args(
    dropout_p: float, seed: torch.Tensor | None, q: torch.Tensor
) -> tuple[torch.Tensor, tuple[float, float]]:
    """(seed pointer, (p, 1 / (1 - p))): with p = 0 a placeholder pointer and (0, 1), and
    DROPOUT=False compiles the kernels without any of it."""
    if dropout_p <= 0:
        return q, (0.0, 1.0)
    if seed is None:
        raise ValueError("prefix_attention: dropout_p > 0 needs the seed tensor (see ops.dropout_seed)")
    return seed, (float(dropout_p), 1.0 / (1.0 - float(dropout_p)))


@triton.jit(do_not_specialize=["LQ", "NC4"])
def _dropout_mask_kernel(
    SEED, OUT, LQ, NC4, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """The keep-mask the attention kernels draw, over all 4 * NC4 mask columns (the prefix's
    rounded up to 4, then the tokens'), written out (debug/tests only)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    row_base = tl.program_id(2).to(tl.int64) * LQ
    keep = _keep(tl.load(SEED), row_base, rows, col0, NC4, dropout_p, BLOCK_N)
    off = (row_base + rows.to(tl.int64))[:, None] * (4 * NC4) + cols[None, :]
    tl.store(OUT + off, keep.to(tl.int8), mask=(rows < LQ)[:, None] & (cols < 4 * NC4)[None, :])


@on_input_device
def dropout_keep_mask(
    seed: torch.Tensor, B: int, H: int, Lq: int, P: int, Lk: int, dropout_p: float
) -> torch.Tensor:
    """Debug hook: the bool keep-mask (B, H, Lq, P + Lk), columns [prefix ; tokens], that a
    triton ``forward``/``backward`` with this ``seed`` (the int64 (1,) tensor the op draws,
    see ``unipelt_fast.ops.dropout_seed``) and ``dropout_p`` uses. Pass it as
    ``reference.prefix_attention(..., dropout_mask=)`` to reproduce that call exactly."""
    PP, nc4 = triton.cdiv(P, 4) * 4, triton.cdiv(P, 4) + triton.cdiv(Lk, 4)
    full = torch.zeros((B, H, Lq, 4 * nc4), dtype=torch.int8, device=seed.device)
    if full.numel() > 0:
        BM, BN = 16, 16
        grid = (triton.cdiv(Lq, BM), triton.cdiv(4 * nc4, BN), B * H)
        _dropout_mask_kernel[grid](seed, full, Lq, nc4, float(dropout_p), BLOCK_M=BM, BLOCK_N=BN)
    return torch.cat([full[..., :P], full[..., PP : PP + Lk]], dim=-1).bool()


@on_input_device
def forward(a: PrefixAttentionArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) for canonical arguments (the contract: unipelt_fast/ops/prefix_attention.py)."""
    q, k, v, prefix_k, prefix_v = a.q, a.k, a.v, a.prefix_k, a.prefix_v
    prefix_index, prefix_gate, key_padding_mask = a.prefix_index, a.prefix_gate, a.key_padding_mask
    causal, softmax_scale, attn_bias = a.causal, a.softmax_scale, a.attn_bias
    dropout_p, seed = a.dropout_p, a.seed
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = prefix_k.shape[2]
    out = new_output_like(q)  # q's layout: HF's (B, L, H, D) reshape of it is free
    lse = new_output((B, H, Lq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    _check_head_dim(q, D)
    gate = q if prefix_gate is None else prefix_gate  # a placeholder pointer when unused
    kpm = q if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    bias, b_strides = _bias_args(attn_bias, q)
    seed_t, drop = _dropout_args(dropout_p, seed, q)
    flags = dict(
        HAS_GATE=prefix_gate is not None, HAS_MASK=key_padding_mask is not None,
        CAUSAL=causal, PRECISION=_precision(q), EVEN_D=_block_d(D) == D,
        HAS_BIAS=attn_bias is not None, DROPOUT=dropout_p > 0,
        HAS_SINKS=a.sinks is not None, **_feature_flags(a),
    )  # fmt: skip
    features = _feature_args(a, q)

    def launch(cfg: tuple[int, int, int, int]) -> object:
        BM, BN, warps, stages = cfg
        grid = (triton.cdiv(Lq, BM), H, B)
        # The compiled kernel: autotuning drops a candidate whose compile spills.
        return _fwd_kernel[grid](
            q, k, v, prefix_k, prefix_v, prefix_index, gate, kpm, bias, seed_t, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
            kpm.stride(0) if key_padding_mask is not None else 0,
            kpm.stride(1) if key_padding_mask is not None else 0,
            *b_strides, *out.stride(),
            H, H // Hkv, Lq, Lk, P, prefix_k.shape[0], softmax_scale * LOG2E, *drop, *features,
            HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, BLOCK_P=prefix_block(P, BN),
            BLOCK_D=_block_d(D), num_warps=warps, num_stages=stages, **flags,
        )  # fmt: skip

    if _interpreting(q):
        cands = [_configs(q, D)["fwd"]]
    else:
        on = a.softcap is not None or a.sinks is not None or a.window is not None
        cands = fwd_candidates(
            q.dtype, D, _arch(q.device), dropout_p > 0, attn_bias is not None, features=on
        )
    key = (q.dtype, D, H // Hkv, _bucket(P), _bucket(Lq), _bucket(Lk), *flags.values())
    launch(_autotune.choose("prefix_attention.fwd", key, cands, launch))
    return out, lse


@on_input_device
def backward(
    a: PrefixAttentionArgs, grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """(dq, dk, dv, dprefix_k, dprefix_v, dprefix_gate, dsinks) (the contract:
    ops/prefix_attention.py)."""
    q, k, v, prefix_k, prefix_v = a.q, a.k, a.v, a.prefix_k, a.prefix_v
    prefix_index, prefix_gate, key_padding_mask = a.prefix_index, a.prefix_gate, a.key_padding_mask
    causal, softmax_scale, attn_bias = a.causal, a.softmax_scale, a.attn_bias
    dropout_p, seed = a.dropout_p, a.seed
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    dev = q.device
    dq, dk, dv = new_output_like(q), new_output_like(k), new_output_like(v)  # their layouts
    dpk = new_output((T, Hkv, P, D), prefix_k.dtype, dev)
    dpv = new_output((T, Hkv, P, D), prefix_v.dtype, dev)
    if q.numel() == 0:  # no query: every gradient is 0
        dg = None if prefix_gate is None else torch.zeros(B, 2, dtype=torch.float32, device=dev)
        ds = None if a.sinks is None else torch.zeros(H, dtype=torch.float32, device=dev)
        return dq, dk.zero_(), dv.zero_(), dpk.zero_(), dpv.zero_(), dg, ds
    _check_head_dim(q, D)
    lse = lse.contiguous()  # as forward wrote it (a no-op); out and grad_out: any strides
    cfg = _configs(q, D)
    BD = _block_d(D)
    prec = _precision(q)
    has_gate, has_mask = prefix_gate is not None, key_padding_mask is not None
    gate = q if prefix_gate is None else prefix_gate
    kpm = q if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    km_strides = (kpm.stride(0), kpm.stride(1)) if has_mask else (0, 0)
    bias, b_strides = _bias_args(attn_bias, q)
    has_bias = attn_bias is not None
    seed_t, drop = _dropout_args(dropout_p, seed, q)
    has_drop = dropout_p > 0
    qk_scale = softmax_scale * LOG2E
    do_strides = grad_out.stride()
    sinks, softcap, window = _feature_args(a, q)
    has_sinks, feature_flags = a.sinks is not None, _feature_flags(a)

    # 1. dQ, delta = rowsum(dO * O) (for step 2) and, from the same p and dS, each query
    # block's fp32 partials of d prefix_k / d prefix_v and of the gate gradients.
    BM, BN, warps, stages = cfg["dq"]
    n_m = triton.cdiv(Lq, BM)
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=dev)
    part_k = new_output((B, H, n_m, P, D), torch.float32, dev)
    part_v = new_output((B, H, n_m, P, D), torch.float32, dev)
    dg_part = new_output((B, H, n_m, 2), torch.float32, dev) if has_gate else q
    dsink_part = new_output((B, H, n_m), torch.float32, dev) if has_sinks else q
    _bwd_dq_kernel[(n_m, H, B)](
        q, k, v, prefix_k, prefix_v, prefix_index, gate, kpm, bias, seed_t, out, grad_out,
        lse, delta, dq, part_k, part_v, dg_part,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
        *out.stride(), *do_strides, *km_strides, *b_strides, *dq.stride(),
        H, H // Hkv, Lq, Lk, P, T, qk_scale, softmax_scale, *drop, sinks, dsink_part,
        softcap, window,
        HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, HAS_GATE=has_gate,
        HAS_MASK=has_mask, CAUSAL=causal, PRECISION=prec, EVEN_D=BD == D,
        HAS_BIAS=has_bias, DROPOUT=has_drop, HAS_SINKS=has_sinks, **feature_flags,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    # d sinks: the (B, n_query_blocks) partials of each head summed in a fixed order.
    dsinks = dsink_part.sum(dim=(0, 2)) if has_sinks else None

    # 2. dK/dV of the token keys: one program per (key block, kv head, example).
    BM, BN, warps, stages = cfg["dkdv"]
    if Lk > 0:
        _bwd_dkdv_kernel[(triton.cdiv(Lk, BN), Hkv, B)](
            q, k, v, grad_out, lse, delta, kpm, bias, seed_t, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *do_strides, *km_strides, *b_strides,
            *dk.stride(), *dv.stride(),
            H, Hkv, H // Hkv, Lq, Lk, P, qk_scale, softmax_scale, *drop, softcap, window,
            HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, HAS_MASK=has_mask,
            CAUSAL=causal, PRECISION=prec, HAS_BIAS=has_bias, DROPOUT=has_drop,
            **feature_flags, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    # 3. The partials summed per task (and the gate's per example) in a fixed order.
    dg = new_output((B, 2), torch.float32, dev) if has_gate else None
    N = P * D
    if (N > 0 or has_gate) and T > 0:
        SB, SG, sw, ss = cfg["psum"]
        _bwd_prefix_sum_kernel[(max(1, triton.cdiv(N, SB)), Hkv, T)](
            part_k, part_v, dg_part, prefix_index, dpk, dpv, q if dg is None else dg,
            B, Hkv, N, (H // Hkv) * n_m, H * n_m, T,
            BLOCK=SB, BLOCK_G=SG, HAS_GATE=has_gate, num_warps=sw, num_stages=ss,
        )  # fmt: skip
    return dq, dk, dv, dpk, dpv, dg, dsinks
