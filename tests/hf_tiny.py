"""Tiny HF models (hidden 32, 2 layers, vocab 64) built from configs, for the HF tests."""

from __future__ import annotations

import torch
import transformers as tf

import unipelt_fast as up

FAMILIES = ("bert", "roberta", "gpt2", "llama", "mistral", "qwen2")
DECODERS = ("gpt2", "llama", "mistral", "qwen2")
VOCAB, B, L = 64, 3, 8
# hidden/16 = 2 bottleneck units at hidden 32: too few (relu can kill both); use 8 in tests
ADAPTER = up.AdapterConfig(bottleneck=8)


def tiny_model(kind: str, seed: int = 0):
    """A fresh tiny model; the same seed gives the same base weights."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    enc = dict(
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    dec = dict(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "bert":
        m = tf.BertForSequenceClassification(tf.BertConfig(**common, **enc))
    elif kind == "roberta":
        m = tf.RobertaForSequenceClassification(tf.RobertaConfig(**common, **enc, pad_token_id=1))
    elif kind == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        m = tf.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(**common, **dec, bos_token_id=0, eos_token_id=0))
    elif kind == "mistral":
        m = tf.MistralForCausalLM(tf.MistralConfig(**common, **dec, bos_token_id=0, eos_token_id=0))
    elif kind == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, **dec, bos_token_id=0, eos_token_id=0))
    else:
        raise ValueError(kind)
    return m.eval()


def batch(kind: str, seed: int = 1, pad: bool = True, n: int = B) -> dict:
    """input_ids/attention_mask/labels; example 1 is right-padded (left-padded for decoders'
    generate tests is built separately)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, L), generator=g)
    am = torch.ones(n, L, dtype=torch.long)
    if pad:
        am[1, 5:] = 0
    out = {"input_ids": ids, "attention_mask": am}
    if kind in DECODERS:
        out["labels"] = ids.masked_fill(am == 0, -100)
    else:
        out["labels"] = torch.randint(0, 3, (n,), generator=g)
    return out


def perturb(model, scale: float = 0.3, seed: int = 2) -> None:
    """Move every trainable parameter off its init (zero-init B/up would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda t: t[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def pelt(kind: str, cfg: up.UniPELTConfig | None = None, backend: str = "eager", seed: int = 0):
    cfg = cfg or up.UniPELTConfig(lora=True, gate_mode="masked_mean", adapter=ADAPTER)
    m = up.apply_unipelt(tiny_model(kind, seed), cfg, backend=backend)
    perturb(m)
    return m


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
