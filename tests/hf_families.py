"""Tiny random models (hidden 32, 2 layers, vocab 64) of every transformers family the
attention contract and the support table cover, built from configs (no downloads).

Families already in tests/hf_tiny.py and tests/test_hf_encdec.py come from there, so one
family is the same tiny model in every test."""

from __future__ import annotations

import torch
import transformers as tf

from tests.hf_tiny import tiny_model

VOCAB = 64
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
_DEC = dict(num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
_MOE = dict(num_experts_per_tok=2)

# model_type -> (config class, model class, extra config). Decoders with q/k/v/o_proj.
_DECODERS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=8)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=8)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, **_MOE)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=16, head_dim=8, **_MOE),
    ),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(head_dim=8, num_local_experts=4, **_MOE)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),  # fused qkv_proj
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),  # fused, interleaved; parallel
    # multi-query (fused [q | k | v]), parallel attention/FFN; biases for BitFit
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(bias=True)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=64, word_embed_proj_dim=32)),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),  # parallel
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(rotary_dim=4)),  # parallel
}
_MODERNBERT = dict(
    local_attention=16, attention_bias=True, mlp_bias=True, norm_bias=True,
    bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
)  # fmt: skip
# Encoders (right-padded batches, sequence classification with 3 labels).
_ENCODERS = {
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification", dict(hidden_dim=64)),
    "deberta_v2": (
        "DebertaV2Config",
        "DebertaV2ForSequenceClassification",
        dict(relative_attention=True, pos_att_type=["c2p", "p2c"], position_buckets=8),
    ),
    # local layers' window 16 >= the test batches' length (longer: the prefix is refused)
    "modernbert": ("ModernBertConfig", "ModernBertForSequenceClassification", _MODERNBERT),
}
# hf_tiny.py's families, rebuilt here when a test overrides their config (a sliding window)
_OVERRIDABLE = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
}
_HF_TINY = ("bert", "roberta", "gpt2", "llama", "mistral", "qwen2")
_ENCDEC = ("bart", "t5")
DECODERS = ("gpt2", "llama", "mistral", "qwen2", *_DECODERS)
ALL = (*_HF_TINY, *_DECODERS, *_ENCODERS, *_ENCDEC)
_ENC = dict(num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)


def tiny(kind: str, seed: int = 0, **config):
    """A fresh tiny ``kind`` model in eval mode; ``config`` overrides config fields (only for
    the families defined here)."""
    if kind in _HF_TINY and not config:
        return tiny_model(kind, seed)
    if kind in _ENCDEC and not config:
        from tests.hf_tiny import tiny_bart

        return tiny_bart(seed, kind)
    known = {**_ENCODERS, **_OVERRIDABLE}
    if kind not in _DECODERS and kind not in known:
        raise ValueError(f"no tiny {kind} with config overrides")
    cfg_cls, model_cls, extra = _DECODERS.get(kind) or known[kind]
    torch.manual_seed(seed)
    base = {**_COMMON, **(_ENC if kind in _ENCODERS else _DEC)}
    cfg = getattr(tf, cfg_cls)(**{**base, **extra, **config})
    return getattr(tf, model_cls)(cfg).eval()


def tiny_batch(kind: str, seed: int = 1, n: int = 3, length: int = 8) -> dict:
    """input_ids/attention_mask, example 0 left-padded (decoders) or right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    am = torch.ones(n, length, dtype=torch.long)
    if kind in DECODERS:
        am[0, :3] = 0
    else:
        am[0, 5:] = 0
    out = {"input_ids": ids, "attention_mask": am}
    if kind in _ENCDEC:
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (n, 5), generator=g)
    return out
