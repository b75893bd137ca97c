"""Shape lists, shared by ``unipelt-fast bench`` and the pytest-benchmark suites.

Three tiers: ``gpu`` (the issue's target shapes), ``cpu`` (small, for a CPU timing run)
and ``quick`` (tiny: ``--quick`` on a CPU, and what the Triton interpreter may run).
On a GPU ``--quick`` uses the ``cpu`` tier.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: a short label and the op's size parameters."""

    label: str
    params: dict = field(default_factory=dict, hash=False, compare=False)


# prefix_attention's optional logit flags; a row with any on is that flag's cost next to the
# same shape's flag-off row (suite.add_flag_cost).
PA_FLAGS = ("softcap", "sinks", "window")


def _pa(
    B, H, L, P, D, causal=False, dropout=0.0, Hkv=None, Lq=None, softcap=None, sinks=False,
    window=None,
) -> Shape:  # fmt: skip
    """L is the token key length; ``Lq`` (default L) the query length and ``Hkv`` (default
    H) the key/value heads, e.g. one decode step: Lq=1, GQA. ``softcap`` (float), ``sinks``
    (True: random (H,) sink logits) and ``window`` (int) turn on the op's flags."""
    flags = {"softcap": softcap, "sinks": sinks or None, "window": window}
    tag = ("causal " if causal else "") + (f"dropout={dropout} " if dropout else "")
    tag += " ".join(k if v is True else f"{k}={v}" for k, v in flags.items() if v is not None)
    params = {"B": B, "H": H, "L": L, "P": P, "D": D, "causal": causal, "dropout": dropout}
    params |= {k: v for k, v in flags.items() if v is not None}
    heads, length = f"H={H}", f"L={L}"
    if Hkv is not None and Hkv != H:
        params["Hkv"], heads = Hkv, f"H={H} Hkv={Hkv}"
    if Lq is not None and Lq != L:
        params["Lq"], length = Lq, f"Lq={Lq} Lk={L}"
    return Shape(f"B={B} {heads} {length} P={P} D={D} {tag}".strip(), params)


def decode_shape(quick: bool) -> Shape:
    """One decode step as ``generate()`` runs it: one query against a long KV cache (GQA)."""
    if quick:
        return _pa(1, 4, 64, 8, 32, Hkv=2, Lq=1)
    return _pa(1, 32, 8192, 64, 128, Hkv=8, Lq=1)


def _ga(B, L, d, r, gate="token") -> Shape:
    tag = "" if gate == "token" else f" gate={gate}"
    return Shape(f"M={B * L} d={d} r={r}{tag}", {"B": B, "L": L, "d": d, "r": r, "gate": gate})


def _gm(B, L, d, r, T) -> Shape:
    return Shape(f"M={B * L} d={d} r={r} T={T}", {"B": B, "L": L, "d": d, "r": r, "T": T})


def _bl(M, K, N, act="gelu") -> Shape:
    return Shape(f"M={M} {K}->{N} {act}", {"M": M, "K": K, "N": N, "activation": act})


def _ln(M, N) -> Shape:
    return Shape(f"M={M} d={N}", {"M": M, "N": N})


SHAPES: dict[str, dict[str, list[Shape]]] = {
    # prefix attention: a long-context decoder layer (LLaMA-7B-like heads, causal) and an
    # encoder batch, that batch again with BERT's 0.1 attention dropout (training mode);
    # H == Hkv so torch SDPA peers need no GQA support. Gate: UniPELT's G_P. Then each
    # logit flag alone on the decoder shape (its cost against the first row; gpu_check's
    # stages read only the first two rows, so these add no Triton variants there), and one
    # tiny row with all three for the CPU tiers.
    "prefix_attention": {
        "gpu": [
            _pa(1, 32, 4096, 64, 128, causal=True),
            _pa(16, 16, 512, 32, 128),
            _pa(16, 16, 512, 32, 128, dropout=0.1),
            _pa(1, 32, 4096, 64, 128, causal=True, softcap=50.0),
            _pa(1, 32, 4096, 64, 128, causal=True, sinks=True),
            _pa(1, 32, 4096, 64, 128, causal=True, window=1024),
        ],
        "cpu": [
            _pa(2, 8, 256, 16, 64),
            _pa(2, 8, 256, 16, 64, dropout=0.1),
            _pa(2, 8, 256, 16, 64, softcap=50.0, sinks=True, window=64),
        ],
        "quick": [
            _pa(2, 4, 64, 8, 32),
            _pa(2, 4, 64, 8, 32, dropout=0.1),
            _pa(2, 4, 64, 8, 32, softcap=50.0, sinks=True, window=16),
        ],
    },
    # gated adapter (relu): M=16384, d=4096, r=64 with the token gate, the "mean" gate over
    # padded examples (two forward launches, per-example row blocks) and no gate; a
    # BERT-base layer.
    "gated_adapter": {
        "gpu": [
            _ga(8, 2048, 4096, 64),
            _ga(8, 2048, 4096, 64, "mean"),
            _ga(8, 2048, 4096, 64, "none"),
            _ga(32, 128, 768, 64),
        ],
        "cpu": [_ga(4, 128, 768, 64), _ga(4, 128, 768, 64, "mean")],
        "quick": [_ga(2, 64, 128, 16)],
    },
    # mixed-task batch (adapter_index), T tasks spread over the batch: 1, 4 and 16 tasks at
    # the same size, so each T row against the T=1 row is the cost of mixing.
    "gated_adapter_mixed": {
        "gpu": [_gm(32, 128, 768, 64, T) for T in (1, 4, 16)],
        "cpu": [_gm(16, 64, 256, 16, T) for T in (1, 4, 16)],
        "quick": [_gm(16, 4, 64, 16, T) for T in (1, 4, 16)],
    },
    # BitFit linear: an up-projection d_in=4096 -> d_out=16384 with gelu, and BERT's FFN-in.
    "bias_only_linear": {
        "gpu": [_bl(16384, 4096, 16384), _bl(4096, 768, 3072)],
        "cpu": [_bl(512, 768, 3072)],
        "quick": [_bl(128, 128, 256)],
    },
    "bias_only_layer_norm": {
        "gpu": [_ln(16384, 4096), _ln(4096, 768)],
        "cpu": [_ln(1024, 768)],
        "quick": [_ln(128, 256)],
    },
}


def tier(device_type: str, quick: bool) -> str:
    if device_type == "cuda":
        return "cpu" if quick else "gpu"
    return "quick" if quick else "cpu"


def shapes_for(op: str, device_type: str, quick: bool) -> list[Shape]:
    """The shapes ``op`` is benchmarked at on this kind of device."""
    return SHAPES[op][tier(device_type, quick)]


# Model-level sizes: (config overrides, batch, seq_len). "full" is the named model,
# "tiny" the --quick stand-in with the same architecture.
MODEL_SIZES: dict[str, dict[str, dict]] = {
    "bert-base": {
        "full": {
            "config": dict(
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                intermediate_size=3072,
                vocab_size=30522,
            ),
            "batch": 32,
            "seq_len": 128,
        },
        "tiny": {
            "config": dict(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                vocab_size=1000,
            ),
            "batch": 2,
            "seq_len": 16,
        },
    },
    # BART-base (6 + 6 layers, d 768): summarisation-like, 512 source and 128 target tokens.
    "bart-base": {
        "full": {
            "config": dict(
                d_model=768,
                encoder_layers=6,
                decoder_layers=6,
                encoder_attention_heads=12,
                decoder_attention_heads=12,
                encoder_ffn_dim=3072,
                decoder_ffn_dim=3072,
                vocab_size=50265,
                max_position_embeddings=1024,
            ),
            "batch": 16,
            "seq_len": 512,
            "target_len": 128,
        },
        "tiny": {
            "config": dict(
                d_model=64,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=128,
                decoder_ffn_dim=128,
                vocab_size=1000,
                max_position_embeddings=64,
            ),
            "batch": 2,
            "seq_len": 16,
            "target_len": 8,
        },
    },
    # Llama-3.2-1B's body (hidden 2048, 16 layers, GQA 32/8, SwiGLU 8192) with a 32k vocab.
    "llama-1b-like": {
        "full": {
            "config": dict(
                hidden_size=2048,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                intermediate_size=8192,
                vocab_size=32000,
                max_position_embeddings=4096,
            ),
            "batch": 4,
            "seq_len": 1024,
        },
        "tiny": {
            "config": dict(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=128,
                vocab_size=1000,
                max_position_embeddings=128,
            ),
            "batch": 2,
            "seq_len": 16,
        },
    },
}
