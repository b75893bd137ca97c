"""The op-level and model-level runs: a list of tasks, each giving one row."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import floors, models
from .runners import (
    KERNEL_BACKENDS,
    TimerCfg,
    cuda_peak_bytes,
    dtype_name,
    first_line,
    impls_for,
    interpreter_on,
    make_case,
    saved_bytes,
    time_passes,
)
from .shapes import PA_FLAGS, Shape, shapes_for, tier

INTERP_NOTE = "Triton interpreter: saved bytes only, not a speed figure"


@dataclass
class OpTask:
    op: str
    shape: Shape
    dtype: torch.dtype
    impls: list[str]


def impl_kind(impl: str) -> str:
    if impl in ("eager", "torch", *KERNEL_BACKENDS):
        return "backend"
    return "compile" if impl == "compile" else "peer"


def plan_ops(ops, dtypes, device, quick, impls=None) -> list[OpTask]:
    tasks = []
    for op in ops:
        want = [i for i in impls_for(op) if impls is None or i in impls]
        for shape in shapes_for(op, device.type, quick):
            for dt in dtypes:
                tasks.append(OpTask(op, shape, dt, want))
    return tasks


def _skip_reason(impl: str, device: torch.device, dtype: torch.dtype, quick: bool) -> str | None:
    """Why a kernel row cannot run here (None: try it)."""
    if impl == "cuda" and device.type != "cuda":
        return "needs a CUDA GPU"
    if impl == "triton" and device.type != "cuda":
        if not interpreter_on():
            return "needs a CUDA GPU (or TRITON_INTERPRET=1 for saved bytes)"
        if tier(device.type, quick) != "quick":
            return "the Triton interpreter runs only at --quick sizes"
        if dtype == torch.bfloat16:
            return "bf16 is broken in the Triton interpreter"
    return None


def run_op_task(
    task: OpTask, device, timer, timer_name: str, limits: dict, quick: bool, on_row=None
) -> Iterator[dict]:
    """Rows for every impl of one (op, shape, dtype); speedups against eager's row."""
    case = make_case(task.op, task.shape, task.dtype, device)
    cost = floors.op_cost(task.op, task.shape, task.dtype)
    bw = limits.get("bandwidth_bytes_per_s")
    peak = (limits.get("peak_flops_per_s") or {}).get(dtype_name(task.dtype))
    eager: dict | None = None
    for impl in task.impls:
        row = {
            "kind": "op",
            "op": task.op,
            "shape": task.shape.label,
            "shape_params": dict(task.shape.params),
            "dtype": dtype_name(task.dtype),
            "impl": impl,
            "impl_kind": impl_kind(impl),
            "timer": timer_name,
            **cost,
        }
        reason = _skip_reason(impl, device, task.dtype, quick)
        interp = impl == "triton" and device.type != "cuda"
        if reason is None:
            try:
                _measure(row, case, impl, device, timer, interp)
            except Exception as e:  # noqa: BLE001 - not written yet, unsupported, or broken
                reason = first_line(e)
        row["available"] = reason is None
        row["reason"] = reason
        if interp and reason is None:
            row["note"] = INTERP_NOTE
        for p in ("fwd", "fwdbwd"):
            f = floors.floor_ms(cost[f"bytes_{p}"], cost[f"flops_{p}"], bw, peak)
            row[f"floor_ms_{p}"] = f
            t = row.get(f"{p}_ms")
            row[f"floor_frac_{p}"] = f / t if f is not None and t else None
        if impl == "eager":
            eager = row
        for p in ("fwd", "bwd", "fwdbwd"):
            base, t = (eager or {}).get(f"{p}_ms"), row.get(f"{p}_ms")
            row[f"speedup_{p}"] = base / t if base and t else None
        if on_row:
            on_row(row)
        yield row
        case.zero_grads()
        gc.collect()
    del case
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_mix_cost(rows: list[dict]) -> None:
    """gated_adapter_mixed rows: ``mix_cost_fwdbwd`` = fwd+bwd time over the same impl's
    T=1 row (same dtype), i.e. what mixing T tasks in one batch costs over a single task."""
    one = {
        (r["impl"], r["dtype"]): r.get("fwdbwd_ms")
        for r in rows
        if r.get("op") == "gated_adapter_mixed" and r["shape_params"].get("T") == 1
    }
    for r in rows:
        if r.get("op") != "gated_adapter_mixed":
            continue
        base, t = one.get((r["impl"], r["dtype"])), r.get("fwdbwd_ms")
        r["mix_cost_fwdbwd"] = t / base if base and t else None
        done = "of T=1" in (r.get("note") or "")  # called after every task: once per row
        if r["mix_cost_fwdbwd"] is not None and r["shape_params"]["T"] != 1 and not done:
            extra = f"x{r['mix_cost_fwdbwd']:.2f} of T=1"
            r["note"] = f"{r['note']}; {extra}" if r.get("note") else extra


def add_flag_cost(rows: list[dict]) -> None:
    """prefix_attention rows with softcap / sinks / window on: ``flag_cost_fwdbwd`` = fwd+bwd
    time over the same impl's row at the same shape with the flags off (same dtype), i.e.
    what the flags cost."""

    def key(r: dict, drop_flags: bool) -> tuple:
        p = {k: v for k, v in r["shape_params"].items() if not (drop_flags and k in PA_FLAGS)}
        return (r["impl"], r["dtype"], tuple(sorted(p.items())))

    pa = [r for r in rows if r.get("op") == "prefix_attention" and r.get("kind") == "op"]
    off = {key(r, False): r.get("fwdbwd_ms") for r in pa}
    for r in pa:
        if not any(f in r["shape_params"] for f in PA_FLAGS):
            continue
        base, t = off.get(key(r, True)), r.get("fwdbwd_ms")
        r["flag_cost_fwdbwd"] = t / base if base and t else None
        done = "of flags off" in (r.get("note") or "")  # called after every task: once per row
        if r["flag_cost_fwdbwd"] is not None and not done:
            extra = f"x{r['flag_cost_fwdbwd']:.2f} of flags off"
            r["note"] = f"{r['note']}; {extra}" if r.get("note") else extra


def _measure(row: dict, case, impl: str, device, timer, interp: bool) -> None:
    fn = case.runner(impl)
    case.zero_grads()
    fn().backward(case.grad_out)  # warm-up: compiles, autotunes; raises if unavailable
    case.zero_grads()
    total, extra, out = saved_bytes(fn, case.inputs())
    row["saved_bytes"], row["saved_extra_bytes"] = total, extra
    del out
    if interp:
        return
    if device.type == "cuda":
        row["peak_mem_bytes"] = cuda_peak_bytes(case, fn)
    row.update(time_passes(case, fn, timer))


def run_models(
    names,
    dtype,
    device,
    quick: bool,
    timer,
    timer_name: str,
    on_row=None,
    impls=None,
    base_quant: str | None = None,
) -> tuple[list[dict], dict]:
    """Every model row (``impls``: only these row names) of each model in ``names``, on a
    base quantized by ``base_quant`` (``models.BASE_QUANTS``) if given."""
    rows, summary = [], {}
    for name in names:
        mrows = []
        for impl, mode, how in models.MODEL_ROWS:
            if impls is not None and impl not in impls:
                continue
            r = models.run_model_row(
                name, impl, mode, how, quick, device, dtype, timer, base_quant=base_quant
            )
            r.update(kind="model", op=name, dtype=dtype_name(dtype), timer=timer_name)
            r.setdefault("impl_kind", "peer" if how in models.PEERS else "backend")
            if quick and r.get("available"):
                r["note"] = "tiny stand-in (--quick)"
            mrows.append(r)
            if on_row:
                on_row(r)
        fr = models.fractions(mrows)
        for r in mrows:
            key = f"{r['impl']}_{r['pass']}_frac_of_" + (
                "full_ft" if r["pass"] == "train" else "frozen"
            )
            r["frac_of_baseline"] = fr.get(key)
            if r["impl"] == "full_ft" or r["impl"] == "frozen_base":
                r["frac_of_baseline"] = 1.0 if r.get("available") else None
        summary[name] = fr
        rows += mrows
    return rows, summary


def model_timer_cfg(quick: bool, device: torch.device) -> TimerCfg:
    """Whole training steps take 10-1000 ms: longer do_bench windows than for one op."""
    if device.type == "cuda":
        return TimerCfg(warmup_ms=50 if quick else 200, rep_ms=200 if quick else 1500)
    return TimerCfg(cpu_min_run_s=0.1 if quick else 0.5)


def n_model_rows() -> int:
    return len(models.MODEL_ROWS)


ProgressFn = Callable[[str], None]
