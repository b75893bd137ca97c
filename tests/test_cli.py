"""`unipelt-fast bench` on CPU: well-formed JSON/CSV, saved-bytes accounting, plots, errors.

These check the CLI's plumbing and its memory accounting, never a speed (no timed asserts).
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from unipelt_fast.bench import report
from unipelt_fast.bench.runners import make_case, saved_bytes
from unipelt_fast.bench.shapes import shapes_for
from unipelt_fast.bench.suite import INTERP_NOTE
from unipelt_fast.cli import main


def _load_strict(path):
    def no_nan(c):
        raise ValueError(f"non-standard JSON constant {c}")

    with open(path) as f:
        return json.load(f, parse_constant=no_nan)


def _graph_saved_bytes(out: torch.Tensor) -> int:
    """Bytes autograd saved, found by walking the graph's ``_saved_*`` attributes (a second,
    independent route to the number the hooks give), one count per storage."""
    seen: dict[int, int] = {}
    stack, visited = [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in visited:
            continue
        visited.add(fn)
        for name in dir(fn):
            if not name.startswith("_saved_"):
                continue
            val = getattr(fn, name)
            for t in val if isinstance(val, (tuple, list)) else (val,):
                # 0-dim: a Python scalar autograd wrapped (e.g. `u * scaling`), kept on the
                # host outside the saved-tensor hooks: not activation memory.
                if isinstance(t, torch.Tensor) and t.dim() > 0 and t.numel():
                    key = t.untyped_storage().data_ptr()
                    seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        stack += [f for f, _ in fn.next_functions]
    return sum(seen.values())


def _gated_adapter_extra_bytes(p: dict, itemsize: int) -> int:
    """What the eager gated adapter (relu, token gate) must keep beyond its inputs: the
    bottleneck activation (M, r), the scaled up-projection (M, d) and the gate (M, 1)."""
    M = p["B"] * p["L"]
    return itemsize * (M * p["r"] + M * p["d"] + M)


def test_quick_json_and_csv(tmp_path):
    threads = torch.get_num_threads()
    j, c = tmp_path / "out.json", tmp_path / "out.csv"
    rc = main(
        ["bench", "--quick", "--ops", "gated_adapter", "--impls", "eager,triton,cuda"]
        + ["--json", str(j), "--csv", str(c), "--no-progress", "--device", "cpu"]
    )
    assert rc == 0
    doc = _load_strict(j)
    assert set(doc) >= {"meta", "rows", "notes", "limits", "summary"}
    assert doc["meta"]["threads"] == 1  # --quick on CPU: one thread, restored afterwards
    assert torch.get_num_threads() == threads
    m = doc["meta"]
    for key in ("device", "versions", "commit", "date", "command", "quick", "dtypes", "timer"):
        assert key in m, key
    assert set(m["versions"]) >= {"torch", "triton", "transformers", "unipelt_fast", "cuda"}
    assert m["versions"]["torch"] == torch.__version__
    assert m["timer"] == "torch.utils.benchmark"
    assert "--quick" in m["command"]
    assert any("Kernel timings need a CUDA GPU" in n for n in doc["notes"])

    rows = doc["rows"]
    shape = shapes_for("gated_adapter", "cpu", quick=True)[0]
    assert [r["impl"] for r in rows] == ["eager", "triton", "cuda"]
    for r in rows:
        assert r["op"] == "gated_adapter" and r["dtype"] == "float32"
        assert r["shape"] == shape.label and r["device"] == m["device"]
        assert r["versions"] == m["versions"]
    eager, triton, cuda = rows
    assert eager["available"] and eager["reason"] is None
    for k in ("fwd_ms", "bwd_ms", "fwdbwd_ms"):
        assert eager[k] > 0
        assert 0 < eager[f"{k}_p25"] <= eager[k] <= eager[f"{k}_p75"]  # the spread
    assert eager["speedup_fwdbwd"] == 1.0
    assert eager["saved_extra_bytes"] == _gated_adapter_extra_bytes(shape.params, 4)
    assert eager["saved_bytes"] > eager["saved_extra_bytes"]
    assert eager.get("peak_mem_bytes") is None  # CPU: no CUDA peak
    assert not cuda["available"] and "CUDA GPU" in cuda["reason"]
    # triton: the interpreter (saved bytes only), or unavailable with the reason.
    if triton["available"]:
        assert triton["note"] == INTERP_NOTE and triton.get("fwd_ms") is None
        assert triton["saved_bytes"] > 0
    else:
        assert triton["reason"]

    with open(c, newline="") as f:
        crow = list(csv.DictReader(f))
    assert list(crow[0]) == list(report.OP_COLUMNS)
    assert [r["impl"] for r in crow] == ["eager", "triton", "cuda"]
    assert float(crow[0]["fwdbwd_ms"]) == pytest.approx(eager["fwdbwd_ms"])
    assert float(crow[0]["fwdbwd_ms_p75"]) == pytest.approx(eager["fwdbwd_ms_p75"])
    assert int(crow[0]["saved_bytes"]) == eager["saved_bytes"]
    assert "torch=" + torch.__version__ in crow[0]["versions"]


def test_saved_bytes_matches_graph_walk():
    shape = shapes_for("gated_adapter", "cpu", quick=True)[0]
    case = make_case("gated_adapter", shape, torch.float32, "cpu")
    total, extra, out = saved_bytes(case.runner("eager"), case.inputs())
    assert total == _graph_saved_bytes(out)
    assert extra == _gated_adapter_extra_bytes(shape.params, 4)
    # the inputs autograd keeps: x and the three weight matrices (biases are not needed)
    t = case.tensors
    inputs = sum(t[n].numel() * 4 for n in ("x", "w_down", "w_up", "w_gate"))
    assert total - extra == inputs


def test_saved_bytes_counts_a_storage_once():
    x = torch.randn(64, 32, requires_grad=True)

    def fn():
        y = torch.exp(x)  # saves its result y
        return (y[:, :16] * y[:, 16:]).sum()  # saves two views of y: one storage

    total, extra, _ = saved_bytes(fn, [x])
    assert total == extra == 64 * 32 * 4


def test_plot_and_plain_progress(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setitem(sys.modules, "tqdm", None)  # no tqdm: one line per row
    d = tmp_path / "plots"
    rc = main(
        ["bench", "--quick", "--ops", "bias_only_layer_norm", "--impls", "eager"]
        + ["--plot", str(d), "--markdown", str(tmp_path / "r.md"), "--device", "cpu"]
    )
    assert rc == 0
    captured = capsys.readouterr()
    label = shapes_for("bias_only_layer_norm", "cpu", quick=True)[0].label
    assert f"[1/1] bias_only_layer_norm {label} eager" in captured.err
    assert "bias_only_layer_norm" in captured.out  # the table
    pngs = sorted(os.listdir(d))
    assert pngs == ["op_bias_only_layer_norm_float32.png"]
    with open(d / pngs[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "r.md").read_text()
    assert "| op |" in md and "torch " + torch.__version__ in md


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as e:
        main(["bench", "--quick", "--ops", "gated_adapter", "--plot", str(tmp_path / "p")])
    assert e.value.code == 2
    assert "pip install 'unipelt-fast[bench]'" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["bench", "--ops", "flash_attention"], "--ops: unknown value 'flash_attention'"),
        (["bench", "--dtype", "float8"], "--dtype: unknown value 'float8'"),
        (["bench", "--model", "gpt2"], "--model: unknown value 'gpt2'"),
        (["bench", "--impls", "xla"], "--impls: unknown value 'xla'"),
        (["bench", "--device", "tpu"], "--device: unknown value 'tpu'"),
        (["bench", "--ops", "none"], "nothing to run"),
        (["bench", "--ops", ","], "--ops: empty list"),
        (["bench", "--rep-ms", "abc"], "invalid float value"),
        (["bench", "--threads", "0"], "--threads: must be >= 1"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_options(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_model_level_quick(tmp_path):
    j = tmp_path / "m.json"
    rc = main(["bench", "--quick", "--model", "bert-base", "--json", str(j), "--no-progress"])
    assert rc == 0
    doc = _load_strict(j)
    rows = {(r["impl"], r["pass"]): r for r in doc["rows"]}
    assert all(r["kind"] == "model" and r["op"] == "bert-base" for r in doc["rows"])
    full, frozen = rows[("full_ft", "train")], rows[("frozen_base", "infer")]
    assert full["available"] and frozen["available"]
    assert full["time_ms"] > 0 and frozen["time_ms"] > 0
    assert full["trainable_params"] == full["params"] and frozen["trainable_params"] == 0
    assert full["saved_extra_bytes"] > 0
    summary = doc["summary"]["models"]["bert-base"]
    for impl in ("unipelt_eager", "unipelt_fused"):
        train = rows[(impl, "train")]
        if train["available"]:
            assert summary[f"{impl}_train_frac_of_full_ft"] == pytest.approx(
                train["time_ms"] / full["time_ms"]
            )
            assert train["trainable_params"] > 0
        else:
            assert train["reason"] and f"{impl}_train_frac_of_full_ft" not in summary
    # CPU: the fused backend at model level is not run
    assert not rows[("unipelt_fused", "train")]["available"]


def test_console_script_help():
    exe = os.path.join(os.path.dirname(sys.executable), "unipelt-fast")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "unipelt_fast.cli"]
    r = subprocess.run(cmd + ["bench", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--quick", "--ops", "--dtype", "--json", "--csv", "--plot", "--model"):
        assert flag in r.stdout


def test_floor_fraction_plumbing():
    """The GPU-only floor columns, fed measured limits by hand: floor = max(bytes / bw,
    FLOPs / peak), fraction = floor / measured time, for forward and forward + backward."""
    from unipelt_fast.bench import floors, suite
    from unipelt_fast.bench.runners import TimerCfg, make_timer

    shape = shapes_for("bias_only_linear", "cpu", quick=True)[0]
    task = suite.OpTask("bias_only_linear", shape, torch.float32, ["eager"])
    name, timer = make_timer(torch.device("cpu"), TimerCfg(cpu_min_run_s=0.01))
    limits = {"bandwidth_bytes_per_s": 1e9, "peak_flops_per_s": {"float32": 1e10}}
    (row,) = suite.run_op_task(task, torch.device("cpu"), timer, name, limits, quick=True)
    p = shape.params
    M, K, N = p["M"], p["K"], p["N"]
    bytes_fwd = 4 * (M * K + N * K + N + M * N)  # x, W, b read; y written
    assert row["bytes_fwd"] == bytes_fwd and row["flops_fwd"] == 2 * M * K * N
    assert row["flops_fwdbwd"] == 4 * M * K * N  # backward: dx only
    want = 1e3 * max(bytes_fwd / 1e9, 2 * M * K * N / 1e10)
    assert row["floor_ms_fwd"] == pytest.approx(want)
    assert row["floor_frac_fwd"] == pytest.approx(want / row["fwd_ms"])
    assert row["floor_frac_fwdbwd"] == pytest.approx(row["floor_ms_fwdbwd"] / row["fwdbwd_ms"])
    assert floors.floor_ms(1.0, 1.0, None, None) is None  # CPU: no limits, no floor


def _only_model_rows(monkeypatch, *impls: str) -> None:
    """Run only these model rows (each costs a model build and a warm-up step; the peers'
    rows are checked by test_model_level_quick, which runs every row)."""
    from unipelt_fast.bench import models

    rows = tuple(r for r in models.MODEL_ROWS if r[0] in impls)
    assert {r[0] for r in rows} == set(impls)
    monkeypatch.setattr(models, "MODEL_ROWS", rows)


def test_model_fractions_with_a_stand_in_unipelt(tmp_path, monkeypatch):
    """The UniPELT rows and the paper's fractions, with BitFit standing in for
    apply_unipelt (whatever the real one is, this checks the bench plumbing around it)."""
    import unipelt_fast

    _only_model_rows(monkeypatch, "full_ft", "frozen_base", "unipelt_eager", "unipelt_fused")

    calls = []

    def fake_apply(model, cfg, backend="auto"):
        calls.append((cfg.gate_mode, backend))
        return unipelt_fast.bitfit(model, backend=backend)

    class FakeConfig:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    monkeypatch.setattr(unipelt_fast, "apply_unipelt", fake_apply, raising=False)
    monkeypatch.setattr(unipelt_fast, "UniPELTConfig", FakeConfig, raising=False)
    j = tmp_path / "m.json"
    assert main(["bench", "--quick", "--model", "bert-base", "--json", str(j)]) == 0  # has biases
    doc = _load_strict(j)
    rows = {(r["impl"], r["pass"]): r for r in doc["rows"]}
    assert set(calls) == {("mean", "eager")}  # fused: not on a CPU
    train, infer = rows[("unipelt_eager", "train")], rows[("unipelt_eager", "infer")]
    assert train["available"] and infer["available"]
    assert 0 < train["trainable_params"] < train["params"]  # biases only
    full, frozen = rows[("full_ft", "train")], rows[("frozen_base", "infer")]
    fr = doc["summary"]["models"]["bert-base"]
    assert fr["unipelt_eager_train_frac_of_full_ft"] == pytest.approx(
        train["time_ms"] / full["time_ms"]
    )
    assert fr["unipelt_eager_infer_frac_of_frozen"] == pytest.approx(
        infer["time_ms"] / frozen["time_ms"]
    )
    assert train["frac_of_baseline"] == fr["unipelt_eager_train_frac_of_full_ft"]
    assert full["frac_of_baseline"] == 1.0
    assert not rows[("unipelt_fused", "train")]["available"]


def test_cpu_timer_spread_is_the_iqr_of_the_repeats(monkeypatch):
    """The CPU timer's p25/p75 are the quartiles of torch.utils.benchmark's per-run times."""
    from torch.utils import benchmark

    from unipelt_fast.bench.runners import TimerCfg, make_timer

    class FakeMeasurement:
        times = [0.004, 0.001, 0.003, 0.002, 0.005]  # seconds per run, as benchmark gives

    monkeypatch.setattr(
        benchmark.Timer, "blocked_autorange", lambda self, min_run_time: FakeMeasurement()
    )
    _, timer = make_timer(torch.device("cpu"), TimerCfg())
    t = timer(lambda: None)
    assert float(t) == pytest.approx(3.0) and (t.p25, t.p75) == pytest.approx((2.0, 4.0))


def _bench_out(capsys, ops, impls, *extra):
    argv = ["bench", "--quick", "--ops", ops, "--impls", impls, "--no-progress"]
    assert main(argv + ["--device", "cpu", *extra]) == 0
    return capsys.readouterr().out


def test_default_table_fits_120_columns_and_wide_has_every_column(capsys):
    out = _bench_out(capsys, "gated_adapter", "eager,triton,cuda")
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    assert "gated_adapter" in out and "±" in out
    assert re.search(r"^\[\d\] unavailable: needs a CUDA GPU", out, re.M)  # footnoted notes
    wide = _bench_out(capsys, "bias_only_layer_norm", "eager,cuda", "--wide")
    head = next(line for line in wide.splitlines() if line.startswith("op "))
    for col in ("shape", "dtype", "fwd ms", "bwd ms", "fwd+bwd ms", "saved MiB", "peak MiB"):
        assert col in head
    assert "unavailable: needs a CUDA GPU" in wide  # the full note, inline


def test_version_no_args_and_help_markup(capsys):
    from unipelt_fast import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"unipelt-fast {__version__}"
    assert main([]) == 2  # no command: the help, not argparse's error
    out = capsys.readouterr()
    assert "usage: unipelt-fast" in out.out and "bench" in out.out
    assert "required" not in out.err
    for argv in (["--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "``" not in text, text
    assert "--wide" in text


def test_plot_shows_every_row_and_says_why_timings_are_missing(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    figs = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure,
        "savefig",
        lambda self, *a, **k: (figs.append(self), save(self, *a, **k)),
    )
    j = tmp_path / "p.json"
    argv = ["bench", "--quick", "--ops", "gated_adapter", "--impls", "eager,triton,cuda"]
    assert main(argv + ["--device", "cpu", "--plot", str(tmp_path), "--json", str(j)]) == 0
    rows = _load_strict(j)["rows"]
    (fig,) = figs
    time_ax, mem_ax = fig.axes[:2]
    labels = [t.get_text() for t in time_ax.get_xticklabels()]
    assert labels == ["eager", "triton", "cuda"]  # every row, available or not
    no_time = [t for t in time_ax.texts if t.get_text() == "no time"]
    assert len(no_time) == sum(r.get("fwdbwd_ms") is None for r in rows) == 2
    foot = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    assert "No timing for" in foot and "cuda: needs a CUDA GPU" in foot
    with_bytes = [r for r in rows if r.get("saved_bytes")]
    assert len(mem_ax.patches) == len(with_bytes)  # saved-bytes bars, also the interpreter's
    heights = sorted(p.get_height() for p in mem_ax.patches)
    assert heights == pytest.approx(sorted(r["saved_bytes"] / 2**20 for r in with_bytes))


def test_like_for_like_rows_and_speedups():
    """Each peer has this package's same-configuration rows next to it, and the summary's
    speedup is the peer's time over ours (the times are written here)."""
    from unipelt_fast.bench import models

    names = [r for r, _, _ in models.MODEL_ROWS]
    for ours, peer in models.LIKE_FOR_LIKE.items():
        assert {f"{ours}_eager", f"{ours}_fused", peer} <= set(names)
    rows = [
        {"impl": "full_ft", "pass": "train", "available": True, "time_ms": 10.0},
        {"impl": "frozen_base", "pass": "infer", "available": True, "time_ms": 2.0},
        {"impl": "peft_prefix", "pass": "train", "available": True, "time_ms": 6.0},
        {"impl": "peft_prefix", "pass": "infer", "available": True, "time_ms": 3.0},
        {"impl": "as_peft_prefix_fused", "pass": "train", "available": True, "time_ms": 4.0},
        {"impl": "as_peft_prefix_fused", "pass": "infer", "available": False},
    ]
    fr = models.fractions(rows)
    assert fr["as_peft_prefix_fused_train_speedup_vs_peft_prefix"] == pytest.approx(1.5)
    assert fr["as_peft_prefix_fused_train_frac_of_full_ft"] == pytest.approx(0.4)
    assert fr["peft_prefix_infer_frac_of_frozen"] == pytest.approx(1.5)
    assert "as_peft_prefix_fused_infer_speedup_vs_peft_prefix" not in fr
    mixed = [
        {"impl": "as_adapters_unipelt_eager", "pass": "train", "available": True, "time_ms": 5.0},
        {"impl": "as_adapters_unipelt_mixed_eager", "pass": "train", "available": True,
         "time_ms": 5.5},
        {"impl": "adapters_unipelt", "pass": "train", "available": True, "time_ms": 8.0},
        {"impl": "adapters_unipelt_mixed", "pass": "train", "available": True, "time_ms": 22.0},
    ]  # fmt: skip
    fr = models.fractions(mixed)
    assert fr["as_adapters_unipelt_mixed_eager_train_mix_cost"] == pytest.approx(1.1)
    assert fr["adapters_unipelt_mixed_train_mix_cost"] == pytest.approx(2.75)
    assert fr[
        "as_adapters_unipelt_mixed_eager_train_speedup_vs_adapters_unipelt_mixed"
    ] == pytest.approx(4.0)
    assert fr["as_adapters_unipelt_eager_train_speedup_vs_adapters_unipelt"] == pytest.approx(1.6)


def test_as_peft_prefix_trains_what_peft_trains():
    """The like-for-like row's configuration holds exactly peft's prefix (P x layers x 2 x
    Hkv x D values, nothing else trained besides the heads both train)."""
    peft = pytest.importorskip("peft")
    from unipelt_fast.bench import models

    cpu = torch.device("cpu")
    ref, _, _ = models.build_model("llama-1b-like", True, cpu, torch.float32)
    ref = models.adapt(ref, "peft_prefix", cpu)
    assert isinstance(ref, peft.PeftModel)
    want = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    m, _, _ = models.build_model("llama-1b-like", True, cpu, torch.float32)
    m = models.adapt(m, "as_peft_prefix:eager", cpu)
    got = {n: p.numel() for n, p in m.named_parameters() if p.requires_grad}
    assert sum(got.values()) == want, got
    assert all(n.startswith("unipelt.prefix.") for n in got), got
    with pytest.raises(NotImplementedError, match="decoder self-attention"):
        bart, _, _ = models.build_model("bart-base", True, cpu, torch.float32)
        models.adapt(bart, "as_peft_prefix:eager", cpu)


def test_model_level_bart_quick(tmp_path, monkeypatch):
    _only_model_rows(monkeypatch, "full_ft", "frozen_base", "unipelt_eager")
    j = tmp_path / "m.json"
    rc = main(["bench", "--quick", "--ops", "none", "--model", "bart-base", "--json", str(j),
               "--no-progress"])  # fmt: skip
    assert rc == 0
    rows = {(r["impl"], r["pass"]): r for r in _load_strict(j)["rows"]}
    for key in [("full_ft", "train"), ("frozen_base", "infer"), ("unipelt_eager", "train"),
                ("unipelt_eager", "infer")]:  # fmt: skip
        assert rows[key]["available"] and rows[key]["time_ms"] > 0, rows[key]
    assert 0 < rows[("unipelt_eager", "train")]["trainable_params"] < rows[key]["params"]
    assert "layers=2+2" in rows[("full_ft", "train")]["shape"]


def test_prefix_attention_dropout_shape_runs_dropout_everywhere():
    """The dropout bench shape: every row and peer drops (two calls differ; the same seed
    repeats), at the shape's p; the no-dropout shape is deterministic."""
    shapes = shapes_for("prefix_attention", "cpu", quick=True)
    drop = [s for s in shapes if s.params.get("dropout")]
    plain = [s for s in shapes if not s.params.get("dropout")]
    assert drop and plain and drop[0].params["dropout"] == 0.1 and "dropout=0.1" in drop[0].label
    case = make_case("prefix_attention", drop[0], torch.float32, "cpu")
    assert case.kwargs["dropout_p"] == 0.1
    for impl in ("eager", "torch", "sdpa_preconcat", "concat_mask_sdpa"):
        run = case.runner(impl)
        torch.manual_seed(1)
        a = run().detach()
        b = run().detach()
        torch.manual_seed(1)
        c = run().detach()
        assert not torch.equal(a, b) and torch.equal(a, c), impl
    case = make_case("prefix_attention", plain[0], torch.float32, "cpu")
    assert "dropout_p" not in case.kwargs
    run = case.runner("eager")
    assert torch.equal(run().detach(), run().detach())


def test_prefix_attention_flag_rows_time_the_flags_and_skip_the_peers():
    """The quick tier's softcap/sinks/window row: the op's backends get every flag (sinks
    receive a gradient), its flag_cost_fwdbwd is over the flag-off row of the same impl, and
    the peers are unavailable with a reason rather than timing another computation."""
    from unipelt_fast.bench import suite
    from unipelt_fast.bench.runners import Timing, interpreter_on
    from unipelt_fast.bench.shapes import _pa

    shapes = shapes_for("prefix_attention", "cpu", quick=True)
    flagged = [s for s in shapes if "softcap" in s.params]
    assert len(flagged) == 1
    flags = flagged[0]
    assert flags.params["sinks"] and flags.params["window"] > 0
    assert all(w in flags.label for w in ("softcap=50.0", "sinks", "window="))
    plain = shapes[0]
    assert {k: v for k, v in flags.params.items() if k not in ("softcap", "sinks", "window")} == (
        plain.params
    )
    case = make_case("prefix_attention", flags, torch.float32, "cpu")
    assert case.kwargs["softcap"] == 50.0 and case.kwargs["window"] == flags.params["window"]
    H = flags.params["H"]
    assert case.tensors["sinks"].shape == (H,) and case.tensors["sinks"].requires_grad
    case.runner("torch")().backward(case.grad_out)
    assert case.tensors["sinks"].grad.abs().sum() > 0  # the op used the sinks
    off = make_case("prefix_attention", plain, torch.float32, "cpu")  # same q/k/v (seed)
    assert not torch.allclose(case.runner("eager")(), off.runner("eager")())

    impls = ["eager", "torch", "triton", "sdpa_preconcat", "concat_mask_sdpa"]
    ms = {plain.label: 2.0, flags.label: 3.0}
    rows = []
    for shape in (plain, flags):

        def timer(fn, grad_to_none=None, t=ms[shape.label]):
            fn()
            return Timing(t)

        # triton (the interpreter: no timing) only where it exercises the flags
        want = impls if shape is flags else [i for i in impls if i != "triton"]
        task = suite.OpTask("prefix_attention", shape, torch.float32, want)
        rows += list(suite.run_op_task(task, torch.device("cpu"), timer, "fake", {}, True))
    suite.add_flag_cost(rows)
    got = {r["impl"]: r for r in rows if r["shape"] == flags.label}
    for impl in ("eager", "torch"):
        assert got[impl]["available"] and got[impl]["flag_cost_fwdbwd"] == pytest.approx(1.5)
        assert "x1.50 of flags off" in got[impl]["note"]
    if interpreter_on():
        assert got["triton"]["available"] and got["triton"]["saved_bytes"] > 0, got["triton"]
    for peer in ("sdpa_preconcat", "concat_mask_sdpa"):
        assert not got[peer]["available"] and "not comparable" in got[peer]["reason"]
        assert got[peer].get("fwd_ms") is None
    assert all("flag_cost_fwdbwd" not in r for r in rows if r["shape"] == plain.label)

    # A window alone: concat_mask_sdpa puts it in its mask and computes what the op does.
    win = make_case("prefix_attention", _pa(2, 4, 64, 8, 32, causal=True, window=16),
                    torch.float32, "cpu")  # fmt: skip
    ref = win.runner("eager")().detach()
    torch.testing.assert_close(win.runner("concat_mask_sdpa")().detach(), ref)
    with pytest.raises(NotImplementedError, match="window"):
        win.runner("sdpa_preconcat")
