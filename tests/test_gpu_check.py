"""benchmarks/gpu_check.sh without a GPU (issue 26): the dry run of every stage, a kill at a
random moment, the compile-variant budget of stages A and B, and the README table.

The dry run (``GPU_CHECK_DRY=1``) runs each stage on CPU under the Triton interpreter at tiny
shapes; its smoke stage compares the kernels with the float64 reference, so a wrong kernel
fails here too.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from unipelt_fast.bench import gpu_check
from unipelt_fast.bench.runners import make_case

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGE_FILES = ("smoke.jsonl", "bench.jsonl", "models.jsonl")


def _run(out: Path, kill_after: float | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_DRY": "1", "PYTHON": sys.executable}
    cmd = ["bash", str(SCRIPT), str(out)]
    if kill_after is not None:
        cmd = ["timeout", "-s", "INT", f"{kill_after:.1f}", *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _strict_lines(path: Path) -> list[dict]:
    """Every line of a stage file, each a whole JSON object (no NaN), the file ending in a
    newline: what a reader of an interrupted run relies on."""
    text = path.read_text()
    assert text == "" or text.endswith("\n"), f"{path.name}: a half-written last line"

    def no_nan(c):
        raise ValueError(f"{path.name}: non-standard JSON constant {c}")

    return [json.loads(x, parse_constant=no_nan) for x in text.splitlines()]


def _check_names(out: Path) -> list[str]:
    names = sorted(os.listdir(out))
    assert len(names) <= gpu_check.MAX_FILES, names
    assert all(gpu_check.LEGAL_NAME.match(n) and (out / n).is_file() for n in names), names
    return names


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check")
    r = _run(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_dry_run_files(dry_run):
    names = _check_names(dry_run)
    assert names == sorted(
        gpu_check.FILES[k] for k in ("env", "log", "A", "B", "C", "D", "summary")
    )
    env = (dry_run / "env.txt").read_text()
    assert "device: cpu" in env and "dry_run: True" in env and "torch: " in env
    summary = (dry_run / "summary.md").read_text()
    for stage in ("0", "A", "B", "C", "D"):  # each stage ran to its end
        assert f"| {stage} | rc=0 " in summary, summary[:2000]


def test_dry_run_smoke(dry_run):
    rows = _strict_lines(dry_run / "smoke.jsonl")
    cases = gpu_check.smoke_cases(tiny=True)
    triton = [r for r in rows if r["backend"] == "triton"]
    assert [(r["op"], r["case"]) for r in triton] == [(c.op, c.label) for c in cases]
    assert {r["dtype"] for r in triton} == {"float32", "float16"}
    bad = [r for r in triton if r["status"] != "pass"]
    assert not bad, bad
    for r in triton:  # the output and every differentiated input were compared
        assert "out" in r["errors"] and any(k.startswith("grad_") for k in r["errors"]), r
    cuda = [r for r in rows if r["backend"] == "cuda"]
    assert len(cuda) == len(cases) and all(r["status"] == "skipped" for r in cuda)


def test_dry_run_bench_and_models(dry_run):
    bench = _strict_lines(dry_run / "bench.jsonl")
    ops = {(r.get("check_id"), r.get("impl")): r for r in bench if r.get("kind") == "op"}
    for cid, _op, _shape, impls in gpu_check.bench_plan(tiny=True):
        for impl in impls:
            assert (cid, impl) in ops, (cid, impl)
    assert ops[("pa_long", "triton")]["available"]  # the interpreter: saved bytes, no time
    for key in (("pa_long", "sdpa_preconcat"), ("decode", "sdpa_preconcat"),
                ("gated_adapter", "eager")):  # fmt: skip
        assert ops[key]["available"] and ops[key]["fwd_ms"] > 0, ops[key]
    assert not ops[("pa_long", "cuda")]["available"]
    models = _strict_lines(dry_run / "models.jsonl")
    rows = {(r["impl"], r["pass"]): r for r in models if r.get("kind") == "model"}
    for key in (("full_ft", "train"), ("frozen_base", "infer"), ("unipelt_eager", "train")):
        assert rows[key]["available"] and rows[key]["time_ms"] > 0, rows[key]
    assert any(r.get("kind") == "model_summary" for r in models)
    log = (dry_run / "tests.log").read_text()
    assert "skipped" in log and "error" not in log.lower(), log[-2000:]


def test_kill_at_a_random_moment(tmp_path):
    """timeout -s INT at a random moment of the dry run: what is there is whole."""
    seed = random.randrange(1 << 30)
    at = random.Random(seed).uniform(1.0, 20.0)
    r = _run(tmp_path, kill_after=at)
    info = f"killed at {at:.1f} s (seed {seed}); rc {r.returncode}\n{r.stdout[-2000:]}"
    assert r.returncode in (124, 130, 0), info
    names = _check_names(tmp_path)
    for n in STAGE_FILES:
        if n in names:
            _strict_lines(tmp_path / n)
    assert "summary.md" in names, info
    assert (tmp_path / "summary.md").read_text().startswith("# GPU check summary"), info


def test_compile_variants_within_budget():
    """Stages A and B, counted with the resources machinery (no GPU): the Triton compiles
    they trigger on sm_90 stay within gpu_check.COMPILE_BUDGET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-m", "unipelt_fast.bench.gpu_check", "variants"],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    n = json.loads(r.stdout.strip().splitlines()[-1])
    # Every op's kernels were recorded (a broken recorder would count nothing).
    for k in ("_fwd_kernel", "_bwd_dq_kernel", "_ga_fwd_kernel", "_act_fwd_kernel",
              "_ln_fwd_kernel", "_dropout_mask_kernel"):  # fmt: skip
        assert n["kernels"].get(k, 0) >= 1, n
    assert n["A"] >= 4 * len(gpu_check.OPS) and n["B"] >= 4, n
    assert n["A+B"] <= gpu_check.COMPILE_BUDGET, n


# ---- the README table ----------------------------------------------------------------------


def _synthetic_results(d: Path) -> None:
    """Hand-made figures: each expected verdict below is worked out from these numbers."""

    def op(cid, impl, **kw):
        return {"stage": "B", "kind": "op", "check_id": cid, "impl": impl, **kw}

    bench = [
        # 5e11 FLOP in 1 ms = 500 TFLOP/s (>= 450: met); 1.25e12 in 5 ms = 250 (< 340)
        op("pa_long", "triton", available=True, flops_fwd=5e11, fwd_ms=1.0,
           flops_fwdbwd=1.25e12, fwdbwd_ms=5.0),
        op("pa_long", "sdpa_preconcat", available=True, fwd_ms=1.1, fwdbwd_ms=4.0),
        op("pa_encoder", "triton", available=False, reason="RuntimeError: boom"),
        op("gated_adapter", "triton", available=True, fwdbwd_ms=1.0, floor_frac_fwdbwd=0.9),
        op("gated_adapter", "eager", available=True, fwdbwd_ms=4.0),
    ]  # fmt: skip
    models = [
        {"stage": "C", "kind": "model_summary", "op": "llama-1b-like",
         "unipelt_fused_train_frac_of_full_ft": 0.35, "unipelt_fused_infer_frac_of_frozen": 1.2},
    ]  # fmt: skip
    for name, rows in (("bench.jsonl", bench), ("models.jsonl", models)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "env.txt").write_text("device: NVIDIA H100 80GB HBM3\ncommit: 0123456789abcdef\n")
    (d / "reasons.json").write_text(
        json.dumps({"llama-1b-like:unipelt_fused_infer_frac_of_frozen": "adapter launch overhead"})
    )


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| what"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_readme_table_from_synthetic_results(tmp_path):
    _synthetic_results(tmp_path)
    text = gpu_check.readme_table(str(tmp_path))
    assert "NVIDIA H100 80GB HBM3" in text and "0123456789ab" in text
    rows = _table_rows(text)
    fwd = rows["prefix_attention fwd, L=4096, P=64, D=128"]
    assert fwd[1:3] == ["500 TFLOP/s", "yes"], fwd
    fb = rows["prefix_attention fwd+bwd, L=4096, P=64, D=128"]
    assert fb[1:3] == ["250 TFLOP/s", "**no**"] and fb[3], fb  # a miss has a reason
    sdpa = rows["prefix_attention vs SDPA (flash) on pre-concatenated K/V, L=4096"]
    assert sdpa[1] == "fwd 1.10x, fwd+bwd 0.80x" and sdpa[2] == "**no**", sdpa
    enc = rows["prefix_attention vs concat+mask+SDPA, L=512, P=32, B=16, H=16"]
    assert enc[1:3] == ["-", "-"] and "boom" in enc[3], enc
    assert rows["gated_adapter fwd+bwd, d=4096, r=64, M=16k"][1:3] == ["90%", "yes"]
    assert rows["gated_adapter fwd+bwd vs eager"][1:3] == ["fwd+bwd 4.00x", "yes"]
    comp = rows["gated_adapter fwd+bwd vs compile"]
    assert comp[2] == "-" and "compile did not run" in comp[3], comp
    assert rows["UniPELT training step (llama-1b-like, fused)"][1:3] == ["35%", "yes"]
    inf = rows["UniPELT inference (llama-1b-like, fused)"]
    assert inf[1:] == ["120%", "**no**", "adapter launch overhead"], inf


def test_readme_table_between_markers(tmp_path):
    _synthetic_results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{gpu_check.BEGIN}\nold table\n{gpu_check.END}\noutro\n")
    assert gpu_check.main(["table", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"intro\n{gpu_check.BEGIN}\n") and text.endswith(
        f"{gpu_check.END}\noutro\n"
    )
    assert "old table" not in text and "500 TFLOP/s" in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        gpu_check.main(["table", str(tmp_path), "--readme", str(readme)])
    assert readme.read_text() == "no markers\n"


def test_pack_after_an_interrupted_stage(tmp_path):
    """summary.md from a stage cut short: its failure listed, the cut stated, stages that
    never started marked, a stray temp file of a killed writer removed."""
    fail = {"stage": "A", "op": "gated_adapter", "case": "odd", "backend": "triton",
            "dtype": "float16", "status": "fail", "errors": {"out": 0.5, "grad_x": 1e-3},
            "tol": 0.01, "worst": 50.0}  # fmt: skip
    (tmp_path / "smoke.jsonl").write_text(
        json.dumps(fail) + "\n" + json.dumps({"stage": "A", "kind": "interrupted"}) + "\n"
    )
    (tmp_path / "check.log").write_text("gpu_check: stage A rc=130 seconds=120 cap=120\n")
    stray = tmp_path / "summary.md.4242.tmp"
    stray.write_text("half")
    os.utime(stray, (0, 0))
    assert gpu_check.pack(str(tmp_path)) == []
    text = (tmp_path / "summary.md").read_text()
    assert "| A | rc=130 seconds=120 cap=120 (interrupted: its last cases did not run) |" in text
    assert "| B | did not run |" in text
    assert "- gated_adapter [odd] triton float16: out 5.00e-01" in text
    assert "| gated_adapter | triton | float16 | 0 | 1 | 0 | 0 | 0 |" in text
    assert not stray.exists()


# ---- the decode row's cost and peers -----------------------------------------------------------


def test_decode_cost_by_hand():
    import torch

    from unipelt_fast.bench import floors
    from unipelt_fast.bench.shapes import decode_shape

    c = floors.op_cost("prefix_attention", decode_shape(quick=False), torch.bfloat16)
    # q and out: 32 heads x 128 x 2 B; K and V: 8 x 8192 x 128 x 2 B; prefix K, V: 8 x 64 x
    # 128 x 2 B; the gate: 4 B. One query sees 64 + 8192 keys in each of 32 heads.
    assert c["bytes_fwd"] == 2 * 8192 + 2 * 16_777_216 + 2 * 131_072 + 4
    assert c["flops_fwd"] == 4 * 32 * 128 * (64 + 8192)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("peer", ["sdpa_preconcat", "concat_mask_sdpa"])
def test_attention_peers_with_gqa_and_short_queries(peer, causal):
    """The SDPA peers compute the op itself (eager reference) when Lq < Lk and Hkv < H."""
    import torch

    from unipelt_fast.bench.shapes import _pa

    shape = _pa(2, 4, 12, 3, 8, causal=causal, Hkv=2, Lq=5)
    case = make_case("prefix_attention", shape, torch.float64, "cpu")
    expected = case.runner("eager")()
    assert expected.shape == (2, 4, 5, 8)
    torch.testing.assert_close(case.runner(peer)(), expected)
