"""pytest-benchmark: bias_only_layer_norm on every backend and peer, at the CLI's shapes."""

import pytest

from unipelt_fast.bench.runners import impls_for, suite_env
from unipelt_fast.bench.shapes import shapes_for

DEVICE, QUICK, _ = suite_env()
OP = "bias_only_layer_norm"
SHAPES = shapes_for(OP, DEVICE.type, QUICK)


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", impls_for(OP))
@pytest.mark.parametrize("shape", SHAPES, ids=[s.label.replace(" ", "_") for s in SHAPES])
def test_bias_only_layer_norm(op_benchmark, shape, impl, pass_):
    op_benchmark(OP, shape, impl, pass_)
