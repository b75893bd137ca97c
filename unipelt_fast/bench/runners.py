"""Inputs, the callable for each backend or peer, and the timing / memory measurements.

Every runnable is a zero-argument function returning the op's output from fixed inputs,
so the same callable serves the CLI and ``benchmarks/bench_*.py``.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import _tasks, ops
from .shapes import PA_FLAGS, Shape

KERNEL_BACKENDS = ("triton", "cuda")
PEERS = {
    "prefix_attention": ("sdpa_preconcat", "concat_mask_sdpa"),
    "gated_adapter_mixed": ("per_task_loop",),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}


def suite_env() -> tuple[torch.device, bool, torch.dtype]:
    """(device, quick, dtype) for the pytest-benchmark suites: the GPU shape tier and
    bfloat16 when CUDA is available, the tiny tier and float32 otherwise;
    ``UNIPELT_BENCH_DTYPE`` overrides the dtype."""
    cuda = torch.cuda.is_available()
    name = os.environ.get("UNIPELT_BENCH_DTYPE") or ("bfloat16" if cuda else "float32")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"UNIPELT_BENCH_DTYPE: unknown dtype {name!r}; choose from {list(DTYPES)}")
    return torch.device("cuda" if cuda else "cpu"), not cuda, DTYPES[name]


# The torch backend differs from eager only for prefix attention (SDPA); elsewhere it is eager.
COMPOSITE_OPS = ("prefix_attention",)


def impls_for(op: str) -> tuple[str, ...]:
    """Row order: eager first (the speedup baseline), compile, the torch composite, kernels,
    peers."""
    composite = ("torch",) if op in COMPOSITE_OPS else ()
    return ("eager", "compile", *composite, *KERNEL_BACKENDS, *PEERS.get(op, ()))


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


@dataclass
class OpCase:
    """Fixed inputs for one (op, shape, dtype); ``runner(impl)`` gives the callable."""

    op: str
    shape: Shape
    dtype: torch.dtype
    device: torch.device
    tensors: dict[str, torch.Tensor]
    kwargs: dict = field(default_factory=dict)
    leaves: list[torch.Tensor] = field(default_factory=list)  # requires_grad inputs
    grad_out: torch.Tensor | None = None

    def inputs(self) -> list[torch.Tensor]:
        return [t for t in self.tensors.values() if isinstance(t, torch.Tensor)]

    def runner(self, impl: str) -> Callable[[], torch.Tensor]:
        """The zero-argument callable for ``impl`` (raises if it cannot be built)."""
        if impl in ("eager", "torch", *KERNEL_BACKENDS):
            return _op_call(self, impl)
        if impl == "compile":
            # A fresh dynamo cache per row: every row's closure shares one code object,
            # and the recompile limit would otherwise silently fall back to eager.
            torch._dynamo.reset()
            if self.device.type == "cpu":  # no background compile workers on a small CPU
                torch._inductor.config.compile_threads = 1
            return torch.compile(_op_call(self, "eager"), dynamic=False)
        if impl in PEERS.get(self.op, ()):
            return _PEER_BUILDERS[impl](self)
        raise ValueError(f"{self.op}: unknown implementation {impl!r}")

    def zero_grads(self) -> None:
        for t in self.leaves:
            t.grad = None


def make_case(op: str, shape: Shape, dtype: torch.dtype, device, seed: int = 0) -> OpCase:
    """Random inputs (never zeros) for ``op`` at ``shape``."""
    device = torch.device(device)
    # Drawn on the device itself: the GPU shapes reach 2^28 elements.
    g = torch.Generator(device=device).manual_seed(seed)
    p = shape.params

    def randn(*s):
        return torch.randn(*s, generator=g, device=device)

    def rnd(*s, scale=1.0, grad=True, dt=dtype):
        return (randn(*s) * scale).to(dt).requires_grad_(grad)

    if op == "prefix_attention":
        B, H, L, P, D = p["B"], p["H"], p["L"], p["P"], p["D"]
        Hkv, Lq = p.get("Hkv", H), p.get("Lq", L)  # GQA, a decode step
        t = {
            "q": rnd(B, H, Lq, D),
            "k": rnd(B, Hkv, L, D),
            "v": rnd(B, Hkv, L, D),
            "prefix_k": rnd(Hkv, P, D),
            "prefix_v": rnd(Hkv, P, D),
            "prefix_gate": (torch.rand(B, generator=g, device=device) * 0.8 + 0.1).requires_grad_(
                True
            ),
        }
        kw = {"causal": p["causal"]}
        if p.get("dropout"):
            kw["dropout_p"] = p["dropout"]
        if "softcap" in p:
            kw["softcap"] = p["softcap"]
        if "window" in p:
            kw["window"] = p["window"]
        if p.get("sinks"):  # gpt-oss: one float32 sink logit per query head, trained
            t["sinks"] = torch.randn(H, generator=g, device=device).requires_grad_(True)
        out_shape = (B, H, Lq, D)
    elif op == "gated_adapter":
        B, L, d, r = p["B"], p["L"], p["d"], p["r"]
        t = {
            "x": rnd(B, L, d),
            "w_down": rnd(r, d, scale=d**-0.5),
            "b_down": rnd(r),
            "w_up": rnd(d, r, scale=r**-0.5),
            "b_up": rnd(d),
            "w_gate": rnd(1, d, scale=d**-0.5),
            "b_gate": rnd(1),
        }
        gate = p.get("gate", "token")
        kw = {"gate_mode": "token" if gate == "none" else gate, "activation": "relu"}
        if gate == "none":
            del t["w_gate"], t["b_gate"]
        if gate == "mean":  # right padding: example b keeps its first L - b * L // (2 B) tokens
            keep = L - torch.arange(B, device=device)[:, None] * (L // (2 * B))
            kw["gate_mask"] = torch.arange(L, device=device)[None, :] < keep
        out_shape = (B, L, d)
    elif op == "gated_adapter_mixed":
        B, L, d, r, T = p["B"], p["L"], p["d"], p["r"], p["T"]
        t = {
            "x": rnd(B, L, d),
            "w_down": rnd(T, r, d, scale=d**-0.5),
            "b_down": rnd(T, r),
            "w_up": rnd(T, d, r, scale=r**-0.5),
            "b_up": rnd(T, d),
            "w_gate": rnd(T, 1, d, scale=d**-0.5),
            "b_gate": rnd(T, 1),
        }
        # Every task present, spread over the batch (the worst case for a per-task loop).
        kw = {"gate_mode": "token", "activation": "relu"}
        kw["adapter_index"] = torch.arange(B, device=device) % T
        out_shape = (B, L, d)
    elif op == "bias_only_linear":
        M, K, N = p["M"], p["K"], p["N"]
        t = {"x": rnd(M, K), "weight": rnd(N, K, scale=K**-0.5, grad=False), "bias": rnd(N)}
        kw = {"activation": p.get("activation")}
        out_shape = (M, N)
    elif op == "bias_only_layer_norm":
        M, N = p["M"], p["N"]
        t = {"x": rnd(M, N), "weight": 1 + rnd(N, scale=0.1, grad=False), "bias": rnd(N)}
        t["weight"] = t["weight"].detach()
        kw = {}
        out_shape = (M, N)
    else:
        raise ValueError(f"unknown op {op!r}")
    leaves = [v for v in t.values() if v.requires_grad]
    grad_out = randn(*out_shape).to(dtype)
    return OpCase(op, shape, dtype, device, t, kw, leaves, grad_out)


def _op_call(case: OpCase, backend: str) -> Callable[[], torch.Tensor]:
    t, kw = case.tensors, case.kwargs
    if case.op == "prefix_attention":
        return lambda: ops.prefix_attention(
            t["q"],
            t["k"],
            t["v"],
            t["prefix_k"],
            t["prefix_v"],
            prefix_gate=t["prefix_gate"],
            sinks=t.get("sinks"),
            backend=backend,
            **kw,
        )
    if case.op in ("gated_adapter", "gated_adapter_mixed"):
        return lambda: ops.gated_adapter(
            t["x"],
            t["w_down"],
            t["b_down"],
            t["w_up"],
            t["b_up"],
            w_gate=t.get("w_gate"),
            b_gate=t.get("b_gate"),
            backend=backend,
            **kw,
        )
    if case.op == "bias_only_linear":
        return lambda: ops.bias_only_linear(t["x"], t["weight"], t["bias"], backend=backend, **kw)
    return lambda: ops.bias_only_layer_norm(t["x"], t["weight"], t["bias"], backend=backend)


# ---- prefix attention peers ----------------------------------------------------------------


def _lower_right_causal(L: int, S: int, device):
    """SDPA mask for "query i sees key j iff j <= i + (S - L)": prefix always visible."""
    try:  # torch >= 2.3: lets SDPA keep its fused kernels
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(L, S)
    except ImportError:  # pragma: no cover - older torch
        i = torch.arange(L, device=device)[:, None]
        return torch.arange(S, device=device)[None, :] <= i + (S - L)


def _no_peer_for(case: OpCase, flags: tuple[str, ...], peer: str) -> None:
    """A peer that cannot compute a flag raises (the row is reported unavailable with this
    reason) rather than timing a different computation."""
    on = [f for f in flags if f in case.shape.params]
    if on:
        raise NotImplementedError(f"{peer}: no {'/'.join(on)} in SDPA; not comparable")


def _sdpa_preconcat(case: OpCase) -> Callable[[], torch.Tensor]:
    """The lower bound a framework could reach: K/V already hold the gated prefix (built
    once, outside the timed call); one SDPA call. Gradients go to the concatenated K/V."""
    _no_peer_for(case, PA_FLAGS, "sdpa_preconcat")  # window would need a mask: not flash
    t, p = case.tensors, case.shape.params
    B = p["B"]
    with torch.no_grad():
        g = t["prefix_gate"].to(case.dtype)[:, None, None, None]
        pk = t["prefix_k"].unsqueeze(0).expand(B, -1, -1, -1) * g
        pv = t["prefix_v"].unsqueeze(0).expand(B, -1, -1, -1) * g
        kk = torch.cat([pk, t["k"]], dim=2).requires_grad_(True)
        vv = torch.cat([pv, t["v"]], dim=2).requires_grad_(True)
    q = t["q"]
    case.tensors["_k_cat"], case.tensors["_v_cat"] = kk, vv
    case.leaves += [kk, vv]
    kw = _gqa_kw(q, kk) | {"dropout_p": p.get("dropout", 0.0)}
    if p["causal"]:
        kw["attn_mask"] = _lower_right_causal(q.shape[2], kk.shape[2], q.device)
    return lambda: F.scaled_dot_product_attention(q, kk, vv, **kw)


def _gqa_kw(q: torch.Tensor, k: torch.Tensor) -> dict:
    """SDPA's own GQA (torch >= 2.5) when the key/value heads are fewer than the query's."""
    return {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}


def _concat_mask_sdpa(case: OpCase) -> Callable[[], torch.Tensor]:
    """What peft / adapters do on every call: gate and broadcast the prefix, torch.cat it
    onto K/V, build a (P + L)-wide boolean mask, then SDPA with that mask; a sliding
    window is one more term of that mask."""
    _no_peer_for(case, ("softcap", "sinks"), "concat_mask_sdpa")
    t, p = case.tensors, case.shape.params
    B, L, P, causal = p["B"], p["L"], p["P"], p["causal"]
    Lq, window = p.get("Lq", L), p.get("window")

    def run():
        g = t["prefix_gate"].to(case.dtype)[:, None, None, None]
        pk = t["prefix_k"].unsqueeze(0).expand(B, -1, -1, -1) * g
        pv = t["prefix_v"].unsqueeze(0).expand(B, -1, -1, -1) * g
        kk = torch.cat([pk, t["k"]], dim=2)
        vv = torch.cat([pv, t["v"]], dim=2)
        tok = torch.ones(B, 1, Lq, L, dtype=torch.bool, device=kk.device)
        if causal:  # bottom-right aligned, as the op
            tok = torch.tril(tok, diagonal=L - Lq)
        if window is not None:  # query i sees token key j iff (i + L - Lq) - j < window
            i = torch.arange(Lq, device=kk.device)[:, None] + (L - Lq)
            tok = tok & (i - torch.arange(L, device=kk.device)[None, :] < window)
        mask = torch.cat([tok.new_ones(B, 1, Lq, P), tok], dim=-1)
        kw = _gqa_kw(t["q"], kk) | {"dropout_p": p.get("dropout", 0.0)}
        return F.scaled_dot_product_attention(t["q"], kk, vv, attn_mask=mask, **kw)

    return run


def _per_task_loop(case: OpCase) -> Callable[[], torch.Tensor]:
    """The routing before adapter_index: one gated_adapter call per task present, on its
    rows (``unique`` / ``nonzero`` read the host), results put back in batch order."""
    t, kw = case.tensors, dict(case.kwargs)
    idx = kw.pop("adapter_index")
    # The kernels on a GPU; eager on CPU (never the interpreter: its times are no figure).
    kw["backend"] = "auto" if case.device.type == "cuda" else "eager"

    def one(task: int, rows: torch.Tensor | None) -> torch.Tensor:
        return ops.gated_adapter(
            _tasks.select(t["x"], rows),
            *(t[k][task] for k in ("w_down", "b_down", "w_up", "b_up")),
            w_gate=t["w_gate"][task],
            b_gate=t["b_gate"][task],
            **kw,
        )

    return lambda: _tasks.run_per_task(one, idx)


_PEER_BUILDERS = {
    "sdpa_preconcat": _sdpa_preconcat,
    "concat_mask_sdpa": _concat_mask_sdpa,
    "per_task_loop": _per_task_loop,
}


# ---- measurement ---------------------------------------------------------------------------


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes of storage a tensor view actually spans (an expanded view counts once)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True))
    return span * t.element_size()


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """``t``, or the plain tensors a wrapper subclass holds (a torchao-quantized weight has no
    storage of its own: its int8 values and scales do)."""
    if not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [leaf for name in names for leaf in _plain_tensors(getattr(t, name))]


def saved_bytes(
    fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]
) -> tuple[int, int, torch.Tensor]:
    """Run ``fn`` once, counting what autograd saves for backward.

    Returns (all saved bytes, saved bytes that are not the inputs' storage, output).
    Views of one storage count once (the largest span among them). Inputs and weights are
    alive anyway; the second number is the activation memory the op adds.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        for leaf in _plain_tensors(t):
            if leaf.numel():
                key = _storage_key(leaf)
                seen[key] = max(seen.get(key, 0), _span_bytes(leaf))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    own = {_storage_key(leaf) for t in inputs for leaf in _plain_tensors(t) if leaf.numel()}
    total = sum(seen.values())
    extra = sum(v for k, v in seen.items() if k not in own)
    return total, extra, out


def cuda_peak_bytes(case: OpCase, fn: Callable[[], torch.Tensor]) -> int:
    """Peak CUDA memory of one forward + backward, over what was allocated before it."""
    case.zero_grads()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn().backward(case.grad_out)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    case.zero_grads()
    return int(peak)


class Timing(float):
    """A median in ms that also carries the spread over the repeats: ``p25`` / ``p75``, the
    interquartile range (both equal the median when there was a single repeat)."""

    def __new__(cls, median: float, p25: float | None = None, p75: float | None = None):
        t = super().__new__(cls, median)
        t.p25 = float(median if p25 is None else p25)
        t.p75 = float(median if p75 is None else p75)
        return t


def _iqr(times: list[float], scale: float = 1.0) -> Timing:
    """Median and quartiles of repeated timings (``scale`` converts them to ms)."""
    times = [t * scale for t in times]
    med = statistics.median(times)
    if len(times) < 2:
        return Timing(med)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return Timing(med, q1, q3)


@dataclass
class TimerCfg:
    """do_bench warmup / rep in ms on a GPU; torch.utils.benchmark's min run time on CPU."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_min_run_s: float = 0.2


def make_timer(device: torch.device, cfg: TimerCfg) -> tuple[str, Callable]:
    """``(name, timer)`` where ``timer(fn, grad_to_none=None) -> Timing`` (median ms, with
    its interquartile range over the repeats)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except Exception:  # noqa: BLE001 - no triton: CUDA events
            do_bench = None
        if do_bench is not None:

            def t_gpu(fn, grad_to_none=None):
                # quantiles=[0.5] is the median on every triton >= 2.1 (return_mode came
                # later); it returns a float for one quantile, a list on some versions.
                ms = do_bench(
                    fn,
                    warmup=cfg.warmup_ms,
                    rep=cfg.rep_ms,
                    grad_to_none=grad_to_none,
                    quantiles=[0.5, 0.25, 0.75],
                )
                if not isinstance(ms, (list, tuple)):
                    return Timing(float(ms))
                return Timing(*(float(m) for m in ms[:3]))

            return "triton.testing.do_bench", t_gpu

        def t_events(fn, grad_to_none=None):
            times = []
            for i in range(25):
                for t in grad_to_none or ():
                    t.grad = None
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                if i >= 5:
                    times.append(a.elapsed_time(b))
            return _iqr(times)

        return "cuda events", t_events

    from torch.utils import benchmark

    def t_cpu(fn, grad_to_none=None):
        leaves = list(grad_to_none or ())

        def stmt():
            for t in leaves:
                t.grad = None
            fn()

        timer = benchmark.Timer(
            stmt="stmt()", globals={"stmt": stmt}, num_threads=torch.get_num_threads()
        )
        m = timer.blocked_autorange(min_run_time=cfg.cpu_min_run_s)
        return _iqr(list(m.times), 1e3)  # per-run seconds of each block

    return "torch.utils.benchmark", t_cpu


def record(row: dict, key: str, t: float) -> None:
    """``row[key]`` = the median; ``key_p25`` / ``key_p75`` = its spread, when known."""
    row[key] = float(t)
    if isinstance(t, Timing):
        row[f"{key}_p25"], row[f"{key}_p75"] = t.p25, t.p75


def time_passes(case: OpCase, fn: Callable[[], torch.Tensor], timer) -> dict[str, float]:
    """Median ms (and quartiles) of forward (with autograd recording), backward and
    forward + backward, each timed on its own (so fwd + bwd need not equal fwd+bwd)."""
    g = case.grad_out
    res: dict = {}
    record(res, "fwd_ms", timer(fn))
    record(res, "fwdbwd_ms", timer(lambda: fn().backward(g), grad_to_none=case.leaves))
    try:
        out = fn()
        bwd = timer(lambda: out.backward(g, retain_graph=True), grad_to_none=case.leaves)
        record(res, "bwd_ms", bwd)
        out = None
    except RuntimeError:  # a graph that cannot be retained: fwd+bwd minus fwd
        res["bwd_ms"] = max(res["fwdbwd_ms"] - res["fwd_ms"], 0.0)
        res["bwd_derived"] = True
    case.zero_grads()
    return res


def first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def wall_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
