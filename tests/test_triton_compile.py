"""Every Triton kernel compiled for real GPUs (sm_80, sm_90) without a GPU, and fitting them.

The interpreter runs the kernels' math but not the GPU compiler, which rejects things the
interpreter accepts (tl.dot dims < 16, non-constexpr globals, shared memory over budget).
``unipelt-fast resources`` (unipelt_fast/resources.py) compiles each launch exactly as a real
launch specialises it; CI runs its representative subset (``--quick``: bf16 and fp32, the
largest tiles of every op, both archs) and checks every row fits the arch. The full matrix
(every dtype, head dim, adapter width and flag) is the ``slow`` test.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from unipelt_fast import resources

pytest.importorskip("triton")
try:  # the AOT entry points (triton >= 3.0)
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.compiler import ASTSource  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the triton build
    pytest.skip(f"this triton has no AOT compiler API: {e}", allow_module_level=True)

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels"


def _launched_kernels() -> set[str]:
    """Every @triton.jit function that some launcher launches (name[grid](...))."""
    names = set()
    for f in KERNELS.glob("*.py"):
        src = f.read_text()
        for name in re.findall(r"@triton\.jit[^\n]*\ndef (\w+)", src):
            if re.search(rf"\b{name}\[", src):
                names.add(name)
    return names


def _report(tmp_path, *extra: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    res = subprocess.run(
        [sys.executable, "-m", "unipelt_fast.cli", "resources", "--json", str(out), *extra],
        env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "rows:" in res.stdout, res.stdout[-2000:]
    return json.loads(out.read_text())


def _check(rows: list[dict]) -> None:
    assert {r["kernel"] for r in rows} >= _launched_kernels()
    # No register spills in prefix attention in half precision up to head dim 128
    # (tests/test_fwd_spills.py). Not yet asserted elsewhere: gated_adapter's
    # _ga_bwd_cols_kernel spills 4 B on sm_90 in bf16 (d=4096, r=256, mixed tasks).
    spills = [(r["kernel"], r["arch"], r["dtype"], r["head_dim"], r["variant"], r["config"],
               r["spill_bytes"]) for r in rows if r["spill_bytes"]
              and r["op"] == "prefix_attention" and r["dtype"] in ("fp16", "bf16")
              and r["head_dim"] <= 128]  # fmt: skip
    assert not spills, spills
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    bad = [r for r in rows if not r["fits"]]
    assert not bad, bad
    for r in rows:
        limit = resources.LIMITS[int(r["arch"][3:])]["shared_block"]
        assert r["shared_bytes"] <= limit and r["regs"] <= 255, r
        assert r["blocks_per_sm"] >= 1, r


def test_quick_report_fits(tmp_path):
    rows = _report(tmp_path, "--quick", "--cache", "")
    _check(rows)
    fields = {"op", "kernel", "arch", "dtype", "head_dim", "config", "regs", "spill_bytes",
              "shared_bytes", "num_warps", "num_stages", "blocks_per_sm"}  # fmt: skip
    assert fields <= set(rows[0])
    # The launch's own config and options (not a copy of them): the forward at D=128 bf16.
    import torch
    from unipelt_fast.kernels import prefix_attention as kpa

    # Every autotuning candidate of that forward is a row, the default among them.
    fwd = [r for r in rows if r["kernel"] == "_fwd_kernel" and r["dtype"] == "bf16"
           and r["head_dim"] == 128 and r["arch"] == "sm_90" and not r["variant"]["attn_bias"]]  # fmt: skip
    got = {(r["config"]["BLOCK_M"], r["config"]["BLOCK_N"], r["num_warps"], r["num_stages"])
           for r in fwd}  # fmt: skip
    assert got == set(kpa.fwd_candidates(torch.bfloat16, 128, 90))
    assert kpa.gpu_configs(torch.bfloat16, 128)["fwd"] in got
    pre = [r for r in rows if r["kernel"] == "_dropout_mask_kernel"]  # launched without any
    assert pre and all(r["num_stages"] == 3 and r["num_warps"] == 4 for r in pre)  # defaults


@pytest.mark.slow
def test_full_report_fits(tmp_path):
    """Every dtype, head dim, adapter width and flag (about 10 minutes on 2 cores)."""
    _check(_report(tmp_path))


def test_blocks_per_sm_bounds():
    """Occupancy arithmetic: threads, registers and shared memory each bound it."""
    assert resources.blocks_per_sm(90, 32, 0, 4) == 16  # 2048 threads / 128
    assert resources.blocks_per_sm(90, 255, 0, 8) == 1  # 256 regs * 256 threads = 64K
    assert resources.blocks_per_sm(80, 64, 100 * 1024, 4) == 1  # 164 KB / 101 KB
    assert resources.blocks_per_sm(90, 64, 100 * 1024, 4) == 2  # 228 KB / 101 KB


def test_arch_option_is_checked():
    res = subprocess.run(
        [sys.executable, "-m", "unipelt_fast.cli", "resources", "--arch", "sm_75"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode != 0 and "sm_75" in res.stderr + res.stdout


def test_select_and_flag_cost_table():
    """The report's filters keep what they name; the flag-cost table shows on/off and the
    difference (hand-made rows)."""
    sel = resources.select(resources.cases(), ["prefix_attention"], ["bf16"], [64], ["attn_bias"])
    assert len(sel) == 1 and sel[0].label["attn_bias"] and sel[0].head_dim == 64
    assert not resources.select(resources.cases(), ["gated_adapter"], None, [64])  # no head dim
    row = {"op": "prefix_attention", "kernel": "_fwd_kernel", "arch": "sm_80", "dtype": "bf16",
           "head_dim": 128, "config": {"BLOCK_M": 128, "BLOCK_N": 32, "HAS_BIAS": True},
           "num_warps": 8, "num_stages": 3, "regs": 255, "spill_bytes": 88,
           "shared_bytes": 72 * 1024,
           "without": {"HAS_BIAS": {"regs": 190, "spill_bytes": 0, "shared_bytes": 64 * 1024}}}  # fmt: skip
    line = resources.flag_cost_table([row]).splitlines()[1].split()
    assert line[-6:] == ["HAS_BIAS", "255/190", "88/0", "72.0/64.0", "+65", "+8.0"], line
