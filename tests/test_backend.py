"""Backend resolution: explicit choices, "auto", set_backend / UNIPELT_BACKEND, and errors."""

import pytest
import torch

import unipelt_fast as uf
from tests.parity import bias_only_linear_case
from unipelt_fast import _backend

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def clean(monkeypatch):
    monkeypatch.delenv("UNIPELT_BACKEND", raising=False)
    uf.set_backend(None)
    yield monkeypatch
    uf.set_backend(None)


def test_auto_cpu(clean):
    clean.setenv("TRITON_INTERPRET", "0")
    assert uf.resolve_backend("auto", CPU, "op") == "torch"
    clean.setenv("TRITON_INTERPRET", "1")
    expect = "triton" if _backend.triton_import_error() is None else "torch"
    assert uf.resolve_backend("auto", CPU, "op") == expect


def test_auto_cuda_prefers_triton_then_cuda_then_eager(clean):
    clean.setattr(_backend, "triton_import_error", lambda: None)
    assert uf.resolve_backend("auto", CUDA, "op") == "triton"
    clean.setattr(_backend, "triton_import_error", lambda: "ImportError: no triton")
    clean.setattr(_backend, "cuda_extension_built", lambda: True)
    assert uf.resolve_backend("auto", CUDA, "op") == "cuda"
    clean.setattr(_backend, "cuda_extension_built", lambda: False)
    assert uf.resolve_backend("auto", CUDA, "op") == "eager"


def test_triton_on_cpu_needs_interpreter(clean):
    clean.setenv("TRITON_INTERPRET", "0")
    clean.setattr(_backend, "triton_import_error", lambda: None)
    with pytest.raises(RuntimeError, match="triton on CPU tensors needs TRITON_INTERPRET=1"):
        uf.resolve_backend("triton", CPU, "gated_adapter")


def test_triton_missing_says_so(clean):
    clean.setattr(_backend, "triton_import_error", lambda: "ImportError: boom")
    with pytest.raises(RuntimeError, match="needs triton, which failed to import .*boom"):
        uf.resolve_backend("triton", CUDA, "prefix_attention")


def test_cuda_backend_needs_cuda_tensors(clean):
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors, got cpu"):
        uf.resolve_backend("cuda", CPU, "bias_only_linear")
    case = bias_only_linear_case(lead=(3,), d_in=4, d_out=5)
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        uf.bias_only_linear(*(t.float() for t in case.args.values()), backend="cuda")


def test_unknown_backend(clean):
    with pytest.raises(ValueError, match="backend must be one of"):
        uf.resolve_backend("numpy", CPU, "op")
    with pytest.raises(ValueError, match="backend must be one of"):
        uf.set_backend("numpy")
    clean.setenv("UNIPELT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="UNIPELT_BACKEND must be one of"):
        uf.get_backend()


def test_process_default(clean):
    clean.setenv("UNIPELT_BACKEND", "eager")
    clean.setenv("TRITON_INTERPRET", "1")
    assert uf.get_backend() == "eager"
    assert uf.resolve_backend("auto", CPU, "op") == "eager"
    uf.set_backend("auto")
    assert uf.get_backend() == "auto"
    with uf.use_backend("eager"):
        assert uf.resolve_backend("auto", CPU, "op") == "eager"
    assert uf.get_backend() == "auto"
    # An explicit backend argument always wins over the default.
    uf.set_backend("cuda")
    assert uf.resolve_backend("eager", CUDA, "op") == "eager"


def test_unwritten_kernels_raise_not_implemented(clean):
    # The message names the op and the backend (no longer an issue number).
    clean.setitem(_backend.REGISTRY, ("gated_adapter", "triton"), _no_module)
    with pytest.raises(
        NotImplementedError,
        match=r"gated_adapter: the triton backend has no implementation of gated_adapter",
    ):
        _backend.kernel_impl("gated_adapter", "triton")


def _no_module():
    raise ModuleNotFoundError(name="unipelt_fast.kernels.gated_adapter")


def test_registry_names_every_op_on_every_kernel_backend():
    ops = ("prefix_attention", "gated_adapter", "bias_only_linear", "bias_only_layer_norm")
    assert set(_backend.REGISTRY) == {(op, be) for op in ops for be in ("triton", "cuda")}


def test_auto_float64_falls_back_to_eager(clean):
    """float64 runs on eager only, so "auto" never picks a kernel backend for it."""
    clean.setattr(_backend, "triton_import_error", lambda: None)
    assert uf.resolve_backend("auto", CUDA, "op", torch.float64) == "eager"
    assert uf.resolve_backend("auto", CUDA, "op", torch.float32) == "triton"
    clean.setenv("TRITON_INTERPRET", "1")
    case = bias_only_linear_case(lead=(3,), d_in=4, d_out=5)
    y = uf.bias_only_linear(*case.args.values(), backend="auto")  # float64 on CPU
    assert y.dtype == torch.float64


# ---- the torch backend (moved from test_torch_backend.py) ---------------------------------


def test_auto_picks_torch_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("UNIPELT_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert uf.resolve_backend("auto", CPU, "prefix_attention") == "torch"
    assert uf.resolve_backend("auto", CPU, "prefix_attention", torch.float64) == "eager"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    want = "triton" if _backend.triton_import_error() is None else "torch"
    assert uf.resolve_backend("auto", CPU, "prefix_attention") == want


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_hf_model_torch_backend_matches_eager(kind):
    """A whole UniPELT model (prefix through the HF attention hook) on backend="torch"
    equals backend="eager": logits and the trainable gradients."""
    from tests.hf_tiny import ADAPTER, batch, perturb, tiny_model

    b = batch(kind)
    res = []
    for backend in ("eager", "torch"):
        m = tiny_model(kind)
        up_cfg = uf.UniPELTConfig(adapter=ADAPTER, lora=True, gate_mode="masked_mean")
        uf.apply_unipelt(m, up_cfg, backend=backend)
        perturb(m)
        out = m(**b)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        res.append((out.logits.detach(), grads))
    (l0, g0), (l1, g1) = res
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys() and any("prefix" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5, msg=n)
