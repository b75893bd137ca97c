"""pytest-benchmark suites: ``pytest benchmarks/ --benchmark-only`` (needs the [bench] extra).

Shapes come from ``unipelt_fast.bench.shapes`` (the CLI's lists): the GPU tier when CUDA is
available, the tiny ``--quick`` tier otherwise. Rows that cannot run here (a kernel not
written yet, no GPU) are skipped with the reason. ``UNIPELT_BENCH_DTYPE`` overrides the
dtype (default bfloat16 on a GPU, float32 on a CPU); ``UNIPELT_BENCH_BASE_QUANT`` (one of
``unipelt_fast.bench.models.BASE_QUANTS``) quantizes the model rows' base, as the CLI's
``--base-quant`` does.
"""

from __future__ import annotations

import os

import pytest
import torch

from unipelt_fast.bench import models
from unipelt_fast.bench.report import device_name
from unipelt_fast.bench.runners import first_line, make_case, suite_env
from unipelt_fast.bench.suite import _skip_reason

DEVICE, QUICK, DTYPE = suite_env()  # GPU shapes on a GPU, the tiny tier on a CPU
BASE_QUANT = os.environ.get("UNIPELT_BENCH_BASE_QUANT") or None
if BASE_QUANT is not None and BASE_QUANT not in models.BASE_QUANTS:
    raise ValueError(
        f"UNIPELT_BENCH_BASE_QUANT: unknown value {BASE_QUANT!r}; choose from {models.BASE_QUANTS}"
    )
CUDA = DEVICE.type == "cuda"


def pytest_configure(config):
    # --benchmark-only runs only tests that request `benchmark`; a row skipped before
    # using it (no GPU, kernel not written) is expected, not worth a warning.
    config.addinivalue_line("filterwarnings", "ignore:Benchmark fixture was not used")


def pytest_collect_file(parent, file_path):
    """Collect ``bench_*.py`` (the test command's testpaths never reach this folder)."""
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)  # named on the command line: pytest has it
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _sync(fn):
    if not CUDA:
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.fixture
def op_benchmark(benchmark):
    """``op_benchmark(op, shape, impl, pass_)``: benchmark one row ("fwd" or "fwdbwd")."""

    def run(op, shape, impl, pass_):
        reason = _skip_reason(impl, DEVICE, DTYPE, QUICK)
        if reason is not None:
            pytest.skip(reason)
        if impl == "triton" and not CUDA:
            pytest.skip("Triton interpreter: not a speed figure")
        case = make_case(op, shape, DTYPE, DEVICE)
        try:
            fn = case.runner(impl)
            fn().backward(case.grad_out)  # warm-up: compile, autotune, or raise
        except (NotImplementedError, RuntimeError) as e:
            pytest.skip(first_line(e))
        case.zero_grads()
        if pass_ == "fwd":
            target = fn
        else:

            def target():
                case.zero_grads()
                fn().backward(case.grad_out)

        benchmark.group = f"{op} {shape.label} {pass_}"
        benchmark.extra_info.update(
            op=op,
            shape=shape.label,
            impl=impl,
            dtype=str(DTYPE).replace("torch.", ""),
            device=device_name(DEVICE),
        )
        benchmark(_sync(target))

    return run


@pytest.fixture
def model_benchmark(benchmark):
    """``model_benchmark(name, row, mode, how)``: one training step or inference forward."""

    def run(name, row, mode, how):
        try:
            fn, info = models.prepare(name, how, mode, QUICK, DEVICE, DTYPE, base_quant=BASE_QUANT)
        except Exception as e:  # noqa: BLE001 - not installed / not written / no GPU
            pytest.skip(first_line(e))
        benchmark.group = f"{name} {mode}"
        benchmark.extra_info.update(row=row, device=device_name(DEVICE), **info)
        benchmark.pedantic(_sync(fn), rounds=3 if QUICK else 10, warmup_rounds=1)

    return run
