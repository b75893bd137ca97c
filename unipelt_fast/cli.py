"""The ``unipelt-fast`` console script: ``unipelt-fast bench`` (latency and memory).

Examples::

    unipelt-fast bench --quick                       # every op, small shapes
    unipelt-fast bench --ops gated_adapter --dtype bf16 --json out.json --csv out.csv
    unipelt-fast bench --model bert-base,llama-1b-like --plot plots/

matplotlib and tqdm are optional (``pip install 'unipelt-fast[bench]'``): without tqdm the
progress is printed line by line; ``--plot`` without matplotlib is an error saying so.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time

from . import _atomic


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .bench import MODELS, OPS
    from .bench.models import BASE_QUANTS
    from .bench.runners import DTYPES

    parser = argparse.ArgumentParser(
        prog="unipelt-fast",
        description="unipelt-fast: fused kernels for UniPELT-style PEFT. Commands: bench "
        "(latency and memory benchmarks).",
        epilog="Example: unipelt-fast bench --quick",
    )
    parser.add_argument("--version", action="version", version=f"unipelt-fast {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    b = sub.add_parser(
        "bench",
        help="latency and memory benchmarks against eager and peers",
        description="Benchmark every op on every backend that can run here (eager, "
        "torch.compile of eager, triton, cuda, and peers), and optionally whole models. "
        "Prints a table; writes JSON / CSV / markdown / PNGs on request.",
    )
    b.add_argument("--quick", action="store_true", help="small shapes, short timing windows")
    b.add_argument(
        "--wide",
        action="store_true",
        help="print every column with full notes (the default table fits 120 columns; the "
        "JSON/CSV always hold every column)",
    )
    b.add_argument(
        "--ops",
        default=None,
        help=f"comma list of {', '.join(OPS)}; 'all' (default) or 'none'. "
        "Default with --model: none",
    )
    b.add_argument(
        "--impls",
        default=None,
        help="only these rows (comma list of eager, compile, torch, triton, cuda, "
        "sdpa_preconcat, concat_mask_sdpa, per_task_loop). Speedups need eager",
    )
    b.add_argument(
        "--dtype",
        default="auto",
        help=f"comma list of {', '.join(DTYPES)} (or bf16, fp16, fp32); "
        "auto = bfloat16 on a GPU, float32 on a CPU",
    )
    b.add_argument("--model", default=None, help=f"model-level run: {', '.join(MODELS)} or all")
    b.add_argument(
        "--base-quant",
        default=None,
        choices=BASE_QUANTS,
        help="model rows: quantize the base's weights first (bitsandbytes 4-bit NF4 / 8-bit "
        "through transformers' BitsAndBytesConfig, torchao int8 weight-only); the base MiB "
        "column gives their bytes as stored",
    )
    b.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    b.add_argument("--json", metavar="PATH", help="write all rows and the run's meta as JSON")
    b.add_argument("--csv", metavar="PATH", help="write all rows as CSV")
    b.add_argument("--markdown", metavar="PATH", help="write a markdown results table")
    b.add_argument("--plot", metavar="DIR", help="write PNG plots (needs matplotlib)")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    b.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: 1 with --quick, where the shapes are too small "
        "to gain from threads and a busy machine makes multi-thread timings erratic; "
        "else torch's default)",
    )
    b.add_argument("--warmup-ms", type=float, default=None, help="do_bench warmup (GPU)")
    b.add_argument("--rep-ms", type=float, default=None, help="do_bench repetition time (GPU)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    from . import resources

    r = sub.add_parser(
        "resources",
        help="registers, spills, shared memory and occupancy of every Triton kernel (no GPU)",
        description=resources.__doc__.split("\n")[0],
    )
    resources.add_arguments(r)
    return parser


def _choices(parser, flag: str, value: str, allowed, aliases=None) -> list[str]:
    aliases = aliases or {}
    out = []
    for v in _split(value):
        v = aliases.get(v, v)
        if v not in allowed:
            parser.error(f"{flag}: unknown value {v!r}; choose from {', '.join(allowed)}")
        out.append(v)
    if not out:
        parser.error(f"{flag}: empty list")
    return list(dict.fromkeys(out))


class _Progress:
    """tqdm when importable, else one plain line per step."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.n, self.bar, self.enabled = total, 0, None, enabled
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None and sys.stderr.isatty():  # plain lines in logs
            self.bar = tqdm(total=total, unit="row", file=sys.stderr, dynamic_ncols=True)

    def step(self, desc: str) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(desc[:60])
            self.bar.update(1)
        else:
            print(f"[{self.n}/{self.total}] {desc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _wrap(text: str, wide: bool) -> str:
    return text if wide else "\n".join(textwrap.wrap(text, 120, break_on_hyphens=False))


def bench(args, parser, argv) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _bench(args, parser, argv)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (tests)


def _bench(args, parser, argv) -> int:
    import torch

    from . import _autotune
    from .bench import MODELS, OPS, report, suite
    from .bench.floors import measure_limits
    from .bench.models import quant_library_version
    from .bench.runners import DTYPE_ALIASES, DTYPES, TimerCfg, interpreter_on, make_timer

    impl_names = (
        "eager",
        "compile",
        "torch",
        "triton",
        "cuda",
        "sdpa_preconcat",
        "concat_mask_sdpa",
        "per_task_loop",
    )
    ops_arg = args.ops if args.ops is not None else ("none" if args.model else "all")
    ops = (
        []
        if ops_arg == "none"
        else list(OPS)
        if ops_arg == "all"
        else _choices(parser, "--ops", ops_arg, OPS)
    )
    models = []
    if args.model:
        models = (
            list(MODELS) if args.model == "all" else _choices(parser, "--model", args.model, MODELS)
        )
    impls = None if args.impls is None else set(_choices(parser, "--impls", args.impls, impl_names))
    if args.no_compile:
        impls = (impls or set(impl_names)) - {"compile"}
    if args.device not in (None, "cuda", "cpu"):
        parser.error(f"--device: unknown value {args.device!r}; choose from cuda, cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "auto":
        dtypes = [torch.bfloat16 if device.type == "cuda" else torch.float32]
    else:
        dtypes = [DTYPES[d] for d in _choices(parser, "--dtype", args.dtype, DTYPES, DTYPE_ALIASES)]
    if args.plot:
        try:
            report.require_matplotlib()
        except ImportError as e:
            parser.error(str(e))
    if not ops and not models:
        parser.error("nothing to run: --ops none and no --model")
    if args.base_quant and not models:
        parser.error("--base-quant: applies to the model rows; add --model")

    quick = args.quick
    if args.threads is not None and args.threads < 1:
        parser.error("--threads: must be >= 1")
    if device.type == "cpu" and (args.threads is not None or quick):
        torch.set_num_threads(args.threads or 1)
    cfg = TimerCfg()
    if quick:
        cfg = TimerCfg(warmup_ms=5, rep_ms=20, cpu_min_run_s=0.05)
    if args.warmup_ms is not None:
        cfg.warmup_ms = args.warmup_ms
    if args.rep_ms is not None:
        cfg.rep_ms = args.rep_ms
    timer_name, timer = make_timer(device, cfg)

    notes = []
    if device.type != "cuda":
        notes.append(
            "Kernel timings need a CUDA GPU: this run is on CPU, so triton and cuda rows are "
            "unavailable"
            + (
                "; TRITON_INTERPRET=1 is set, so triton rows give saved bytes at --quick sizes "
                "(not a speed figure)."
                if interpreter_on()
                else " (set TRITON_INTERPRET=1 for Triton-interpreter saved-bytes rows at "
                "--quick sizes)."
            )
        )
        if ops and (impls is None or "compile" in impls):
            notes.append(
                "torch.compile rows: compiling on a CPU costs ~5-15 s per op and shape (not "
                "in the timings); --no-compile skips them."
            )
    else:
        notes.append(
            "fwd = forward with autograd recording; bwd = backward alone (retained graph); "
            "floor = max(bytes / copy bandwidth, FLOPs / matmul peak) / measured time."
        )
    if os.environ.get("UNIPELT_NAN_FILL") == "1":
        notes.append("UNIPELT_NAN_FILL=1: kernel outputs are NaN-filled first; unset it to time.")
    if impls is not None and "eager" not in impls:
        notes.append("eager is not in --impls: no speedups are computed.")
    for n in notes:
        print(n, file=sys.stderr)

    tasks = suite.plan_ops(ops, dtypes, device, quick, impls)
    total = sum(len(t.impls) for t in tasks) + len(models) * suite.n_model_rows()
    doc = {
        "meta": report.meta(
            device,
            argv,
            quick=quick,
            ops=ops,
            models=models,
            base_quant=args.base_quant,
            base_quant_version=quant_library_version(args.base_quant),
            dtypes=[str(d).replace("torch.", "") for d in dtypes],
            timer=timer_name,
            timer_cfg=vars(cfg),
            triton_interpret=interpreter_on(),
            threads=torch.get_num_threads() if device.type == "cpu" else None,
        ),
        "limits": {},
        "notes": notes,
        "rows": [],
        "summary": {"models": {}},
    }
    rows = doc["rows"]
    vers = doc["meta"]["versions"]
    dev_name = doc["meta"]["device"]

    def flush() -> None:  # after every task, so a run cut short still leaves its rows
        doc["meta"]["autotune"] = _autotune.chosen()  # the configs the timed runs used
        if args.json:
            report.write_json(args.json, doc)
        if args.csv:
            report.write_csv(args.csv, rows)

    progress = _Progress(total, enabled=not args.no_progress)
    t0 = time.perf_counter()
    try:
        if device.type == "cuda" and ops:
            doc["limits"] = measure_limits(device, dtypes, timer)

        def on_row(r: dict) -> None:
            r["device"], r["versions"] = dev_name, vers
            progress.step(f"{r['op']} {r.get('shape', '')} {r['impl']} {r.get('pass', '')}".strip())
            if r["kind"] == "model":  # op rows are flushed per task, model rows per row
                rows.append(r)
                flush()

        for task in tasks:
            for row in suite.run_op_task(
                task, device, timer, timer_name, doc["limits"], quick, on_row
            ):
                rows.append(row)
            suite.add_mix_cost(rows)
            suite.add_flag_cost(rows)
            flush()
        if models:
            mcfg = suite.model_timer_cfg(quick, device)
            mname, mtimer = make_timer(device, mcfg)
            _, summary = suite.run_models(
                models, dtypes[0], device, quick, mtimer, mname, on_row, base_quant=args.base_quant
            )
            doc["summary"]["models"] = summary
            flush()
    finally:
        progress.close()
    doc["meta"]["elapsed_s"] = round(time.perf_counter() - t0, 1)
    flush()

    print(
        "\n" + _wrap(f"unipelt-fast bench on {dev_name}; " + report._version_str(vers), args.wide)
    )
    lim = doc["limits"]
    if lim:
        peaks = ", ".join(f"{k} {v / 1e12:.0f}" for k, v in lim["peak_flops_per_s"].items())
        print(
            f"measured floors: copy bandwidth {lim['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, "
            f"matmul peak (TFLOP/s) {peaks}"
        )
    for table in (report.op_table(rows), report.model_table(rows)):
        if len(table) > 1:
            print(report.render(table, max_note=10**6) if args.wide else report.compact(table))
            print()
    if any(r.get("fwd_ms_p25") is not None or r.get("time_ms_p25") is not None for r in rows):
        print(_wrap(report.SPREAD_NOTE, args.wide))
    for name, fr in doc["summary"]["models"].items():
        if fr:
            line = f"{name}: " + ", ".join(f"{k} = {100 * v:.0f}%" for k, v in fr.items())
            print(_wrap(line, args.wide))
    if models:
        print(
            "(paper: UniPELT train time 55-67% of full fine-tuning, inference 118-127% of the base)"
        )
    for n in notes:
        print(_wrap(n, args.wide))
    if args.markdown:
        _atomic.write_text(args.markdown, report.markdown(doc))
    if args.plot:
        for p in report.plot(rows, args.plot):
            print(f"wrote {p}")
    print(f"done in {doc['meta']['elapsed_s']} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cmd is None:  # no command: the help, not argparse's "arguments are required"
        parser.print_help()
        return 2
    if args.cmd == "bench":
        return bench(args, parser, argv)
    if args.cmd == "resources":
        from . import resources

        resources.set_argv((argv if argv is not None else sys.argv[1:])[1:])
        return resources.run(args)
    parser.error(f"unknown command {args.cmd!r}")  # pragma: no cover - argparse catches it
    return 2


if __name__ == "__main__":
    sys.exit(main())
