"""pytest-benchmark: one training step / inference forward of whole models (tiny on CPU)."""

import pytest

from unipelt_fast.bench import MODELS
from unipelt_fast.bench.models import MODEL_ROWS


@pytest.mark.parametrize("row, mode, how", MODEL_ROWS, ids=[f"{r}-{m}" for r, m, _ in MODEL_ROWS])
@pytest.mark.parametrize("name", MODELS)
def test_model(model_benchmark, name, row, mode, how):
    model_benchmark(name, row, mode, how)
