"""UniPELT on quantized bases: bitsandbytes 4-bit NF4 / 8-bit (through transformers'
BitsAndBytesConfig) and torchao int8 weight-only. Every method trains, the quantized weights
stay quantized, frozen and unchanged, and BitFit adds no dense copy of a quantized weight.

CPU: bitsandbytes' CPU backend and torchao; the CUDA path is the ``gpu`` test.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

import unipelt_fast as up
from tests.hf_tiny import ADAPTER, batch, tiny_model
from unipelt_fast.bitfit import is_quantized
from unipelt_fast.hf.report import _nbytes

KIND = "qwen2"  # LLaMA-family with q/k/v biases: BitFit has biases on quantized layers
CFG = dict(lora=True, adapter=ADAPTER, prompt=up.PromptConfig(length=2))  # + bitfit, prefix


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    tiny_model(KIND).save_pretrained(str(path))
    return str(path)


def _load(how: str, saved: str, device: str = "cpu"):
    import transformers as tf

    if how == "torchao_int8":
        pytest.importorskip("torchao")
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        m = tiny_model(KIND).to(device)
        quantize_(m, Int8WeightOnlyConfig())
        return m
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    if how == "bnb_nf4":
        q = tf.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    else:
        q = tf.BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tf.AutoModelForCausalLM.from_pretrained(
            saved, quantization_config=q, device_map=device, dtype=torch.float32
        )


def _quantized_weights(model) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """name -> (module, a copy of its stored quantized data)."""
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and is_quantized(w):
            data = w.qdata if hasattr(w, "qdata") else w.data  # torchao: the int8 values
            out[name] = (mod, data.detach().clone())
    return out


def _memory(model) -> int:
    seen, n = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            n += _nbytes(t)
    return n


def _check(how: str, saved: str, device: str) -> None:
    m = _load(how, saved, device)
    quantized = _quantized_weights(m)
    assert len(quantized) >= 14, how  # q/k/v/o + 3 MLP projections in both layers
    before, old = _memory(m), {id(p) for p in m.parameters()}
    up.apply_unipelt(m, up.UniPELTConfig(**CFG), backend="eager")
    tuned = [p for p in m.parameters() if p.requires_grad]
    added = sum(_nbytes(p) for p in tuned if id(p) not in old)
    # nothing dense added for a quantized weight: the memory grew by the new tuned tensors only
    assert _memory(m) == before + added, how
    modules = {id(mod) for mod in m.modules()}
    biases = []
    for name, (mod, _) in quantized.items():
        assert id(mod) in modules, name  # the quantized layer itself still computes
        assert not mod.weight.requires_grad and is_quantized(mod.weight), name
        if getattr(mod, "bias", None) is not None:
            assert mod.bias.requires_grad, name  # BitFit trains it through the layer
            biases.append(mod.bias)
    assert len(biases) == 6, how  # q/k/v biases of 2 layers
    report = up.trainable_report(m)
    assert f"{len(quantized)} of them quantized" in report, report
    start = [p.detach().clone() for p in tuned]
    opt = torch.optim.AdamW(tuned, lr=1e-2, weight_decay=0.0)
    b = {k: v.to(device) for k, v in batch(KIND, n=2).items()}
    m.train()
    losses = []
    for _ in range(2):
        loss = m(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    moved = [not torch.equal(p, s) for p, s in zip(tuned, start, strict=True)]
    assert all(moved), f"{how}: {moved.count(False)} tuned tensors did not train"
    for name, (mod, data) in quantized.items():
        w = mod.weight
        now = w.qdata if hasattr(w, "qdata") else w.data
        assert torch.equal(now, data), name  # still the same quantized values


@pytest.mark.parametrize("how", ["bnb_nf4", "bnb_int8", "torchao_int8"])
def test_every_method_trains_on_a_quantized_base(how, saved):
    _check(how, saved, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["bnb_nf4", "bnb_int8"])
def test_every_method_trains_on_a_quantized_base_cuda(how, saved):
    _check(how, saved, "cuda")
