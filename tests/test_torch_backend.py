"""The `torch` backend (composite torch ops, the CPU default): parity with the eager
reference on the prefix_attention grid (output and every gradient), no fp32 probability
matrix saved, the other ops as eager, and "auto" picking it on CPU tensors."""

import pytest
import torch

import unipelt_fast as uf
from tests.parity import check_parity, gated_adapter_case, prefix_attention_case
from tests.test_prefix_attention import GRID, _id
from unipelt_fast import _backend

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", GRID + [dict(Lq=3, Lk=0, P=0)], ids=_id)
def test_prefix_attention_parity(cfg, dtype):
    check_parity(uf.prefix_attention, prefix_attention_case(**cfg), dtype, "torch")


def test_no_fp32_probability_matrix_is_saved():
    """Autograd keeps no (B, H, Lq, P + Lk) floating tensor: the probabilities are never
    kept (the eager reference keeps them)."""
    B, H, Lq, Lk, P = 2, 4, 33, 40, 8
    case = prefix_attention_case(B=B, H=H, Hkv=2, Lq=Lq, Lk=Lk, P=P, mask=True, causal=True)
    c = case.cast(torch.float32)

    def saved_shapes(backend):
        shapes = []

        def pack(t):
            if t.is_floating_point():
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            c.call(uf.prefix_attention, backend=backend)
        return shapes

    # (B, H, Lq, P+Lk): probabilities. torch's CPU flash kernel keeps its additive form of
    # the mask, (B, 1, Lq, P+Lk): 1/H of that, and not a probability matrix.
    probs = lambda s: s == (B, H, Lq, P + Lk)
    assert any(probs(s) for s in saved_shapes("eager"))  # the check can fail
    assert not any(probs(s) for s in saved_shapes("torch"))


def test_other_ops_run_as_eager():
    case = gated_adapter_case((2, 5), 8, 4, gate_mode="mean", masked=True)
    a = case.cast(torch.float32)
    torch.testing.assert_close(
        a.call(uf.gated_adapter, backend="torch"),
        a.call(uf.gated_adapter, backend="eager"),
        rtol=0,
        atol=0,
    )
    y = case.call(uf.gated_adapter, backend="torch")  # float64 is fine here too
    assert y.dtype == torch.float64


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
