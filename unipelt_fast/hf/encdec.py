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

from .layout import AttentionBlock, FFNBlock, ModelLayout

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


def ffn_blocks(model: nn.Module) -> list[FFNBlock]:
    """Every layer's FFN, encoder stack then decoder stack. "ffn_output" wraps its output
    projection (before dropout, residual and LayerNorm, like BERT's output.dense); the
    residual placements attach where ``s = x + h`` is visible (layout.FFN_STYLES)."""
    enc, dec = _stacks(model)
    stacks = [("enc", enc), ("dec", dec)]
    out = []
    if model.config.model_type in T5_FAMILY:  # T5LayerFF: the FFN before dropout + residual
        for stack, blocks in stacks:
            for blk in blocks:
                ff = (blk.layer, str(len(blk.layer) - 1))
                out.append(FFNBlock((blk.layer[-1], "DenseReluDense"), ff, "sublayer", None, stack))
        return out
    post_ln = ffn_is_post_ln(model.config.model_type)
    for stack, layers in stacks:
        parent = model.get_encoder() if stack == "enc" else model.get_decoder()
        for i, layer in enumerate(layers):
            if post_ln:  # BART, Marian: wrap the post-FFN norm; x is fc1's input
                blk = FFNBlock(
                    (layer, "fc2"),
                    (layer, "final_layer_norm"),
                    "post_ln_norm",
                    (layer, "fc1"),
                    stack,
                )
            else:  # mBART, Pegasus: hook the layer (it returns s); x is the pre-FFN norm's input
                blk = FFNBlock(
                    (layer, "fc2"),
                    (parent.layers, str(i)),
                    "sublayer",
                    (layer, "final_layer_norm"),
                    stack,
                )
            out.append(blk)
    return out


def ffn_is_post_ln(model_type: str) -> bool:
    """BART and Marian normalise after the FFN's residual add (post-LN); mBART, Pegasus and
    T5 normalise the FFN's input (pre-LN)."""
    return model_type in ("bart", "marian")


def layout(model: nn.Module, dims: dict) -> ModelLayout:
    """An encoder-decoder's layout: attention sites in prefix order (encoder self, decoder
    self, decoder cross), FFNs of both stacks, the encoder."""
    t5 = model.config.model_type in T5_FAMILY
    names = ("q", "k", "v") if t5 else ("q_proj", "k_proj", "v_proj")
    attention = [
        AttentionBlock(
            attn,
            {r: (attn, n, None) for r, n in zip(("query", "key", "value"), names, strict=True)},
            None,  # "attn_and_ffn_output" is not supported here
            stack,
            kind,
        )
        for attn, stack, kind in attention_sites(model)
    ]
    family = "t5" if t5 else "bart"
    return ModelLayout(dims, family, attention, ffn_blocks(model), encoder=model.get_encoder())
