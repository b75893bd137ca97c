"""The staged GPU check behind ``bash benchmarks/gpu_check.sh`` (docs/gpu-check.md).

Each stage is a subcommand that appends one JSON line per case to its file in OUTDIR (one
``os.write`` of a whole line, then fsync), so a stage cut short by ``timeout -s INT`` still
leaves every case it finished, and nothing half-written:

  env       env.txt       versions, the GPU, the commit, the results folder's name
  smoke     smoke.jsonl   A: every op on triton and cuda in each dtype at a realistic and an
                          odd shape against the float64 reference (outputs and gradients)
  bench     bench.jsonl   B: the headline timings against their peers and floors
  models    models.jsonl  C: a training step and an inference step per model
  summary   summary.md    from the files above, check.log's stage lines and tests.log

Not stages: ``variants`` counts the Triton compile variants stages A and B launch (the
resources machinery, no GPU); ``table`` writes the README's GPU table from a results folder
(``benchmarks/results/<device>/``). ``GPU_CHECK_DRY=1``: CPU, tiny shapes, fp32/fp16.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .. import _atomic
from .report import _finite, device_name, device_slug, git_commit, versions
from .runners import TimerCfg, dtype_name, first_line, make_case, make_timer
from .shapes import SHAPES, Shape, _pa, decode_shape

FILES = {
    "env": "env.txt",
    "log": "check.log",
    "A": "smoke.jsonl",
    "B": "bench.jsonl",
    "C": "models.jsonl",
    "D": "tests.log",
    "summary": "summary.md",
}
MAX_FILES = 8  # what the device tool brings back from $OUT
# Triton compiles stages A and B may trigger (``variants``; tests/test_gpu_check.py). At the
# ~0.67 s an sm_90 compile took on a CPU here, 150 are ~100 s of the 270 s A and B have;
# they share one TRITON_CACHE_DIR, so a variant both launch compiles once.
COMPILE_BUDGET = 150
LEGAL_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
BEGIN, END = "<!-- gpu-table:start -->", "<!-- gpu-table:end -->"
OPS = ("prefix_attention", "gated_adapter", "bias_only_linear", "bias_only_layer_norm")


def dry() -> bool:
    return os.environ.get("GPU_CHECK_DRY", "0") == "1"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not dry() else "cpu")


# ---- files that survive a kill ---------------------------------------------------------------


def emit(path: str, row: dict) -> None:
    """Append ``row`` as one JSON line: one write of the whole line, then fsync."""
    line = json.dumps(_finite(row), allow_nan=False, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str) -> list[dict]:
    """Every complete line of a stage file (a missing file: no rows). A last line without
    its newline (a kill between write and fsync cannot make one, but a full disk can) is
    dropped; any other bad line raises."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")
    return [json.loads(x) for x in lines[:-1] if x.strip()]


def write_atomic(path: str, text: str) -> None:
    """A reader sees the old or the new file (unique temp name: the watchdog and the script
    may pack at the same time)."""
    _atomic.write_text(path, text)


# ---- stage 0: env.txt --------------------------------------------------------------------------


def env_text(extra: list[str]) -> str:
    dev = _device()
    name = device_name(dev)
    lines = [f"device: {name}", f"device_slug: {device_slug(name)}"]
    commit = os.environ.get("GPU_CHECK_COMMIT") or git_commit()
    lines.append(f"commit: {commit or 'unknown (pass GPU_CHECK_COMMIT=$(git rev-parse HEAD))'}")
    lines += [f"{k}: {v}" for k, v in versions().items()]
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        lines.append(
            f"gpu: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
            f"{p.total_memory / 2**30:.1f} GiB"
        )
    lines.append(f"dry_run: {dry()}")
    lines.append(f"date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    return "\n".join(lines + extra) + "\n"


# ---- stage A: correctness smoke -----------------------------------------------------------------

POSITIONAL = {
    "prefix_attention": ("q", "k", "v", "prefix_k", "prefix_v"),
    "gated_adapter": ("x", "w_down", "b_down", "w_up", "b_up"),
    "bias_only_linear": ("x", "weight", "bias"),
    "bias_only_layer_norm": ("x", "weight", "bias"),
}


@dataclass(frozen=True)
class Smoke:
    """One smoke case: an op, its size parameters and the features it switches on."""

    op: str
    label: str
    params: dict = field(hash=False, compare=False)
    every_dtype: bool = False  # else the first dtype only (bf16 on a GPU): compile time


def _pa_params(B, H, Hkv, L, P, D, **flags) -> dict:
    return {"B": B, "H": H, "Hkv": Hkv, "L": L, "P": P, "D": D, **flags}


def smoke_cases(tiny: bool) -> list[Smoke]:
    """Each op at a realistic shape (every feature one at a time) and at an odd shape
    (sizes that are no multiple of a tile, the features together)."""
    if tiny:
        real, odd = (2, 2, 2, 16, 4, 16), (3, 2, 1, 11, 3, 24)
        ga_real, ga_odd = (2, 8, 32, 8), (3, 5, 40, 12)
        lin_real, lin_odd = (32, 64, 96), (13, 24, 40)
        ln_real, ln_odd = (32, 96), (13, 50)
    else:
        real, odd = (2, 16, 16, 512, 32, 128), (3, 6, 2, 77, 7, 80)
        ga_real, ga_odd = (4, 128, 768, 64), (3, 37, 200, 24)
        lin_real, lin_odd = (512, 768, 3072), (37, 100, 130)
        ln_real, ln_odd = (512, 768), (37, 1000)
    B, H, _, L, P, D = real
    pa = [
        Smoke("prefix_attention", "base", _pa_params(*real), every_dtype=True),
        Smoke("prefix_attention", "dropout", _pa_params(*real, dropout=0.1)),
        Smoke("prefix_attention", "attn_bias", _pa_params(*real, bias=True)),
        Smoke("prefix_attention", "gqa", _pa_params(B, H, max(1, H // 4), L, P, D)),
        Smoke("prefix_attention", "causal+padding", _pa_params(*real, causal=True, pad=True)),
        Smoke("prefix_attention", "prefix_index", _pa_params(*real, tasks=3)),
    ]
    all_on = dict(causal=True, pad=True, tasks=3)
    pa += [
        Smoke("prefix_attention", "odd causal+padding+index", _pa_params(*odd, **all_on), True),
        Smoke("prefix_attention", "odd attn_bias", _pa_params(*odd, **all_on, bias=True)),
        Smoke("prefix_attention", "odd dropout", _pa_params(*odd, causal=True, dropout=0.1)),
    ]

    def ga(label, shape, every=False, **kw):
        B, L, d, r = shape
        return Smoke("gated_adapter", label, {"B": B, "L": L, "d": d, "r": r, **kw}, every)

    adapters = [
        ga("gate=token", ga_real, True, gate="token"),
        ga("gate=mean", ga_real, gate="mean"),
        ga("no gate", ga_real, gate=None),
        ga("adapter_index", ga_real, gate="token", tasks=3),
        ga("odd mean+adapter_index", ga_odd, True, gate="mean", tasks=3, activation="gelu"),
    ]
    lin = [
        Smoke(
            "bias_only_linear", "gelu", dict(zip("MKN", lin_real, strict=True), act="gelu"), True
        ),
        Smoke(
            "bias_only_linear", "odd relu", dict(zip("MKN", lin_odd, strict=True), act="relu"), True
        ),
    ]
    ln = [
        Smoke("bias_only_layer_norm", "base", dict(zip("MN", ln_real, strict=True)), True),
        Smoke("bias_only_layer_norm", "odd", dict(zip("MN", ln_odd, strict=True)), True),
    ]
    return pa + adapters + lin + ln


def smoke_inputs(case: Smoke, device, gen: torch.Generator) -> tuple[dict, dict, tuple]:
    """float32 inputs: (positional by name, keyword, names of the differentiated ones)."""
    p = case.params

    def rnd(*s, scale=1.0):
        return torch.randn(*s, generator=gen, device=device) * scale

    if case.op == "prefix_attention":
        B, H, Hkv, L, P, D = (p[k] for k in ("B", "H", "Hkv", "L", "P", "D"))
        T = p.get("tasks")
        lead = (T,) if T else ()
        a = {
            "q": rnd(B, H, L, D),
            "k": rnd(B, Hkv, L, D),
            "v": rnd(B, Hkv, L, D),
            "prefix_k": rnd(*lead, Hkv, P, D),
            "prefix_v": rnd(*lead, Hkv, P, D),
        }
        kw: dict = {"prefix_gate": torch.rand(B, 2, generator=gen, device=device) + 0.2}
        kw["causal"] = bool(p.get("causal"))
        if T:
            kw["prefix_index"] = torch.arange(B, device=device) % T
        if p.get("pad"):  # right padding, example b loses b * L // (2 B) tokens
            keep = L - torch.arange(B, device=device)[:, None] * (L // (2 * B))
            kw["key_padding_mask"] = torch.arange(L, device=device)[None, :] < keep
        if p.get("bias"):  # T5-like: (1, H, L, P + L), broadcast over the batch, frozen
            kw["attn_bias"] = rnd(1, H, L, P + L, scale=0.5)
        if p.get("dropout"):
            kw["dropout_p"] = p["dropout"]
        return a, kw, ("q", "k", "v", "prefix_k", "prefix_v", "prefix_gate")
    if case.op == "gated_adapter":
        B, L, d, r = p["B"], p["L"], p["d"], p["r"]
        T = p.get("tasks")
        lead = (T,) if T else ()
        a = {
            "x": rnd(B, L, d),
            "w_down": rnd(*lead, r, d, scale=d**-0.5),
            "b_down": rnd(*lead, r, scale=0.1),
            "w_up": rnd(*lead, d, r, scale=r**-0.5),
            "b_up": rnd(*lead, d, scale=0.1),
        }
        kw = {"activation": p.get("activation", "relu")}
        if p.get("gate"):
            kw.update(w_gate=rnd(*lead, 1, d, scale=d**-0.5), b_gate=rnd(*lead, 1))
            kw["gate_mode"] = p["gate"]
        if p.get("gate") == "mean":
            keep = L - torch.arange(B, device=device)[:, None] * (L // (2 * B))
            kw["gate_mask"] = torch.arange(L, device=device)[None, :] < keep
        if T:
            kw["adapter_index"] = torch.arange(B, device=device) % T
        diff = ("x", "w_down", "b_down", "w_up", "b_up")
        diff += ("w_gate", "b_gate") if p.get("gate") else ()
        return a, kw, diff
    if case.op == "bias_only_linear":
        M, K, N = p["M"], p["K"], p["N"]
        a = {"x": rnd(M, K), "weight": rnd(N, K, scale=K**-0.5), "bias": rnd(N, scale=0.1)}
        return a, {"activation": p["act"]}, ("x", "bias")
    M, N = p["M"], p["N"]
    a = {"x": rnd(M, N), "weight": 1 + rnd(N, scale=0.1), "bias": rnd(N, scale=0.1)}
    return a, {}, ("x", "bias")


def _cast(d: dict, dtype: torch.dtype, diff: tuple) -> dict:
    out = {}
    for n, t in d.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().to(dtype).requires_grad_(n in diff)
        out[n] = t
    return out


def _public(op: str) -> Callable:
    import unipelt_fast

    return getattr(unipelt_fast, op)


def run_smoke(case: Smoke, backend: str, dtype: torch.dtype, device, seed: int) -> dict:
    """``backend`` in ``dtype`` against the float64 reference on the same (dtype-rounded)
    inputs: the relative norm error of the output and of every differentiated input."""
    from .. import reference
    from ..testing import rel_err, tolerance

    gen = torch.Generator(device=device).manual_seed(seed)
    args, kw, diff = smoke_inputs(case, device, gen)
    targs, tkw = _cast(args, dtype, diff), _cast(kw, dtype, diff)
    rargs, rkw = _cast(targs, torch.float64, diff), _cast(tkw, torch.float64, diff)
    torch.manual_seed(seed)
    out = _public(case.op)(*targs.values(), backend=backend, **tkw)
    if tkw.get("dropout_p"):  # the kernel's keep-mask for the seed this call drew
        from .. import ops
        from ..kernels.prefix_attention import dropout_keep_mask

        torch.manual_seed(seed)
        s = ops.dropout_seed(device)
        q, k, pk = targs["q"], targs["k"], targs["prefix_k"]
        B, H, Lq, _ = q.shape
        rkw["dropout_mask"] = dropout_keep_mask(
            s, B, H, Lq, pk.shape[-2], k.shape[2], tkw["dropout_p"]
        )
    expected = getattr(reference, case.op)(*rargs.values(), **rkw)
    errs = {"out": rel_err(out, expected)}
    g = torch.randn(expected.shape, generator=gen, device=device).to(dtype)
    names = [n for n in diff if n in targs or n in tkw]
    tleaves = [{**targs, **tkw}[n] for n in names]
    rleaves = [{**rargs, **rkw}[n] for n in names]
    gt = torch.autograd.grad(out, tleaves, g, allow_unused=True)
    gr = torch.autograd.grad(expected, rleaves, g.double(), allow_unused=True)
    for n, a, e, leaf in zip(names, gt, gr, rleaves, strict=True):
        e = torch.zeros_like(leaf) if e is None else e
        a = torch.zeros_like(leaf) if a is None else a
        errs[f"grad_{n}"] = rel_err(a, e)
    tol = tolerance(dtype)
    worst = max(errs.values()) / tol
    return {"errors": errs, "tol": tol, "worst": worst, "status": "pass" if worst <= 1 else "fail"}


def smoke_dtypes(case: Smoke, i: int, tiny: bool) -> tuple[torch.dtype, ...]:
    """The dtypes case ``i`` runs in: every one or the first only (``case.every_dtype``);
    the dry run (bf16 is broken in the Triton interpreter) takes fp32 and fp16 in turn."""
    if tiny:
        return ((torch.float32, torch.float16)[i % 2],)
    dts = (torch.bfloat16, torch.float16, torch.float32)
    return dts if case.every_dtype else dts[:1]


def cuda_ready(device: torch.device, wait_s: float) -> str | None:
    """None when the CUDA extension can run, else why not. Waits up to ``wait_s`` for the
    background build (it writes its exit status to $GPU_CHECK_CUDA_RC)."""
    if device.type != "cuda":
        return "needs a CUDA GPU"
    from .. import _cuda

    rc_file = os.environ.get("GPU_CHECK_CUDA_RC")
    t_end = time.monotonic() + wait_s
    while rc_file and not os.path.exists(rc_file) and time.monotonic() < t_end:
        time.sleep(1.0)
    if _cuda.is_built():
        return None
    if rc_file and not os.path.exists(rc_file):
        return f"the CUDA extension was still building after {wait_s:.0f} s"
    return "the CUDA extension did not build (its log is in check.log)"


def stage_smoke(path: str) -> None:
    device = _device()
    tiny = device.type != "cuda"
    cases = smoke_cases(tiny)
    wait_s = float(os.environ.get("GPU_CHECK_CUDA_WAIT_S", "60"))
    for backend in ("triton", "cuda"):  # cuda last: its build runs in the background
        skip = cuda_ready(device, wait_s) if backend == "cuda" else None
        for i, case in enumerate(cases):
            for dt in smoke_dtypes(case, i, tiny):
                row = {"stage": "A", "op": case.op, "case": case.label, "backend": backend,
                       "dtype": dtype_name(dt), "params": case.params}  # fmt: skip
                t0 = time.perf_counter()
                if skip:
                    row.update(status="skipped", error=skip)
                else:
                    try:
                        row.update(run_smoke(case, backend, dt, device, seed=i))
                    except NotImplementedError as e:
                        row.update(status="unsupported", error=first_line(e))
                    except Exception as e:  # noqa: BLE001 - recorded, the stage goes on
                        row.update(status="error", error=first_line(e))
                        row["trace"] = traceback.format_exc(limit=-3)[-1500:]
                row["seconds"] = round(time.perf_counter() - t0, 3)
                emit(path, row)


# ---- stage B: headline timings ------------------------------------------------------------------


def bench_plan(tiny: bool) -> list[tuple[str, str, Shape, tuple[str, ...]]]:
    """(check id, op, shape, impls), highest value first; torch.compile last. ``tiny``: the
    dry run's plan, one small prefix_attention shape for both attention rows."""
    tier = "quick" if tiny else "gpu"
    pa = SHAPES["prefix_attention"][tier]
    pa_long, pa_enc = (_pa(1, 2, 16, 4, 16),) * 2 if tiny else (pa[0], pa[1])
    ga = SHAPES["gated_adapter"][tier][0]
    peers = ("triton", "sdpa_preconcat", "concat_mask_sdpa", "cuda")
    plan = [
        ("pa_long", "prefix_attention", pa_long, peers),
        ("pa_encoder", "prefix_attention", pa_enc, peers),
        ("decode", "prefix_attention", decode_shape(tiny), ("triton", "sdpa_preconcat", "cuda")),
        ("gated_adapter", "gated_adapter", ga, ("eager", "triton", "cuda")),
        ("bias_only_linear", "bias_only_linear", SHAPES["bias_only_linear"][tier][0],
         ("eager", "triton", "cuda")),
        ("bias_only_layer_norm", "bias_only_layer_norm",
         SHAPES["bias_only_layer_norm"][tier][0], ("eager", "triton", "cuda")),
        ("gated_adapter", "gated_adapter", ga, ("compile",)),
    ]  # fmt: skip
    return [r for r in plan if not (tiny and r[0] == "pa_encoder")]


def _decode_rows(op, shape, dtype, device, impls, timer, tname, limits) -> Iterator[dict]:
    """One decode step is inference: forward only, under no_grad, bytes-bound."""
    from . import floors
    from .suite import _skip_reason

    case = make_case(op, shape, dtype, device)
    for t in case.leaves:
        t.requires_grad_(False)
    cost = floors.op_cost(op, shape, dtype)
    bw = limits.get("bandwidth_bytes_per_s")
    peak = (limits.get("peak_flops_per_s") or {}).get(dtype_name(dtype))
    for impl in impls:
        row = {"kind": "op", "op": op, "shape": shape.label, "shape_params": dict(shape.params),
               "dtype": dtype_name(dtype), "impl": impl, "timer": tname, **cost}  # fmt: skip
        reason = _skip_reason(impl, device, dtype, quick=True)
        if reason is None:
            try:
                fn = case.runner(impl)
                with torch.no_grad():
                    fn()  # warm-up: compiles, autotunes
                    if not (impl == "triton" and device.type != "cuda"):
                        row["fwd_ms"] = float(timer(fn))
            except Exception as e:  # noqa: BLE001 - the row says why
                reason = first_line(e)
        row["available"], row["reason"] = reason is None, reason
        f = floors.floor_ms(cost["bytes_fwd"], cost["flops_fwd"], bw, peak)
        row["floor_ms_fwd"] = f
        row["floor_frac_fwd"] = f / row["fwd_ms"] if f and row.get("fwd_ms") else None
        yield row


def stage_bench(path: str) -> None:
    from . import floors
    from .suite import OpTask, run_op_task

    device = _device()
    tiny = device.type != "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    tname, timer = make_timer(device, TimerCfg(warmup_ms=10, rep_ms=60, cpu_min_run_s=0.01))
    limits = floors.measure_limits(device, [dtype], timer)
    emit(path, {"stage": "B", "kind": "limits", **limits})
    no_cuda = cuda_ready(device, 0)
    for cid, op, shape, impls in bench_plan(tiny):
        if "compile" in impls and tiny:
            emit(path, {"stage": "B", "check_id": cid, "kind": "op", "op": op,
                        "shape": shape.label, "impl": "compile", "available": False,
                        "reason": "dry run: torch.compile is not timed on CPU"})  # fmt: skip
            continue
        if no_cuda and "cuda" in impls:
            impls = tuple(i for i in impls if i != "cuda")
            emit(path, {"stage": "B", "check_id": cid, "kind": "op", "op": op,
                        "shape": shape.label, "impl": "cuda", "available": False,
                        "reason": no_cuda})  # fmt: skip
        t0 = time.perf_counter()
        if cid == "decode":
            rows = _decode_rows(op, shape, dtype, device, impls, timer, tname, limits)
        else:
            task = OpTask(op, shape, dtype, list(impls))
            rows = run_op_task(task, device, timer, tname, limits, quick=tiny)
        for r in rows:
            r.update(stage="B", check_id=cid, seconds=round(time.perf_counter() - t0, 3))
            emit(path, r)
            t0 = time.perf_counter()
    if device.type == "cuda":
        from .. import _autotune

        emit(path, {"stage": "B", "kind": "autotune", "chosen": _autotune.chosen()})


# ---- stage C: models ---------------------------------------------------------------------------

MODEL_NAMES = ("llama-1b-like", "bert-base")
MODEL_IMPLS = ("full_ft", "frozen_base", "unipelt_eager", "unipelt_fused", "peft_prefix")


def stage_models(path: str) -> None:
    from .suite import run_models

    device = _device()
    tiny = device.type != "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    tname, timer = make_timer(device, TimerCfg(warmup_ms=50, rep_ms=300, cpu_min_run_s=0.01))
    # The dry run (CI time): one model, without the peer and the fused rows (no GPU).
    impls = MODEL_IMPLS[:3] if tiny else MODEL_IMPLS
    for name in MODEL_NAMES[:1] if tiny else MODEL_NAMES:
        _, summary = run_models(
            [name], dtype, device, tiny, timer, tname,
            on_row=lambda r: emit(path, {"stage": "C", **r}), impls=impls,
        )  # fmt: skip
        emit(path, {"stage": "C", "kind": "model_summary", "op": name, **summary[name]})


# ---- summary and the README table --------------------------------------------------------------


def _rows(rows: list[dict], cid: str, impl: str) -> dict | None:
    for r in rows:
        if r.get("check_id") == cid and r.get("impl") == impl and r.get("available"):
            return r
    return None


def _why_missing(rows: list[dict], cid: str, impl: str) -> str:
    for r in rows:
        if r.get("check_id") == cid and r.get("impl") == impl and r.get("reason"):
            return f"{impl} did not run: {r['reason']}"
    return f"{impl} did not run (its stage ended first)"


def _tflops(r: dict, p: str) -> float | None:
    t = r.get(f"{p}_ms")
    return r[f"flops_{p}"] / (t * 1e-3) / 1e12 if t else None


@dataclass
class Target:
    key: str
    what: str
    target: str
    value: str = "-"
    met: bool | None = None
    reason: str = ""


def targets(bench: list[dict], model_rows: list[dict]) -> list[Target]:
    """Issue 30's targets (H100, bf16) beside what this run measured."""
    out: list[Target] = []

    def need(t: Target, cid: str, *impls: str) -> list[dict] | None:
        got = [_rows(bench, cid, i) for i in impls]
        for i, r in zip(impls, got, strict=True):
            if r is None:
                t.reason = _why_missing(bench, cid, i)
                return None
        return got  # type: ignore[return-value]

    for key, p, goal in (("pa_fwd", "fwd", 450), ("pa_fwdbwd", "fwdbwd", 340)):
        pas = "fwd" if p == "fwd" else "fwd+bwd"
        t = Target(key, f"prefix_attention {pas}, L=4096, P=64, D=128", f">= {goal} TFLOP/s")
        got = need(t, "pa_long", "triton")
        if got and _tflops(got[0], p) is not None:
            v = _tflops(got[0], p)
            t.value, t.met = f"{v:.0f} TFLOP/s", v >= goal
        out.append(t)

    def ratio(key, what, goal, cid, peer, passes=("fwd", "fwdbwd")):
        t = Target(key, what, f">= {goal:g}x")
        got = need(t, cid, "triton", peer)
        if got:
            ours, theirs = got
            rs = {p: theirs.get(f"{p}_ms") / ours[f"{p}_ms"] for p in passes
                  if ours.get(f"{p}_ms") and theirs.get(f"{p}_ms")}  # fmt: skip
            if rs:
                shown = (f"{p.replace('fwdbwd', 'fwd+bwd')} {v:.2f}x" for p, v in rs.items())
                t.value = ", ".join(shown)
                t.met = all(v >= goal for v in rs.values())
        out.append(t)

    ratio(
        "pa_vs_sdpa",
        "prefix_attention vs SDPA (flash) on pre-concatenated K/V, L=4096",
        1.0,
        "pa_long",
        "sdpa_preconcat",
    )
    ratio(
        "pa_vs_concat",
        "prefix_attention vs concat+mask+SDPA, L=512, P=32, B=16, H=16",
        1.25,
        "pa_encoder",
        "concat_mask_sdpa",
    )
    ratio("decode", "one decode step (Lq=1, Lk=8192, P=64, B=1, H=32, Hkv=8) vs SDPA on "
          "pre-concatenated K/V", 1.0, "decode", "sdpa_preconcat", passes=("fwd",))  # fmt: skip

    t = Target("ga_floor", "gated_adapter fwd+bwd, d=4096, r=64, M=16k", ">= 80% of the HBM floor")
    got = need(t, "gated_adapter", "triton")
    if got and got[0].get("floor_frac_fwdbwd"):
        f = got[0]["floor_frac_fwdbwd"]
        t.value, t.met = f"{100 * f:.0f}%", f >= 0.8
    out.append(t)
    for peer, goal in (("eager", 3.0), ("compile", 1.7)):
        ratio(f"ga_vs_{peer}", f"gated_adapter fwd+bwd vs {peer}", goal, "gated_adapter", peer,
              passes=("fwdbwd",))  # fmt: skip

    for cid in ("bias_only_layer_norm", "bias_only_linear"):
        t = Target(cid, f"{cid} fwd+bwd", ">= 85% of its floor (the non-GEMM part)")
        got = need(t, cid, "triton")
        if got and got[0].get("floor_frac_fwdbwd"):
            f = got[0]["floor_frac_fwdbwd"]
            t.value = f"{100 * f:.0f}%"
            if cid == "bias_only_layer_norm":
                t.met = f >= 0.85
            else:  # the GEMM's own time is in the figure: no verdict on the epilogue alone
                t.reason = "whole op incl. the GEMM; the non-GEMM part is not timed alone"
        out.append(t)

    fr: dict[str, dict] = {r["op"]: r for r in model_rows if r.get("kind") == "model_summary"}
    for name in MODEL_NAMES:
        s = fr.get(name, {})
        for key, what, goal in (
            ("unipelt_fused_train_frac_of_full_ft", "UniPELT training step", 0.40),
            ("unipelt_fused_infer_frac_of_frozen", "UniPELT inference", 1.05),
        ):
            base = "full fine-tuning" if "train" in key else "the frozen base model"
            t = Target(f"{name}:{key}", f"{what} ({name}, fused)",
                       f"<= {100 * goal:.0f}% of {base}")  # fmt: skip
            v = s.get(key)
            if v is None:
                mode = "train" if "train" in key else "infer"
                mine = [r for r in model_rows if r.get("op") == name and r.get("pass") == mode]
                why = [r["reason"] for r in mine if r.get("reason")]
                t.reason = why[0] if why else "the model stage did not reach this row"
            else:
                t.value, t.met = f"{100 * v:.0f}%", v <= goal
            out.append(t)
    for t in out:
        if t.met is False and not t.reason:
            t.reason = "not yet analysed"
        elif t.value == "-" and not t.reason:  # the rows ran, untimed
            t.reason = "ran without a timing (the Triton interpreter times nothing)"
    return out


def target_table(ts: list[Target], reasons: dict[str, str] | None = None) -> str:
    reasons = reasons or {}
    lines = ["| what | target | measured | met | reason |", "|---|---|---|---|---|"]
    for t in ts:
        met = {True: "yes", False: "**no**", None: "-"}[t.met]
        why = reasons.get(t.key, t.reason) if t.met is not True else ""
        lines.append(f"| {t.what} | {t.target} | {t.value} | {met} | {why} |")
    return "\n".join(lines)


def _stage_lines(log: str) -> dict[str, str]:
    """check.log's ``gpu_check: stage X ...`` lines, last one per stage."""
    out = {}
    if os.path.exists(log):
        with open(log, errors="replace") as f:
            for line in f:
                m = re.match(r"gpu_check: stage (\S+) (.*)", line.strip())
                if m:
                    out[m.group(1)] = m.group(2)
    return out


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def summary_text(outdir: str) -> str:
    p = {k: os.path.join(outdir, v) for k, v in FILES.items()}
    smoke, bench, mrows = (read_jsonl(p[k]) for k in ("A", "B", "C"))
    interrupted = [r["stage"] for r in smoke + bench + mrows if r.get("kind") == "interrupted"]
    smoke = [r for r in smoke if "status" in r]
    parts = ["# GPU check summary", ""]
    if os.path.exists(p["env"]):
        parts += ["```", open(p["env"]).read().rstrip(), "```", ""]
    stages = _stage_lines(p["log"])
    parts += ["## Stages", "", "| stage | status |", "|---|---|"]
    for s in ("0", "A", "B", "C", "D"):
        cut = " (interrupted: its last cases did not run)" if s in interrupted else ""
        parts.append(f"| {s} | {stages.get(s, 'did not run')}{cut} |")
    parts += ["", "## A: smoke (relative error / tolerance, vs float64)", ""]
    counts: dict[tuple, dict[str, int]] = {}
    for r in smoke:
        c = counts.setdefault((r["op"], r["backend"], r["dtype"]), {})
        c[r["status"]] = c.get(r["status"], 0) + 1
    parts += ["| op | backend | dtype | pass | fail | error | unsupported | skipped |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (op, be, dt), c in counts.items():
        cols = [str(c.get(k, 0)) for k in ("pass", "fail", "error", "unsupported", "skipped")]
        parts.append(f"| {op} | {be} | {dt} | " + " | ".join(cols) + " |")
    bad = [r for r in smoke if r["status"] in ("fail", "error")]
    if bad:
        parts += ["", "Failures:", ""]
        for r in bad:
            what = r.get("error") or ", ".join(
                f"{k} {v:.2e}" for k, v in r["errors"].items() if v > r["tol"]
            )
            parts.append(f"- {r['op']} [{r['case']}] {r['backend']} {r['dtype']}: {what}")
    parts += ["", "## B: headline targets", "", target_table(targets(bench, mrows)), ""]
    parts += ["| check | impl | shape | fwd ms | fwd+bwd ms | TFLOP/s fwd | GB/s fwd | floor frac "
              "fwd / fwd+bwd | note |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in bench:
        if r.get("kind") != "op":
            continue
        fwd = r.get("fwd_ms")
        gbs = r["bytes_fwd"] / (fwd * 1e-3) / 1e9 if fwd and r.get("bytes_fwd") else None
        ff = f"{_fmt(r.get('floor_frac_fwd'), '.2f')} / {_fmt(r.get('floor_frac_fwdbwd'), '.2f')}"
        note = r.get("reason") or r.get("note") or ""
        parts.append(
            f"| {r.get('check_id')} | {r['impl']} | {r.get('shape')} | {_fmt(fwd)} | "
            f"{_fmt(r.get('fwdbwd_ms'))} | {_fmt(_tflops(r, 'fwd') if fwd else None, '.1f')} | "
            f"{_fmt(gbs, '.0f')} | {ff} | {note[:90]} |"
        )
    parts += ["", "## C: models", "", "| model | impl | pass | ms | peak MiB | note |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in mrows:
        if r.get("kind") == "model":
            mem = r.get("peak_mem_bytes")
            parts.append(
                f"| {r['op']} | {r['impl']} | {r['pass']} | {_fmt(r.get('time_ms'))} | "
                f"{_fmt(mem / 2**20 if mem else None, '.0f')} | {(r.get('reason') or '')[:90]} |"
            )
    parts += ["", "## D: gpu tests", ""]
    if os.path.exists(p["D"]):
        with open(p["D"], errors="replace") as f:
            lines = f.read().splitlines()
        keep = [x for x in lines if x.startswith(("FAILED", "ERROR"))][:30]
        parts += ["```", *keep, *(lines[-3:] if lines else ["(empty)"]), "```"]
    else:
        parts.append("did not run")
    return "\n".join(parts) + "\n"


def pack(outdir: str) -> list[str]:
    """summary.md from what is there; stray temp files go, so at most MAX_FILES stay.
    Returns the problems left (illegal names, too many files)."""
    write_atomic(os.path.join(outdir, FILES["summary"]), summary_text(outdir))
    for n in os.listdir(outdir):  # left by a writer killed before its rename
        tmp = os.path.join(outdir, n)
        with contextlib.suppress(OSError):
            if n.endswith(".tmp") and time.time() - os.path.getmtime(tmp) > 30:
                os.remove(tmp)
    names = sorted(os.listdir(outdir))
    problems = [f"illegal name {n!r}" for n in names if not LEGAL_NAME.match(n)]
    if len(names) > MAX_FILES:
        problems.append(f"{len(names)} files (at most {MAX_FILES} come back): {names}")
    return problems


def readme_table(results_dir: str) -> str:
    """The README's GPU table from a committed results folder (``reasons.json`` there, when
    present, maps a target's key to why it was missed)."""
    bench = read_jsonl(os.path.join(results_dir, FILES["B"]))
    mrows = read_jsonl(os.path.join(results_dir, FILES["C"]))
    reasons = {}
    rp = os.path.join(results_dir, "reasons.json")
    if os.path.exists(rp):
        with open(rp) as f:
            reasons = json.load(f)
    env = {}
    ep = os.path.join(results_dir, FILES["env"])
    if os.path.exists(ep):
        with open(ep) as f:
            env = dict(x.split(": ", 1) for x in f.read().splitlines() if ": " in x)
    head = (
        f"Measured on {env.get('device', '?')} at commit {env.get('commit', '?')[:12]} "
        f"(torch {env.get('torch', '?')}, triton {env.get('triton', '?')}); generated by "
        f"`python3 -m unipelt_fast.bench.gpu_check table {results_dir}`."
    )
    return f"{head}\n\n{target_table(targets(bench, mrows), reasons)}\n"


def replace_between_markers(text: str, table: str) -> str:
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"gpu_check table: the file needs the markers {BEGIN} and {END}")
    a, rest = text.split(BEGIN, 1)
    _, b = rest.split(END, 1)
    return f"{a}{BEGIN}\n{table}{END}{b}"


# ---- compile variants (no GPU) ------------------------------------------------------------------


def count_variants(arch: int = 90) -> dict[str, int]:
    """Distinct Triton compiles (kernel x specialisation) that stages A and B launch on
    ``arch``, counted with the resources machinery on CPU tensors: stage A with autotuning
    pinned, stage B with every autotuning candidate (what autotuning compiles)."""
    from .. import _autotune, _backend, resources

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("gpu_check variants: run without TRITON_INTERPRET=1")
    saved = _backend.triton_interpret
    _backend.triton_interpret = lambda: True  # the ops layer lets triton take CPU tensors
    keys: dict[str, set] = {"A": set(), "B": set()}

    def record(stage: str, run: Callable[[], None]) -> None:
        launches: list = []
        with resources._recording(launches, arch):
            # A: UNIPELT_AUTOTUNE=0 (the default config only); B: every candidate
            _autotune.RECORD_ALL = stage == "B"
            os.environ["UNIPELT_AUTOTUNE"] = "1" if stage == "B" else "0"
            with contextlib.suppress(NotImplementedError):
                run()
        for _name, fn, a, kw in launches:
            options, sig, consts, attrs = resources._specialise(fn, a, kw, arch)
            job = dict(module=fn.__module__.rsplit(".", 1)[-1], kernel=_name, arch=arch,
                       signature=sig, constexprs=consts, attrs=attrs, options=options)  # fmt: skip
            keys[stage].add((_name, resources._job_key(job, fn)))

    cpu = torch.device("cpu")
    # bias_only_linear's GEMM is the vendor's (no Triton compile); at stage B's size it
    # would take ~20 s on a CPU, so it only allocates its result here.
    saved_mm = torch.addmm, torch.matmul
    torch.addmm = lambda bias, a, b, out=None: (
        a.new_empty(a.shape[0], b.shape[1]) if out is None else out
    )
    torch.matmul = lambda a, b: a.new_empty(*a.shape[:-1], b.shape[-1])
    try:
        for i, case in enumerate(smoke_cases(tiny=False)):
            for dt in smoke_dtypes(case, i, tiny=False):
                record("A", lambda c=case, d=dt, s=i: run_smoke_launches(c, d, cpu, s))
        for _cid, op, shape, impls in bench_plan(tiny=False):
            if "triton" in impls:
                record("B", lambda o=op, sh=shape: _bench_launches(o, sh))
    finally:
        _backend.triton_interpret = saved
        _autotune.RECORD_ALL = False
        torch.addmm, torch.matmul = saved_mm
    both = keys["A"] | keys["B"]
    per_kernel: dict[str, int] = {}
    for name, _ in sorted(both):
        per_kernel[name] = per_kernel.get(name, 0) + 1
    return {"A": len(keys["A"]), "B": len(keys["B"]), "A+B": len(both), "kernels": per_kernel}


def run_smoke_launches(case: Smoke, dtype, device, seed: int) -> None:
    """The triton launches of one smoke case (forward, backward, the keep-mask hook)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    args, kw, diff = smoke_inputs(case, device, gen)
    targs, tkw = _cast(args, dtype, diff), _cast(kw, dtype, diff)
    out = _public(case.op)(*targs.values(), backend="triton", **tkw)
    out.backward(torch.ones_like(out))
    if tkw.get("dropout_p"):
        from ..kernels.prefix_attention import dropout_keep_mask

        q, k, pk = targs["q"], targs["k"], targs["prefix_k"]
        B, H, Lq, _ = q.shape
        seed = torch.zeros(1, dtype=torch.long)
        dropout_keep_mask(seed, B, H, Lq, pk.shape[-2], k.shape[2], tkw["dropout_p"])


def _bench_launches(op: str, shape: Shape) -> None:
    case = make_case(op, shape, torch.bfloat16, "cpu")
    out = case.runner("triton")()
    if case.leaves and out.requires_grad:
        out.backward(case.grad_out)


# ---- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m unipelt_fast.bench.gpu_check")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("env", "smoke", "bench", "models", "summary"):
        s = sub.add_parser(name)
        s.add_argument("outdir")
        if name == "env":
            s.add_argument("--line", action="append", default=[], help="an extra env.txt line")
    t = sub.add_parser("table", help="the README's GPU table from benchmarks/results/<device>/")
    t.add_argument("results_dir")
    t.add_argument("--readme", help="replace the table between the markers in this file")
    sub.add_parser("variants", help="Triton compile variants of stages A and B (JSON)")
    a = ap.parse_args(argv)
    if a.cmd == "variants":
        print(json.dumps(count_variants()))
        return 0
    if a.cmd == "table":
        table = readme_table(a.results_dir)
        if a.readme:
            with open(a.readme) as f:
                text = f.read()
            write_atomic(a.readme, replace_between_markers(text, table))
        else:
            sys.stdout.write(table)
        return 0
    os.makedirs(a.outdir, exist_ok=True)
    if a.cmd == "env":
        write_atomic(os.path.join(a.outdir, FILES["env"]), env_text(a.line))
        return 0
    if a.cmd == "summary":
        problems = pack(a.outdir)
        for p in problems:
            print(f"gpu_check: {p}", file=sys.stderr)
        return 1 if problems else 0
    stages = {"smoke": ("A", stage_smoke), "bench": ("B", stage_bench)}
    key, fn = {**stages, "models": ("C", stage_models)}[a.cmd]
    path = os.path.join(a.outdir, FILES[key])
    try:
        fn(path)
    except KeyboardInterrupt:  # timeout -s INT: the finished cases are already on disk
        emit(path, {"stage": key, "kind": "interrupted"})
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
