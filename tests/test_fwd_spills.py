"""No register spills in the prefix-attention forward's autotuning candidates (fp16/bf16).

A spilling candidate costs local-memory traffic on every key block; autotuning must never
be able to pick one. Three checks: ``fwd_candidates`` never offers a tile that ``unipelt-fast
resources`` showed spilling (a static table of them, from the report of 2026-12-06, in
docs/resources.md); the attn_bias forward (T5's position-bias path, which spilled in every
candidate before its own tile set) compiles without spills for sm_80 and sm_90 in fp16 and
bf16 (a compile of a few kernels, no GPU); and ``_autotune`` drops what spills at run time
(tests/test_autotune.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from unipelt_fast.kernels import prefix_attention as kpa

import unipelt_fast as uf
from tests.parity import check_parity, prefix_attention_case

# (arch, head dim, variant) -> tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) that spilled
# in fp16 or bf16 (per-thread spill stores in the comment, the most over dtypes).
KNOWN_SPILLS: dict[tuple[int, int, str], list[tuple[int, int, int, int]]] = {
    # the plain variant (all of gate, mask, causal on, or one of them off)
    (80, 64, "plain"): [(128, 128, 8, 2), (128, 64, 4, 3)],  # 8 B (causal off); 4 B (mask off)
    (80, 128, "plain"): [(128, 128, 8, 2)],  # 128 B
    (90, 80, "plain"): [(128, 128, 8, 2)],  # 128 B (causal off; 48 B all on)
    (90, 128, "plain"): [(128, 128, 8, 2)],  # 44 B (causal off)
    (90, 80, "dropout"): [(64, 64, 4, 3)],  # 24 B
    # softcap, sinks and window all on
    (80, 80, "features"): [(128, 64, 8, 3)],  # 4 B
    (90, 80, "features"): [(64, 128, 8, 2)],  # 4 B
    (90, 128, "features"): [(64, 128, 8, 2)],  # 4 B
    # attn_bias with the plain tiles (and a few tried for it)
    (80, 64, "attn_bias"): [
        (128, 128, 8, 2),  # 3708 B
        (128, 128, 8, 3),  # 3174 B
        (128, 64, 4, 3),  # 500 B (the plain default)
        (128, 32, 4, 3),  # 24 B
        (64, 64, 4, 3),  # 8 B
        (128, 32, 4, 2),  # 44 B
    ],
    (90, 64, "attn_bias"): [
        (128, 128, 8, 2),  # 544 B
        (128, 128, 8, 3),  # 496 B
        (128, 64, 4, 3),  # 60 B
    ],
    (80, 80, "attn_bias"): [
        (128, 64, 8, 3),  # 10264 B (the plain default)
        (128, 32, 8, 3),  # 132 B
        (64, 64, 4, 3),  # 24 B
        (64, 128, 8, 2),  # 8 B
    ],
    (90, 80, "attn_bias"): [
        (128, 128, 8, 2),  # 376 B
        (64, 64, 4, 3),  # 76 B
        (128, 64, 8, 3),  # 44 B
        (64, 128, 8, 2),  # 16 B
    ],
    (80, 128, "attn_bias"): [
        (128, 64, 8, 2),  # 10492 B
        (128, 64, 8, 3),  # 2776 B (the plain default)
        (128, 32, 8, 2),  # 136 B
        (128, 32, 8, 3),  # 88 B
        (64, 64, 4, 1),  # 24 B
        (64, 64, 4, 3),  # 20 B
        (64, 64, 4, 2),  # 8 B
    ],
    (90, 128, "attn_bias"): [
        (64, 64, 4, 1),  # 44 B
        (64, 64, 4, 2),  # 12 B
        (128, 64, 8, 2),  # 8 B
    ],
}


def _offered(arch: int, D: int, variant: str) -> list[tuple[int, int, int, int]]:
    """What autotuning may launch: every candidate in fp16 and bf16."""
    return [
        c
        for dt in (torch.float16, torch.bfloat16)
        for c in kpa.fwd_candidates(
            dt, D, arch, variant == "dropout", variant == "attn_bias", variant == "features"
        )
    ]


@pytest.mark.parametrize("key", sorted(KNOWN_SPILLS), ids=lambda k: f"sm{k[0]}-D{k[1]}-{k[2]}")
def test_candidates_never_include_a_tile_that_spilled(key):
    arch, D, variant = key
    offered = set(_offered(arch, D, variant))
    assert not offered & set(KNOWN_SPILLS[key]), (key, offered & set(KNOWN_SPILLS[key]))


def test_attn_bias_candidates_are_their_own_and_few():
    for arch in (80, 90):
        for D in (64, 80, 128):
            for dt in (torch.float16, torch.bfloat16):
                c = kpa.fwd_candidates(dt, D, arch, False, True)
                assert 1 <= len(c) <= 4 and len(set(c)) == len(c)
                assert all(bm >= 16 and bn >= 16 for bm, bn, _, _ in c)  # tl.dot on a GPU
                assert kpa.fwd_candidates(dt, D, arch, True, True) == c
    assert kpa.fwd_candidates(torch.float32, 64, 90, False, True) == [
        kpa.gpu_configs(torch.float32, 64)["fwd"]
    ]


BIAS_TILES = sorted({(bm, bn) for tiles in kpa.BIAS_FWD.values() for bm, bn, _, _ in tiles})


@pytest.mark.interpreter
@pytest.mark.parametrize("tile", BIAS_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_attn_bias_tiles_interpreter(tile, monkeypatch):
    """The attn_bias forward at each of its GPU tiles (two query blocks and a ragged key
    block, a 32-wide prefix tile for P = 20, causal, padding, gate) matches the reference."""
    real = kpa._configs
    monkeypatch.setattr(kpa, "_configs", lambda q, D: {**real(q, D), "fwd": (*tile, 4, 2)})
    case = prefix_attention_case(
        B=2, H=2, Hkv=1, Lq=tile[0] + 9, Lk=tile[1] + 5, P=20, D=32, causal=True, mask=True,
        gate="b2", bias="1hqk",
    )  # fmt: skip
    check_parity(uf.prefix_attention, case, torch.float16, "triton")


def test_attn_bias_forward_compiles_without_spills(tmp_path):
    """T5's head dim (64): every attn_bias forward candidate, sm_80 and sm_90, fp16 and
    bf16, compiled as a launch specialises it (12 compiles, about a minute on 2 cores)."""
    pytest.importorskip("triton.backends.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    res = subprocess.run(
        [sys.executable, "-m", "unipelt_fast.cli", "resources", "--op", "prefix_attention",
         "--kernel", "_fwd_kernel", "--dtype", "fp16,bf16", "--head-dim", "64",
         "--variant", "attn_bias", "--cache", "", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())
    got = {(r["arch"], r["dtype"]): set() for r in rows}
    for r in rows:
        assert r["variant"]["attn_bias"] and r["kernel"] == "_fwd_kernel", r
        c = r["config"]
        got[r["arch"], r["dtype"]].add(
            (c["BLOCK_M"], c["BLOCK_N"], r["num_warps"], r["num_stages"])
        )
    # Every candidate was compiled: the rows are the launcher's set for each arch and dtype.
    for arch in (80, 90):
        for dt, t in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            assert got[f"sm_{arch}", dt] == set(kpa.fwd_candidates(t, 64, arch, False, True))
    spills = [
        (r["arch"], r["dtype"], r["config"], r["spill_bytes"]) for r in rows if r["spill_bytes"]
    ]
    assert not spills, spills
    assert all(r["regs"] <= 255 and r["fits"] for r in rows)
