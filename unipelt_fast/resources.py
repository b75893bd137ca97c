"""``unipelt-fast resources``: what each Triton kernel costs a GPU, computed without one.

Every launcher (``unipelt_fast.kernels.*.forward``/``backward``) is run on small CPU tensors
with its kernels replaced by recorders, once per arch, with the launchers picking the GPU
configs of that arch (every autotuning candidate: see ``_autotune.RECORD_ALL``). Each
recorded launch is then specialised by Triton's own launch binder (ints equal to 1 become
constants, pointers/strides/sizes divisible by 16 get divisibility hints; num_warps and
num_stages as launched, Triton's defaults where the launcher gives none) and compiled for
sm_80 / sm_90 by Triton's compiler, which needs no GPU. ptxas reports registers and spills;
Triton's metadata the shared memory. So the report is of exactly what a real launch
compiles, and cannot drift from the launchers.

Fields per row: op, kernel, arch, dtype, head_dim (None where it does not apply), config
(the kernel's constexprs), regs (per thread), spill_bytes (spill stores), shared_bytes
(per block), num_warps, num_stages, blocks_per_sm (occupancy bound from threads, registers
and shared memory), fits (shared within the arch's per-block limit and regs <= 255).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from . import _atomic, _backend
from ._args import (
    BiasOnlyLayerNormArgs,
    BiasOnlyLinearArgs,
    GatedAdapterArgs,
    PrefixAttentionArgs,
)

ARCHS = (80, 90)
# Per-block shared memory a kernel may use (opt-in maximum) and per-SM resources.
LIMITS = {
    80: dict(shared_block=163 * 1024, shared_sm=164 * 1024),
    90: dict(shared_block=227 * 1024, shared_sm=228 * 1024),
}
MAX_REGS = 255
GPU_SMS = 132  # an H100 SXM: launchers that size blocks by the SM count see this many
REGS_SM, MAX_THREADS_SM, MAX_BLOCKS_SM = 65536, 2048, 32
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (64, 80, 128, 256)
ADAPTER_D = (768, 4096)
ADAPTER_R = (16, 64, 256)

_KERNEL_MODULES = ("prefix_attention", "gated_adapter", "bias_only_linear", "bias_only_layer_norm")


def _kmod(name: str):
    return _backend.kernel_impl(name, "triton")


# ---- cases: launcher calls on CPU tensors ------------------------------------------------------


class Case:
    """One op variant: ``run()`` calls its launchers (forward and backward)."""

    def __init__(self, op: str, dtype: str, head_dim: int | None, label: dict, run: Callable):
        self.op, self.dtype, self.head_dim, self.label, self.run = op, dtype, head_dim, label, run


def _attention_case(
    dt: str, D: int, gate: bool, mask: bool, causal: bool, bias: bool = False,
    dropout: bool = False, features: bool = False,
) -> Case:  # fmt: skip
    def run():
        kpa = _kmod("prefix_attention")
        t = DTYPES[dt]
        B, H, Hkv, L, T, P = 2, 32, 8, 128, 2, 16  # HF layout: (B, L, H, D).transpose(1, 2)
        q = torch.zeros(B, L, H, D, dtype=t).transpose(1, 2)
        k = torch.zeros(B, L, Hkv, D, dtype=t).transpose(1, 2)
        pk = torch.zeros(T, Hkv, P, D, dtype=t)
        idx = torch.zeros(B, dtype=torch.long)
        g = torch.ones(B, 2) if gate else None
        m = torch.ones(B, L, dtype=torch.bool) if mask else None
        kw = {}
        if bias:  # T5's case: a (1, H, Lq, P + Lk) bias, stride 0 on the batch dim
            kw["attn_bias"] = torch.zeros(1, H, L, P + L, dtype=t).expand(B, H, L, P + L)
        if dropout:  # DROPOUT: Philox keep-masks regenerated in every kernel
            kw.update(dropout_p=0.1, seed=torch.zeros(1, dtype=torch.long))
        if features:  # SOFTCAP, HAS_SINKS and WINDOW together
            kw.update(softcap=30.0, sinks=torch.zeros(H), window=64)
        a = PrefixAttentionArgs(q, k, k, pk, pk, idx, g, m, causal, 0.1, **kw)
        out, lse = kpa.forward(a)
        kpa.backward(a, out, out, lse)

    label = {"gate": gate, "mask": mask, "causal": causal, "attn_bias": bias, "dropout": dropout,
             "softcap_sinks_window": features}  # fmt: skip
    return Case("prefix_attention", dt, D, label, run)


def _dropout_mask_case() -> Case:
    """The debug hook's keep-mask kernel (dtype-free: one row per arch)."""

    def run():
        _kmod("prefix_attention").dropout_keep_mask(
            torch.zeros(1, dtype=torch.long), 2, 32, 128, 16, 128, 0.1
        )

    return Case("prefix_attention", "bool", None, {"dropout_keep_mask": True}, run)


def _adapter_case(
    dt: str, d: int, r: int, gate: str | None, act: str, bias: bool, mixed: bool = False
) -> Case:
    def run():
        kga = _kmod("gated_adapter")
        t = DTYPES[dt]
        B, L, T = 2, 128, 3
        lead = (T,) if mixed else ()  # mixed: per-task stacked weights, adapter_index (B,)
        x = torch.zeros(B, L, d, dtype=t)
        wd, wu = torch.zeros(*lead, r, d, dtype=t), torch.zeros(*lead, d, r, dtype=t)
        bd = torch.zeros(*lead, r, dtype=t) if bias else None
        bu = torch.zeros(*lead, d, dtype=t) if bias else None
        wg = torch.zeros(*lead, 1, d, dtype=t) if gate else None
        bg = torch.zeros(*lead, 1, dtype=t) if gate and bias else None
        idx = torch.zeros(B, dtype=torch.long) if mixed else None
        mode = gate or "token"
        gm = torch.ones(B, L, dtype=torch.bool) if gate == "mean" else None
        res = None if gate == "mean" else torch.zeros(B, L, d, dtype=t)  # both residuals
        a = GatedAdapterArgs(x, wd, bd, wu, bu, res, wg, bg, mode, gm, act, 1.0, idx)
        out, z, s = kga.forward(a)
        kga.backward(a, out, z, s)

    label = {"d": d, "r": r, "gate": gate, "activation": act, "bias": bias, "mixed": mixed}
    return Case("gated_adapter", dt, None, label, run)


def _linear_case(dt: str, n_in: int, n_out: int, act: str) -> Case:
    def run():
        k = _kmod("bias_only_linear")
        t = DTYPES[dt]
        x, w = torch.zeros(64, n_in, dtype=t), torch.zeros(n_out, n_in, dtype=t)
        b = torch.zeros(n_out, dtype=t)
        a = BiasOnlyLinearArgs(x, w, b, act)
        y, pre = k.forward(a)
        k.backward(a, y, pre if act not in ("identity", "relu") else y)

    return Case("bias_only_linear", dt, None, {"d_out": n_out, "activation": act}, run)


def _layer_norm_case(dt: str, n: int) -> Case:
    def run():
        k = _kmod("bias_only_layer_norm")
        t = DTYPES[dt]
        x, w = torch.zeros(64, n, dtype=t), torch.ones(n, dtype=t)
        a = BiasOnlyLayerNormArgs(x, w, torch.zeros(n, dtype=t), 1e-5)
        y, mean, rstd = k.forward(a)
        k.backward(a, y, mean, rstd)

    return Case("bias_only_layer_norm", dt, None, {"d": n}, run)


def cases(quick: bool = False) -> list[Case]:
    """The report's matrix. Each flag that changes the compiled code (gate, mask, causal,
    activation) is switched off one at a time from the all-on variant (the cross product
    would double the compile time for rows that differ by one branch); the adapter's d
    (768, 4096) changes no compiled code, so its rows share one compile. The attention's
    HAS_BIAS and DROPOUT variants are one all-on row each (DROPOUT in the full matrix only),
    as is SOFTCAP + HAS_SINKS + WINDOW (full matrix only).
    ``quick``: the representative subset CI compiles (bf16 and fp32, the largest tiles of
    each op, and the tiny debug keep-mask kernel, so every launched kernel is compiled)."""
    dts = ("bf16", "fp32") if quick else tuple(DTYPES)
    out: list[Case] = []
    attn_flags = [(True, True, True)]
    if not quick:
        attn_flags += [(False, True, True), (True, False, True), (True, True, False)]
    for dt in dts:
        for D in (128, 256) if quick else HEAD_DIMS:
            out += [_attention_case(dt, D, *f) for f in attn_flags]
            if not quick or (dt, D) == ("fp32", 128):  # the attn_bias variant (HAS_BIAS)
                out.append(_attention_case(dt, D, True, True, True, bias=True))
            if not quick:  # the dropout variant (DROPOUT); softcap + sinks + window
                out.append(_attention_case(dt, D, True, True, True, dropout=True))
                out.append(_attention_case(dt, D, True, True, True, features=True))
    out.append(_dropout_mask_case())  # launched by the debug hook only; tiny, no tl.dot
    ad = [("token", "relu")]
    if not quick:
        ad += [(None, "relu"), ("mean", "relu"), ("token", "identity")]
    for dt in dts:
        for d in (4096,) if quick else ADAPTER_D:
            for r in (256,) if quick else ADAPTER_R:
                out += [_adapter_case(dt, d, r, g, a, True) for g, a in ad]
        # Mixed-task batches (HAS_IDX) differ in indexing, not in tiles: one row per dtype.
        if dt == "bf16" or not quick:
            out.append(_adapter_case(dt, 4096, 256 if quick else 64, "token", "relu", True, True))
    acts = ("gelu",) if quick else ("identity", "relu", "gelu", "gelu_tanh", "silu", "tanh")
    for dt in dts:
        out += [_linear_case(dt, 1024, 4096, a) for a in acts]
        out += [_layer_norm_case(dt, n) for n in ((32768,) if quick else (768, 4096, 32768))]
    return out


# ---- capture and specialise ------------------------------------------------------------------


class _Recorder:
    def __init__(self, name: str, fn, launches: list):
        self.name, self.fn, self.launches = name, fn, launches

    def __getitem__(self, grid):
        return lambda *a, **k: self.launches.append((self.name, self.fn, a, k))


@contextlib.contextmanager
def _recording(launches: list, arch: int = 90):
    """Kernels replaced by recorders; the launchers pick GPU configs, every autotuning
    candidate included."""
    from triton.runtime.jit import JITFunction

    saved = []
    for mname in _KERNEL_MODULES:
        mod = _kmod(mname)
        for name, fn in vars(mod).copy().items():
            if isinstance(fn, JITFunction) and (name.endswith("_kernel") or "preprocess" in name):
                saved.append((mod, name, fn))
                setattr(mod, name, _Recorder(name, fn, launches))
    from unipelt_fast import _autotune

    saved.append((_autotune, "RECORD_ALL", _autotune.RECORD_ALL))
    _autotune.RECORD_ALL = True  # every autotuning candidate is launched, so reported
    kpa = _kmod("prefix_attention")
    saved.append((kpa, "_interpreting", kpa._interpreting))
    kpa._interpreting = lambda t: False
    saved.append((kpa, "_arch", kpa._arch))  # candidate sets may depend on the arch
    kpa._arch = lambda device: arch
    klin = _kmod("bias_only_linear")  # its backward's column blocks follow the SM count
    saved.append((klin, "_num_sms", klin._num_sms))
    klin._num_sms = lambda device: GPU_SMS
    kga = _kmod("gated_adapter")  # GPU block sizes; its backward's grid follows the SM count
    saved += [(kga, "_interpreting", kga._interpreting), (kga, "_num_sms", kga._num_sms)]
    kga._interpreting = lambda t: False
    kga._num_sms = lambda device: GPU_SMS
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _specialise(fn, args, kwargs, arch: int):
    """Triton's launch-time specialisation of one launch, for ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return options.__dict__, signature, constexprs, attrs


def _config(fn, constexprs: dict) -> dict:
    """The kernel's declared constexprs (block sizes, flags), by name."""
    names = fn.arg_names
    out = {}
    for p in fn.params:
        if p.is_constexpr:
            v = constexprs.get((names.index(p.name),))
            out[p.name] = v
    return out


# ---- compile (worker processes) ----------------------------------------------------------------


def _worker_init(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # a fresh dir: ptxas always runs (its log)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ.setdefault("TRITON_DISABLE_LINE_INFO", "1")  # no effect on registers/shared


def _compile(job: dict) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(_kmod(job["module"]), job["kernel"])
    src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    knobs.nvidia.dump_ptxas_log = True
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ck = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    log = buf.getvalue()
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores", log)
    md = ck.metadata
    return {
        "regs": int(regs[-1]) if regs else None,
        "spill_bytes": int(spill[-1]) if spill else None,
        "shared_bytes": int(md.shared),
        "num_warps": int(md.num_warps),
        "num_stages": int(md.num_stages),
    }


def blocks_per_sm(arch: int, regs: int | None, shared: int, warps: int) -> int:
    """Resident blocks per SM: threads, registers (allocated per warp in units of 256) and
    shared memory (plus the 1 KB per block the driver reserves) each bound it."""
    by_threads = MAX_THREADS_SM // (warps * 32)
    per_warp = math.ceil(max(regs or 1, 1) * 32 / 256) * 256
    by_regs = REGS_SM // (per_warp * warps)
    by_shared = LIMITS[arch]["shared_sm"] // (shared + 1024) if shared else MAX_BLOCKS_SM
    return max(0, min(by_threads, by_regs, by_shared, MAX_BLOCKS_SM))


def fits(row: dict) -> bool:
    regs = row["regs"] if row["regs"] is not None else 0
    return row["shared_bytes"] <= LIMITS[row["arch_cc"]]["shared_block"] and regs <= MAX_REGS


def _job_key(job: dict, fn: Any) -> str:
    import triton

    blob = json.dumps(
        [triton.__version__, job["module"], job["kernel"], job["arch"], job["signature"],
         sorted((str(k), repr(v)) for k, v in job["constexprs"].items()),
         sorted((str(k), repr(v)) for k, v in job["attrs"].items()),
         sorted((k, repr(v)) for k, v in job["options"].items())],
        default=repr,
    )  # fmt: skip
    # Triton's own key of the kernel's source and of every jit function and global it uses:
    # editing a launcher's tables does not throw away the cached compiles.
    src = fn.cache_key.encode()
    return hashlib.sha256(blob.encode() + src).hexdigest()[:32]


def select(
    all_cases: list[Case],
    ops: Iterable[str] | None = None,
    dtypes: Iterable[str] | None = None,
    head_dims: Iterable[int] | None = None,
    variants: Iterable[str] | None = None,
) -> list[Case]:
    """The cases of ``all_cases`` with an op in ``ops``, a dtype in ``dtypes``, a head dim in
    ``head_dims`` (cases without one are dropped when it is given) and every flag named in
    ``variants`` on; None keeps all."""
    ops, dtypes = (set(x) if x is not None else None for x in (ops, dtypes))
    hds = set(head_dims) if head_dims is not None else None
    out = []
    for c in all_cases:
        if ops is not None and c.op not in ops or dtypes is not None and c.dtype not in dtypes:
            continue
        if hds is not None and c.head_dim not in hds:
            continue
        if variants is not None and not all(c.label.get(v) for v in variants):
            continue
        out.append(c)
    return out


def collect(
    archs: Iterable[int] = ARCHS,
    quick: bool = False,
    jobs: int = 2,
    cache: str | None = None,
    progress: Callable[[str], None] | None = None,
    only: list[Case] | None = None,
    kernels: Iterable[str] | None = None,
    flag_cost: bool = False,
    flags: Iterable[str] | None = None,
) -> list[dict]:
    """Every row of the report (see the module docstring). ``cache``: a directory where
    compiled results are kept between runs (keyed by triton version, kernel source and the
    full specialisation). ``only``: these cases instead of ``cases(quick)`` (see
    ``select``); ``kernels``: compile only the launches of these kernels. ``flag_cost``: each
    launch is also compiled with each bool constexpr that is on (those in ``flags``, or all)
    switched off, into the row's ``without`` {flag: {regs, spill_bytes, shared_bytes}}."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("resources: run without TRITON_INTERPRET=1 (it compiles for GPUs)")
    pending: dict[str, dict] = {}
    rows: list[tuple[dict, str, dict[str, str]]] = []
    only_flags = set(flags) if flags is not None else None
    want = set(kernels) if kernels is not None else None
    for case in cases(quick) if only is None else only:
        seen = set()
        for arch in archs:
            launches: list = []
            with _recording(launches, arch):  # what a launch on this arch would run
                case.run()
            for name, fn, args, kwargs in launches:
                if want is not None and name not in want:
                    continue
                options, sig, consts, attrs = _specialise(fn, args, kwargs, arch)
                mod = fn.__module__.rsplit(".", 1)[-1]
                job = dict(module=mod, kernel=name, arch=arch, signature=sig,
                           constexprs=consts, attrs=attrs, options=options)  # fmt: skip
                key = _job_key(job, fn)
                if (key, arch) in seen:  # e.g. the two _task_sum_kernel launches
                    continue
                seen.add((key, arch))
                pending.setdefault(key, job)
                row = {
                    "op": case.op,
                    "kernel": name,
                    "arch": f"sm_{arch}",
                    "dtype": case.dtype,
                    "head_dim": case.head_dim,
                    "variant": case.label,
                    "config": _config(fn, consts),
                    "arch_cc": arch,
                }
                off: dict[str, str] = {}
                for flag, v in row["config"].items() if flag_cost else ():
                    if v is not True or only_flags is not None and flag not in only_flags:
                        continue
                    idx = (fn.arg_names.index(flag),)
                    job_off = {**job, "constexprs": {**consts, idx: False}}
                    off[flag] = _job_key(job_off, fn)
                    pending.setdefault(off[flag], job_off)
                rows.append((row, key, off))
    results: dict[str, dict] = {}
    if cache:
        os.makedirs(cache, exist_ok=True)
        for key in pending:
            p = os.path.join(cache, key + ".json")
            if os.path.exists(p):
                with open(p) as f:
                    results[key] = json.load(f)
    todo = [(k, j) for k, j in pending.items() if k not in results]
    with tempfile.TemporaryDirectory() as tcache:
        if todo:
            import multiprocessing as mp

            with ProcessPoolExecutor(
                max_workers=max(1, jobs),
                mp_context=mp.get_context("spawn"),
                initializer=_worker_init,
                initargs=(tcache,),
            ) as pool:
                done = pool.map(_compile, [j for _, j in todo])
                for (key, job), res in zip(todo, done, strict=True):
                    results[key] = res
                    if cache:
                        _atomic.write_text(os.path.join(cache, key + ".json"), json.dumps(res))
                    if progress:
                        progress(f"{job['kernel']} sm_{job['arch']}")
    out = []
    for row, key, off in rows:
        r = {**row, **results[key]}
        if off:
            r["without"] = {
                f: {k: results[fk][k] for k in ("regs", "spill_bytes", "shared_bytes")}
                for f, fk in off.items()
            }
        r["blocks_per_sm"] = blocks_per_sm(
            r["arch_cc"], r["regs"], r["shared_bytes"], r["num_warps"]
        )
        r["fits"] = fits(r)
        out.append(r)
    return out


# ---- output --------------------------------------------------------------------------------------

_SHORT = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_D": "D", "BM": "M", "BD": "D", "RP": "R"}


def _fmt_config(c: dict) -> str:
    parts = []
    for k, v in c.items():
        if k in _SHORT:
            parts.append(f"{_SHORT[k]}{v}")
        elif v is True:
            parts.append(k.lower())
    return " ".join(parts)


def _fmt_variant(v: dict) -> str:
    return " ".join(f"{k}={val}" for k, val in v.items() if val not in (True,)) or "all on"


def table(rows: list[dict]) -> str:
    head = ("op", "kernel", "arch", "dtype", "D", "variant", "config", "regs", "spill",
            "smem KB", "warps", "stages", "blk/SM", "")  # fmt: skip
    lines = [head]
    for r in rows:
        flag = "" if r["fits"] and not r["spill_bytes"] else ("SPILL" if r["fits"] else "NO FIT")
        lines.append((
            r["op"], r["kernel"], r["arch"], r["dtype"], str(r["head_dim"] or "-"),
            _fmt_variant(r["variant"]), _fmt_config(r["config"]), str(r["regs"]),
            str(r["spill_bytes"]), f"{r['shared_bytes'] / 1024:.1f}", str(r["num_warps"]),
            str(r["num_stages"]), str(r["blocks_per_sm"]), flag,
        ))  # fmt: skip
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    fmt = lambda x: "  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip()
    return "\n".join(fmt(x) for x in lines)


def flag_cost_table(rows: list[dict]) -> str:
    """One line per (row, flag): registers, spills and shared memory with the flag on and
    off (the same launch otherwise), and the difference."""
    head = ("op", "kernel", "arch", "dtype", "D", "config", "warps", "stages", "flag",
            "regs on/off", "spill on/off", "smem KB on/off", "d regs", "d smem KB")  # fmt: skip
    lines = [head]
    for r in rows:
        for flag, w in r.get("without", {}).items():
            cfg = {k: v for k, v in r["config"].items() if k != flag}
            lines.append((
                r["op"], r["kernel"], r["arch"], r["dtype"], str(r["head_dim"] or "-"),
                _fmt_config(cfg), str(r["num_warps"]), str(r["num_stages"]), flag,
                f"{r['regs']}/{w['regs']}", f"{r['spill_bytes']}/{w['spill_bytes']}",
                f"{r['shared_bytes'] / 1024:.1f}/{w['shared_bytes'] / 1024:.1f}",
                f"{(r['regs'] or 0) - (w['regs'] or 0):+d}",
                f"{(r['shared_bytes'] - w['shared_bytes']) / 1024:+.1f}",
            ))  # fmt: skip
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    fmt = lambda x: "  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip()
    return "\n".join(fmt(x) for x in lines)


def public_row(r: dict) -> dict:
    keys = ("op", "kernel", "arch", "dtype", "head_dim", "variant", "config", "regs",
            "spill_bytes", "shared_bytes", "num_warps", "num_stages", "blocks_per_sm",
            "fits", "without")  # fmt: skip
    return {k: r[k] for k in keys if k in r}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="sm_80,sm_90", help="comma list of sm_80, sm_90")
    p.add_argument("--json", metavar="PATH", help="write every row as JSON")
    p.add_argument("--quick", action="store_true", help="the representative subset CI runs")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument(
        "--cache",
        default=os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
            "unipelt_fast",
            "resources",
        ),
        help="results kept between runs ('' for none)",
    )
    p.add_argument("--only-problems", action="store_true", help="table: rows that spill or misfit")
    p.add_argument("--op", help="comma list: only these ops (e.g. prefix_attention)")
    p.add_argument("--kernel", help="comma list: only these kernels (e.g. _fwd_kernel)")
    p.add_argument("--dtype", help="comma list of fp16, bf16, fp32")
    p.add_argument("--head-dim", help="comma list: only attention cases of these head dims")
    p.add_argument(
        "--variant", help="comma list of flags (e.g. attn_bias): only cases with all of them on"
    )
    p.add_argument(
        "--flag-cost",
        nargs="?",
        const="all",
        metavar="FLAGS",
        help="also compile each launch with each of its on flags (bool constexprs, e.g. "
        "HAS_BIAS; comma list, default all) off: what each flag costs",
    )


def run(args: argparse.Namespace) -> int:
    archs = []
    for a in (x.strip() for x in args.arch.split(",") if x.strip()):
        cc = int(a.removeprefix("sm_")) if a.removeprefix("sm_").isdigit() else None
        if cc not in ARCHS:
            raise SystemExit(f"unipelt-fast resources: --arch {a!r}: choose from sm_80, sm_90")
        archs.append(cc)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels must be real JIT functions
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "unipelt_fast.resources", *_ARGV], env=env)
    n = [0]

    def progress(desc: str) -> None:
        n[0] += 1
        print(f"[compiled {n[0]}] {desc}", file=sys.stderr, flush=True)

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    only = None
    if args.op or args.dtype or args.head_dim or args.variant:
        hds = [int(x) for x in split(args.head_dim)] if args.head_dim else None
        only = select(
            cases(args.quick), split(args.op), split(args.dtype), hds, split(args.variant)
        )
    flags = None if args.flag_cost in (None, "all") else split(args.flag_cost)
    rows = collect(
        archs, args.quick, args.jobs, args.cache or None, progress, only, split(args.kernel),
        flag_cost=args.flag_cost is not None, flags=flags,
    )  # fmt: skip
    if args.flag_cost is not None:
        print(flag_cost_table(rows))
        print(f"{len(rows)} rows")
        if args.json:
            _atomic.write_text(args.json, json.dumps([public_row(r) for r in rows], indent=1))
            print(f"wrote {args.json}")
        return 0
    shown = [r for r in rows if not r["fits"] or r["spill_bytes"]] if args.only_problems else rows
    print(table(shown))
    bad = [r for r in rows if not r["fits"]]
    spills = [r for r in rows if r["spill_bytes"]]
    print(f"{len(rows)} rows: {len(bad)} do not fit, {len(spills)} spill registers")
    if args.json:
        _atomic.write_text(args.json, json.dumps([public_row(r) for r in rows], indent=1))
        print(f"wrote {args.json}")
    return 0


_ARGV: list[str] = []  # the subcommand's own arguments, to re-run without the interpreter


def set_argv(argv: list[str]) -> None:
    _ARGV[:] = argv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="unipelt-fast resources", description=__doc__.split("\n")[0])
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else argv
    set_argv(argv)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
