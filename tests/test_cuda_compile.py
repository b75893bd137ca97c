"""The CUDA fallback's kernels compile for sm_80 and sm_90 without a GPU (CI has nvcc).

Every csrc/*.cu is compiled with ``nvcc -c`` for both architectures, warnings as errors
(host compiler -Wall -Wextra too); CUDA's own headers are system headers and do not count.
The .cu files must stay free of torch headers so that this works with a CPU-only torch.
"""

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
OPS = ("prefix_attention", "gated_adapter", "bias_only_linear", "bias_only_layer_norm")
ARCHS = ("80", "90")
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|caffe2)/', re.MULTILINE)

NVCC = shutil.which("nvcc")


def _cu_files():
    return sorted(CSRC.glob("*.cu"))


def test_one_cu_file_per_op():
    names = {p.stem for p in _cu_files()}
    missing = [op for op in OPS if op not in names]
    assert not missing, f"csrc/ lacks a .cu file for {missing}"


def test_kernel_sources_include_no_torch_header():
    files = _cu_files() + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h"))
    assert files
    bad = [p.name for p in files if TORCH_INCLUDE.search(p.read_text())]
    assert not bad, f"torch/ATen/c10 headers included by {bad}: only bindings.cpp may"


def _nvcc(src: Path, out_dir: Path) -> tuple[str, int, str]:
    cmd = [
        NVCC,
        "-c",
        str(src),
        "-o",
        str(out_dir / (src.stem + ".o")),
        "-std=c++17",
        "-O3",
        f"-I{CSRC}",
        *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS),
        "-Werror",
        "all-warnings",
        "-Xcompiler",
        "-Wall,-Wextra,-Werror",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return src.name, proc.returncode, proc.stdout + proc.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_every_cu_file_compiles_for_sm80_and_sm90_without_warnings(tmp_path):
    files = _cu_files()
    assert files
    workers = max(1, min(len(files), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda f: _nvcc(f, tmp_path), files))
    failures = [
        f"--- {name} (exit {rc}) ---\n{out}"
        for name, rc, out in results
        if rc != 0 or re.search(r"\bwarning\b", out, re.IGNORECASE)
    ]
    assert not failures, "\n".join(failures)
    for f in files:
        assert (tmp_path / (f.stem + ".o")).stat().st_size > 0
