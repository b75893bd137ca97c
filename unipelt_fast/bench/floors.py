"""The floor under each op: minimal bytes and FLOPs, and the machine's measured limits.

Minimal bytes: every tensor a pass needs is read once and every tensor it produces is
written once (forward: the inputs, the output; backward: grad_out plus the forward inputs,
the gradients). Real kernels also save/read a few per-row statistics; those are left out,
so the floor is a lower bound. FLOPs count multiply-adds as 2.

floor_ms = max(bytes / bandwidth, flops / peak), with the bandwidth a device-to-device copy
and the peak a big matmul, both measured in the same run. ``floor_frac = floor_ms /
measured_ms``: 1.0 would be at the floor.
"""

from __future__ import annotations

import torch

from .shapes import Shape


def _causal_pairs(Lq: int, Lk: int, P: int, causal: bool) -> float:
    """(query, key) pairs that are computed per (batch, head); causal is bottom-right
    aligned (query i sees token keys j <= i + Lk - Lq), Lq <= Lk."""
    if not causal:
        return Lq * (P + Lk)
    return Lq * (P + Lk - Lq) + Lq * (Lq + 1) / 2


def op_cost(op: str, shape: Shape, dtype: torch.dtype) -> dict[str, float]:
    """Minimal bytes and FLOPs of ``op`` at ``shape``: keys bytes_fwd, bytes_bwd,
    flops_fwd, flops_bwd (and the fwd+bwd sums)."""
    e = torch.empty((), dtype=dtype).element_size()
    p = shape.params
    if op == "prefix_attention":
        B, H, L, P, D = p["B"], p["H"], p["L"], p["P"], p["D"]
        Hkv, Lq = p.get("Hkv", H), p.get("Lq", L)
        tq = B * H * Lq * D * e  # one of q, out, dout, dq
        tkv = B * Hkv * L * D * e  # one of k, v, dk, dv
        pre = Hkv * P * D * e  # one of prefix_k, prefix_v (shared by the batch)
        gate = B * 4
        fwd = tq + 2 * tkv + 2 * pre + gate + tq  # read q k v pk pv gate, write out
        # read q k v out dout pk pv gate; write dq dk dv dpk dpv dgate
        bwd = (3 * tq + 2 * tkv + 2 * pre + gate) + (tq + 2 * tkv + 2 * pre + gate)
        # Issue 3's count: 4 * pairs * D forward (QK^T and PV), fwd+bwd = 2.5x forward
        # (so the backward alone is 1.5x). Causal counts only the visible pairs.
        flops_fwd = 4.0 * B * H * D * _causal_pairs(Lq, L, P, p["causal"])
        flops_bwd = 1.5 * flops_fwd
    elif op in ("gated_adapter", "gated_adapter_mixed"):
        M, d, r = p["B"] * p["L"], p["d"], p["r"]
        params = (2 * d * r + r + d + d + 1) * e * p.get("T", 1)
        act = M * d * e
        fwd = act + params + act  # read x + params, write out
        bwd = (2 * act + params) + (act + params)  # read dout, x, params; write dx, dparams
        flops_fwd = 2.0 * M * d * r * 2 + 2.0 * M * d  # down, up, gate logits
        flops_bwd = 2.0 * flops_fwd
    elif op == "bias_only_linear":
        M, K, N = p["M"], p["K"], p["N"]
        fwd = (M * K + N * K + N) * e + M * N * e
        saved = M * N * e if p.get("activation") not in (None, "identity") else 0
        bwd = (M * N + N * K) * e + saved + (M * K + N) * e  # dy, W, act input; dx, db
        flops_fwd = 2.0 * M * K * N
        flops_bwd = 2.0 * M * K * N  # dx only: the weight is frozen
    elif op == "bias_only_layer_norm":
        M, N = p["M"], p["N"]
        fwd = (M * N + 2 * N) * e + M * N * e
        bwd = (2 * M * N + N) * e + 8 * M + (M * N + N) * e  # dy, x, gamma, mean/rstd; dx, db
        flops_fwd = flops_bwd = 0.0  # memory bound
    else:
        raise ValueError(f"unknown op {op!r}")
    return {
        "bytes_fwd": float(fwd),
        "bytes_bwd": float(bwd),
        "bytes_fwdbwd": float(fwd + bwd),
        "flops_fwd": flops_fwd,
        "flops_bwd": flops_bwd,
        "flops_fwdbwd": flops_fwd + flops_bwd,
    }


def floor_ms(bytes_: float, flops: float, bandwidth: float | None, peak: float | None):
    """The time the pass cannot beat, in ms (None without measured limits)."""
    if not bandwidth or not peak:
        return None
    return 1e3 * max(bytes_ / bandwidth, flops / peak)


def measure_limits(device: torch.device, dtypes, timer) -> dict:
    """Device-to-device copy bandwidth (bytes/s) and matmul peak (FLOP/s) per dtype,
    measured now with ``timer(fn) -> ms``. Empty on a CPU."""
    if device.type != "cuda":
        return {}
    n = 1 << 28  # 512 MiB of bf16 each way: far past L2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    bw = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    src = dst = None  # free 1 GiB before the matmuls
    peaks = {}
    N = 8192
    for dt in sorted({torch.bfloat16, *dtypes}, key=str):
        a = torch.randn(N, N, dtype=dt, device=device)
        b = torch.randn(N, N, dtype=dt, device=device)
        ms = timer(lambda a=a, b=b: a @ b)
        peaks[str(dt).replace("torch.", "")] = 2.0 * N**3 / (ms * 1e-3)
        del a, b
    torch.cuda.empty_cache()
    return {
        "bandwidth_bytes_per_s": bw,
        "peak_flops_per_s": peaks,
        "matmul_n": N,
        "copy_bytes": n * 2,
    }
