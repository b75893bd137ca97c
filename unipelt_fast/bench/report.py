"""Output of a bench run: the printed table, JSON, CSV, markdown and PNG plots."""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import platform
import subprocess
import sys
import textwrap

import torch

from .. import _atomic

OP_COLUMNS = (
    "kind",
    "op",
    "shape",
    "dtype",
    "impl",
    "impl_kind",
    "device",
    "available",
    "reason",
    "note",
    "timer",
    "fwd_ms",
    "fwd_ms_p25",
    "fwd_ms_p75",
    "bwd_ms",
    "bwd_ms_p25",
    "bwd_ms_p75",
    "fwdbwd_ms",
    "fwdbwd_ms_p25",
    "fwdbwd_ms_p75",
    "speedup_fwd",
    "speedup_bwd",
    "speedup_fwdbwd",
    "mix_cost_fwdbwd",
    "flag_cost_fwdbwd",
    "saved_bytes",
    "saved_extra_bytes",
    "peak_mem_bytes",
    "bytes_fwd",
    "bytes_fwdbwd",
    "flops_fwd",
    "flops_fwdbwd",
    "floor_ms_fwd",
    "floor_ms_fwdbwd",
    "floor_frac_fwd",
    "floor_frac_fwdbwd",
    "pass",
    "time_ms",
    "time_ms_p25",
    "time_ms_p75",
    "frac_of_baseline",
    "params",
    "trainable_params",
    "base_quant",
    "base_bytes",
    "versions",
)


def versions() -> dict[str, str | None]:
    from .. import __version__

    def ver(mod):
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001 - not installed or broken: recorded as None
            return None

    return {
        "unipelt_fast": __version__,
        "torch": torch.__version__,
        "triton": ver("triton"),
        "transformers": ver("transformers"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    """HEAD of the checkout the package runs from (with "-dirty"), or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def meta(device: torch.device, argv: list[str] | None, **extra) -> dict:
    cmd = ["unipelt-fast", *(sys.argv[1:] if argv is None else argv)]
    return {
        "device": device_name(device),
        "device_type": device.type,
        "versions": versions(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(cmd),
        **extra,
    }


def _version_str(v: dict) -> str:
    return " ".join(f"{k}={val}" for k, val in v.items() if k != "python")


def _finite(x):
    """NaN / inf (a timing that went wrong) become null: the file stays standard JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: str, doc: dict) -> None:
    text = json.dumps(_finite(doc), indent=1, allow_nan=False, default=str)
    _atomic.write_text(path, text + "\n")


def write_csv(path: str, rows: list[dict]) -> None:
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=OP_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        r = dict(r)
        r["versions"] = _version_str(r.get("versions") or {})
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in OP_COLUMNS})
    _atomic.write_text(path, f.getvalue())


# ---- text table ----------------------------------------------------------------------------


def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 100 else f"{x:.1f}"


def _ms_spread(r: dict, key: str) -> str:
    """The median and, when known, +-half its interquartile range as % of the median."""
    med, lo, hi = r.get(key), r.get(f"{key}_p25"), r.get(f"{key}_p75")
    if med is None or lo is None or hi is None or not med > 0:
        return _ms(med)
    return f"{_ms(med)} ±{50 * (hi - lo) / med:.0f}%"


SPREAD_NOTE = (
    "± = half the interquartile range over the repeats, as % of the median (JSON/CSV: "
    "*_p25, *_p75); fwd, bwd and fwd+bwd are timed separately, so fwd + bwd need not equal "
    "fwd+bwd."
)


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.2f}"


def _x(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def op_table(rows: list[dict]) -> list[list[str]]:
    head = [
        "op",
        "shape",
        "dtype",
        "impl",
        "fwd ms",
        "bwd ms",
        "fwd+bwd ms",
        "vs eager",
        "saved MiB",
        "+act MiB",
        "peak MiB",
        "floor",
        "note",
    ]
    out = [head]
    for r in rows:
        if r.get("kind") != "op":
            continue
        note = r.get("note") or ""
        if not r.get("available"):
            note = "unavailable: " + (r.get("reason") or "")
        out.append(
            [
                r["op"],
                r["shape"],
                r["dtype"],
                r["impl"],
                _ms_spread(r, "fwd_ms"),
                _ms_spread(r, "bwd_ms"),
                _ms_spread(r, "fwdbwd_ms"),
                _x(r.get("speedup_fwdbwd")),
                _mib(r.get("saved_bytes")),
                _mib(r.get("saved_extra_bytes")),
                _mib(r.get("peak_mem_bytes")),
                _pct(r.get("floor_frac_fwdbwd")),
                note,
            ]
        )
    return out


def model_table(rows: list[dict]) -> list[list[str]]:
    head = ["model", "shape", "dtype", "base", "row", "pass", "ms", "vs base", "peak MiB"]
    out = [head + ["+act MiB", "base MiB", "trainable", "note"]]
    for r in rows:
        if r.get("kind") != "model":
            continue
        note = r.get("note") or ""
        if not r.get("available"):
            note = "unavailable: " + (r.get("reason") or "")
        tp = r.get("trainable_params")
        out.append(
            [
                r["op"],
                r.get("shape") or "-",
                r["dtype"],
                r.get("base_quant") or "-",  # how the base's weights are stored; "-": dense
                r["impl"],
                r["pass"],
                _ms_spread(r, "time_ms"),
                _pct(r.get("frac_of_baseline")),
                _mib(r.get("peak_mem_bytes")),
                _mib(r.get("saved_extra_bytes")),
                _mib(r.get("base_bytes")),
                "-" if tp is None else f"{tp:,}",
                note,
            ]
        )
    return out


def render(table: list[list[str]], max_note: int = 70) -> str:
    table = [row[:-1] + [row[-1][:max_note]] for row in table]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for j, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compact(table: list[list[str]], group: int = 3, width: int = 120) -> str:
    """The default table, at most ``width`` columns: rows sharing their first ``group``
    cells (op, shape, dtype) get one heading line; columns that are "-" in every row are
    dropped; notes become footnote marks, their text printed below (wrapped)."""
    head, body = table[0], table[1:]
    if not body:
        return ""
    cols = [i for i in range(group, len(head) - 1) if any(row[i] not in ("-", "") for row in body)]
    notes: list[str] = []
    rows, lines = [], []
    for row in body:
        mark = ""
        if row[-1]:
            if row[-1] not in notes:
                notes.append(row[-1])
            mark = f"[{notes.index(row[-1]) + 1}]"
        rows.append((tuple(row[:group]), [row[i] for i in cols] + [mark]))
    sub_head = [head[i] for i in cols] + ["note"]
    widths = [max(len(c) for c in col) for col in zip(sub_head, *(r for _, r in rows), strict=True)]
    fmt = lambda cells: (
        "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
    ).rstrip()
    lines += [fmt(sub_head), "  " + "  ".join("-" * w for w in widths)]
    last = None
    for key, cells in rows:
        if key != last:
            lines.append("  ".join(k for k in key if k and k != "-"))
            last = key
        lines.append(fmt(cells))
    for i, n in enumerate(notes):
        lines += textwrap.wrap(
            f"[{i + 1}] {n}", width, subsequent_indent="    ", break_on_hyphens=False
        )
    return "\n".join(line[:width] for line in lines)


def markdown(doc: dict) -> str:
    """results.md: the run's meta, the limits, and both tables as markdown."""
    m = doc["meta"]
    v = m["versions"]
    lines = [
        f"# unipelt-fast bench: {m['device']}",
        "",
        f"- date: {m['date']}",
        f"- commit: `{m.get('commit')}`",
        f"- command: `{m['command']}`",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
    ]
    lim = doc.get("limits") or {}
    if lim:
        peaks = ", ".join(f"{k} {p / 1e12:.0f} TFLOP/s" for k, p in lim["peak_flops_per_s"].items())
        lines.append(
            f"- measured floors: copy bandwidth {lim['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s; "
            f"matmul peak {peaks}"
        )
    for n in doc.get("notes", []):
        lines.append(f"- {n}")
    for title, table in (("Ops", op_table(doc["rows"])), ("Models", model_table(doc["rows"]))):
        if len(table) < 2:
            continue
        lines += ["", f"## {title}", ""]
        lines.append("| " + " | ".join(table[0]) + " |")
        lines.append("|" + "---|" * len(table[0]))
        for row in table[1:]:
            lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    for name, fr in (doc.get("summary") or {}).get("models", {}).items():
        if fr:
            lines += ["", f"{name}: " + ", ".join(f"{k} = {100 * x:.0f}%" for k, x in fr.items())]
    return "\n".join(lines) + "\n"


# ---- plots ---------------------------------------------------------------------------------


def require_matplotlib() -> None:
    """Raise ImportError with the install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "--plot needs matplotlib: pip install 'unipelt-fast[bench]' (or pip install matplotlib)"
        ) from e


def _missing_time(r: dict) -> str:
    """Why a row has no timing (for the plot's footnote)."""
    if not r.get("available"):
        return r.get("reason") or "unavailable"
    return r.get("note") or "not timed"


def plot(rows: list[dict], outdir: str) -> list[str]:
    """One PNG per (op, dtype) (time and memory per impl, one panel pair per shape) and one
    per model. Every row is on the x axis: a row with no timing (a kernel on a CPU, the
    interpreter's saved-bytes rows) is marked "no time" and the figure says why; memory
    bars are drawn wherever a memory figure exists. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    written = []
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        if r.get("kind") in ("op", "model"):
            groups.setdefault((r["kind"], r["op"], r["dtype"]), []).append(r)
    for (kind, op, dtype), rs in sorted(groups.items()):
        shapes = list(dict.fromkeys(r.get("shape") or "" for r in rs))
        fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 3.4 * len(shapes)), squeeze=False)
        why: dict[str, str] = {}
        for i, shape in enumerate(shapes):
            sr = [r for r in rs if (r.get("shape") or "") == shape]
            tax, max_ = axes[i]
            if kind == "op":
                labels = [r["impl"] for r in sr]
                keys = (("fwd", "fwd_ms"), ("bwd", "bwd_ms"), ("fwd+bwd", "fwdbwd_ms"))
                width = 0.27
                for j, (name, k) in enumerate(keys):
                    xs = [x + (j - 1) * width for x, r in enumerate(sr) if r.get(k) is not None]
                    ts = [r[k] for r in sr if r.get(k) is not None]
                    err = [
                        [r[k] - r.get(f"{k}_p25", r[k]) for r in sr if r.get(k) is not None],
                        [r.get(f"{k}_p75", r[k]) - r[k] for r in sr if r.get(k) is not None],
                    ]
                    tax.bar(xs, ts, width, label=name, yerr=err, capsize=2)
                timed = [r.get("fwdbwd_ms") is not None for r in sr]
                mem = [r.get("peak_mem_bytes") or r.get("saved_bytes") for r in sr]
                mem_label = (
                    "peak MiB (fwd+bwd)"
                    if any(r.get("peak_mem_bytes") for r in sr)
                    else "saved MiB"
                )
            else:
                labels = [f"{r['impl']}\n{r['pass']}" for r in sr]
                xs = [x for x, r in enumerate(sr) if r.get("time_ms") is not None]
                ts = [r["time_ms"] for r in sr if r.get("time_ms") is not None]
                err = [
                    [
                        r["time_ms"] - r.get("time_ms_p25", r["time_ms"])
                        for r in sr
                        if r.get("time_ms") is not None
                    ],
                    [
                        r.get("time_ms_p75", r["time_ms"]) - r["time_ms"]
                        for r in sr
                        if r.get("time_ms") is not None
                    ],
                ]
                tax.bar(xs, ts, yerr=err, capsize=2, label="time")
                timed = [r.get("time_ms") is not None for r in sr]
                mem = [r.get("peak_mem_bytes") or r.get("saved_extra_bytes") for r in sr]
                mem_label = (
                    "peak MiB"
                    if any(r.get("peak_mem_bytes") for r in sr)
                    else "saved activations MiB"
                )
            for x, (r, ok) in enumerate(zip(sr, timed, strict=True)):
                if not ok:
                    tax.text(x, 0, "no time", rotation=90, ha="center", va="bottom", fontsize=7)
                    why.setdefault(r["impl"], _missing_time(r))
            if any(timed):
                tax.legend(fontsize=7)
            tax.set_ylabel("median ms (bars: IQR)")
            mx = [x for x, m in enumerate(mem) if m is not None]
            max_.bar(mx, [mem[x] / 2**20 for x in mx], color="tab:gray")
            for x, m in enumerate(mem):
                if m is None:
                    max_.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7)
            max_.set_ylabel(mem_label)
            for ax in axes[i]:
                ax.set_xticks(range(len(sr)))
                ax.set_xticklabels(labels, fontsize=7, rotation=20)
                ax.set_xlim(-0.6, len(sr) - 0.4)
                ax.set_title(f"{op} {dtype} {shape}", fontsize=8)
        foot = [f"{impl}: {reason}" for impl, reason in why.items()]
        if foot:
            text = "No timing for " + "; ".join(foot)
            fig.text(0.01, 0.005, "\n".join(textwrap.wrap(text, 150)), fontsize=7, va="bottom")
            fig.tight_layout(rect=(0, 0.04 + 0.02 * (len(text) // 150), 1, 1))
        else:
            fig.tight_layout()
        path = os.path.join(outdir, f"{kind}_{op}_{dtype}.png")
        _atomic.write_with(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=90))
        plt.close(fig)
        written.append(path)
    return written


# ---- results folders ------------------------------------------------------------------------


def device_slug(name: str) -> str:
    """A folder name for ``benchmarks/results/<device>/``: "NVIDIA H100 80GB HBM3" ->
    "nvidia-h100-80gb-hbm3"."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in name.split(" (")[0])
    return "-".join(p for p in out.split("-") if p) or "unknown"
