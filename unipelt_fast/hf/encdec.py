"""Encoder-decoder wiring: the BART family (BART, mBART, Marian, Pegasus) and the T5
family (T5, mT5; Flan-T5 configs are T5 configs).

Li & Liang's prefix tuning for BART puts a prefix in every attention: encoder
self-attention, decoder self-attention (causal over tokens) and decoder cross-attention.
Each such "attention site" gets its own layer of the prefix encoder (so the prefix MLP is
sized for enc_layers + 2 * dec_layers sites) and its own gate. Sites are numbered encoder
self, then decoder self, then decoder cross. Cross-attention reads the encoder padding mask
for the encoder token keys only (never the prefix), and is not causal. With the
encoder-decoder KV cache the prefixes never enter the cache: the cache holds the k/v
projections, and prefix_attention adds the prefix inside the op.

T5's attention is unscaled (softmax_scale 1.0) with a relative position bias: it reaches
prefix_attention as ``attn_bias`` (see attention.py), token keys keeping their relative
positions and prefix keys getting zero bias.
"""

from __future__ import annotations

import torch.nn as nn

# model types whose layers are BART's (self_attn / encoder_attn with q/k/v/out_proj, fc2)
BART_FAMILY = ("bart", "mbart", "marian", "pegasus")
# T5Stack blocks: layer[0].SelfAttention, (decoder) layer[1].EncDecAttention, layer[-1] FFN
T5_FAMILY = ("t5", "mt5")
ATTENTION_TYPES = ("self", "cross")


def is_encdec(model_type: str) -> bool:
    return model_type in BART_FAMILY or model_type in T5_FAMILY


def encdec_dims(config) -> dict:
    if config.model_type in T5_FAMILY:
        enc, dec = config.num_layers, config.num_decoder_layers
        return {
            "model_type": config.model_type,
            "hidden": config.d_model,
            "n_layers": enc + 2 * dec,
            "n_ffn": enc + dec,
            "n_heads": config.num_heads,
            "n_kv_heads": config.num_heads,
            "head_dim": config.d_kv,
            "vocab_size": getattr(config, "vocab_size", None),
        }
    enc, dec = config.encoder_layers, config.decoder_layers
    heads = config.encoder_attention_heads
    if config.decoder_attention_heads != heads:
        raise NotImplementedError(
            "apply_unipelt: encoder and decoder with different head counts are not supported"
        )
    return {
        "model_type": config.model_type,
        "hidden": config.d_model,
        "n_layers": enc + 2 * dec,  # attention sites: one prefix layer (and gate) each
        "n_ffn": enc + dec,
        "n_heads": heads,
        "n_kv_heads": heads,
        "head_dim": config.d_model // heads,
        "vocab_size": getattr(config, "vocab_size", None),
    }


def _stacks(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    enc, dec = model.get_encoder(), model.get_decoder()
    if hasattr(enc, "block"):  # T5Stack
        return list(enc.block), list(dec.block)
    return list(enc.layers), list(dec.layers)


def attention_sites(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(attention module, stack "enc"/"dec", type "self"/"cross") in site order."""
    enc, dec = _stacks(model)
    if model.config.model_type in T5_FAMILY:
        return (
            [(blk.layer[0].SelfAttention, "enc", "self") for blk in enc]
            + [(blk.layer[0].SelfAttention, "dec", "self") for blk in dec]
            + [(blk.layer[1].EncDecAttention, "dec", "cross") for blk in dec]
        )
    return (
        [(layer.self_attn, "enc", "self") for layer in enc]
        + [(layer.self_attn, "dec", "self") for layer in dec]
        + [(layer.encoder_attn, "dec", "cross") for layer in dec]
    )


def ffn_targets(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(layer, "fc2", stack): the adapter wraps the FFN output projection of every layer
    of both stacks (before dropout, residual and LayerNorm, like BERT's output.dense)."""
    enc, dec = _stacks(model)
    if model.config.model_type in T5_FAMILY:  # T5LayerFF: the FFN before dropout + residual
        ffn = [blk.layer[-1] for blk in enc] + [blk.layer[-1] for blk in dec]
        return [
            (f, "DenseReluDense", s)
            for f, s in zip(ffn, ["enc"] * len(enc) + ["dec"] * len(dec), strict=True)
        ]
    return [(layer, "fc2", "enc") for layer in enc] + [(layer, "fc2", "dec") for layer in dec]


def ffn_is_post_ln(model_type: str) -> bool:
    """BART and Marian normalise after the FFN's residual add (post-LN); mBART, Pegasus and
    T5 normalise the FFN's input (pre-LN)."""
    return model_type in ("bart", "marian")


def lora_family(model_type: str) -> str:
    """The families.py naming of the q/k/v projections."""
    return "t5" if model_type in T5_FAMILY else "llama"  # T5: q/k/v; BART: q_proj/...
