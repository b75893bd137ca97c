"""The CUDA fallback's kernels compile for sm_80 and sm_90 without a GPU (CI has nvcc).

Every csrc/*.cu is compiled with ``nvcc -c`` for both architectures, warnings as errors
(host compiler -Wall -Wextra too), with the half/bf16 macros torch's extension build sets;
CUDA's own headers are system headers and do not count. The .cu files must stay free of
torch headers so that this works with a CPU-only torch. csrc/bindings.cpp needs torch's
CUDA headers, which a CPU torch lacks: it is type-checked against the real torch headers
with two small stand-ins for ATen/cuda/CUDAContext.h and c10/cuda/CUDAGuard.h.
"""

import os
import re
import shutil
import subprocess
import sysconfig
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
        # What torch.utils.cpp_extension adds: no implicit half/bf16 conversions.
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr",
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


# Stand-ins for the two CUDA-only torch headers bindings.cpp uses (same API subset).
_STUBS = {
    "ATen/cuda/CUDAContext.h": """#pragma once
#include <cuda_runtime_api.h>
namespace at { namespace cuda {
struct StubStream { cudaStream_t stream() const { return nullptr; } };
inline StubStream getCurrentCUDAStream() { return StubStream{}; }
} }
""",
    "c10/cuda/CUDAGuard.h": """#pragma once
#include <c10/core/Device.h>
namespace c10 { namespace cuda {
struct CUDAGuard { explicit CUDAGuard(c10::Device) {} };
} }
""",
}


def _cuda_include() -> Path | None:
    """CUDA's include dir, as nvcc itself reports it (falls back to CUDA_HOME)."""
    try:
        out = subprocess.run(
            [NVCC, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        ).stderr
    except (OSError, subprocess.SubprocessError):
        out = ""
    dirs = [Path(m) for m in re.findall(r'INCLUDES="-I([^"]+)"', out)]
    dirs += [Path(os.environ.get(v, "/usr/local/cuda")) / "include" for v in ("CUDA_HOME",)]
    return next((d for d in dirs if (d / "cuda_runtime_api.h").exists()), None)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_bindings_cpp_type_checks_against_torch_headers(tmp_path):
    import torch

    cxx = shutil.which("g++") or shutil.which("c++")
    cuda_inc = _cuda_include()
    py_inc = Path(sysconfig.get_paths()["include"])
    torch_inc = Path(torch.__file__).parent / "include"
    if cxx is None or cuda_inc is None or not (py_inc / "Python.h").exists():
        pytest.skip("needs a host C++ compiler, CUDA headers and Python.h")
    if not (torch_inc / "torch" / "extension.h").exists():
        pytest.skip("this torch ships no C++ headers")
    for rel, text in _STUBS.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    cmd = [
        cxx,
        "-std=c++17",
        "-fsyntax-only",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-I{tmp_path}",
        f"-I{CSRC}",
        *("-isystem", str(torch_inc)),
        *("-isystem", str(torch_inc / "torch" / "csrc" / "api" / "include")),
        *("-isystem", str(cuda_inc)),
        *("-isystem", str(py_inc)),
        str(CSRC / "bindings.cpp"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
