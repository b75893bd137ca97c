"""The GPU machine's stack (transformers 5.17, triton 3.6) imports the package and runs a model.

The GPU check (benchmarks/) runs unattended on that machine, with no network and a few minutes
of time: an import error there costs the whole run. scripts/test.sh runs this file in a venv
pinned to that stack (UNIPELT_DEVICE_STACK=1, constraints/device.txt). In the main venv only
the imports run: there, on CI's versions, tests/test_hf_triton.py checks tiny LLaMA and BERT
logits and gradients on triton against eager and generate() with a cache, and
tests/test_convergence.py trains both on the torch backend against eager (the model tests
here cost ~13 CPU-s more in CI).
"""

import os

import pytest
import torch

import unipelt_fast as up
from tests.hf_tiny import batch, pelt, trainable_grads

DEVICE_STACK = os.environ.get("UNIPELT_DEVICE_STACK") == "1"


device_venv_only = pytest.mark.skipif(
    not DEVICE_STACK, reason="runs in scripts/test.sh's device venv"
)


@device_venv_only
def test_versions_are_the_gpu_machines():
    import numpy
    import transformers
    import triton

    assert transformers.__version__.startswith("5.17."), transformers.__version__
    assert triton.__version__.startswith("3.6."), triton.__version__
    assert tuple(int(p) for p in numpy.__version__.split(".")[:2]) < (2, 4), numpy.__version__


def test_kernels_import():
    for name in ("prefix_attention", "gated_adapter", "bias_only_linear", "bias_only_layer_norm"):
        __import__(f"unipelt_fast.kernels.{name}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@device_venv_only
@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_tiny_model_trains_alike_on_every_backend(kind):
    data = batch(kind)
    runs = {}
    for backend in ("eager", "torch", "triton"):
        model = pelt(kind, backend=backend)
        model.train()
        out = model(**data)
        out.loss.backward()
        runs[backend] = (out.logits.detach(), trainable_grads(model))
    logits, grads = runs["eager"]
    assert torch.isfinite(logits).all()
    for backend in ("torch", "triton"):
        assert _rel(runs[backend][0], logits) < 1e-4, backend
        for name, g in grads.items():
            assert _rel(runs[backend][1][name], g) < 1e-3, (backend, name)


@device_venv_only
@pytest.mark.interpreter
def test_generate_with_cache_matches_eager():
    data = batch("llama", pad=False, n=2)
    tokens = {}
    for backend in ("eager", "triton"):
        model = pelt("llama", backend=backend).eval()
        with torch.no_grad():
            tokens[backend] = model.generate(
                input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                max_new_tokens=3, do_sample=False, pad_token_id=0,
            )
    assert tokens["eager"].shape[1] == data["input_ids"].shape[1] + 3
    assert torch.equal(tokens["eager"], tokens["triton"])
    assert up.__version__
