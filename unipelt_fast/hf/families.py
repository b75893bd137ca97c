"""Per-family wiring tables: where each model family keeps its attention, FFN and
projections, collected into the model's :class:`~unipelt_fast.hf.layout.ModelLayout`
(:func:`model_layout`; encoder-decoders: ``encdec.py``)."""

from __future__ import annotations

import torch.nn as nn

from . import encdec
from .encdec import encdec_dims, is_encdec
from .layout import AttentionBlock, FFNBlock, ModelLayout

DEFAULT_HEADS = ("classifier", "score", "qa_outputs")
_BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
# each family's names of the query/key/value projections (GPT-2: one fused c_attn)
PROJECTIONS = {
    "bert": {"query": "query", "key": "key", "value": "value"},
    "llama": {"query": "q_proj", "key": "k_proj", "value": "v_proj"},  # and BART's
    "t5": {"query": "q", "key": "k", "value": "v"},
}


def model_dims(config) -> dict:
    """The sizes UniPELT needs (hidden, layers or attention sites, heads, head_dim)."""
    if is_encdec(config.model_type):
        return encdec_dims(config)
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {
        "model_type": config.model_type,
        "hidden": hidden,
        "n_layers": config.num_hidden_layers,
        "n_heads": heads,
        "n_kv_heads": kv,
        "head_dim": head_dim,
        "vocab_size": getattr(config, "vocab_size", None),
    }


def model_family(model_type: str) -> str:
    """The wiring family of a decoder-only or BERT-like model type."""
    if model_type in _BERT_LIKE:
        return "bert"
    if model_type == "gpt2":
        return "gpt2"
    return "llama"  # q_proj/k_proj/v_proj + mlp: LLaMA, Mistral, Qwen2 and relatives


def _attention_modules(model: nn.Module, family: str) -> list[nn.Module]:
    found = []
    for m in model.modules():
        if getattr(m, "is_cross_attention", False):
            continue
        if family == "bert":
            ok = all(hasattr(m, a) for a in ("query", "key", "value", "attention_head_size"))
            ok = ok and "Cross" not in type(m).__name__
        elif family == "gpt2":
            ok = hasattr(m, "c_attn") and hasattr(m, "c_proj")
        else:
            ok = all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if ok:
            found.append(m)
    return found


def _ffn_blocks(model: nn.Module, family: str) -> list[FFNBlock]:
    out = []
    for m in model.modules():
        if family == "bert":  # BertLayer: the *Output module is dense -> LayerNorm(h + x)
            if hasattr(m, "intermediate") and hasattr(getattr(m, "output", None), "dense"):
                out.append(FFNBlock((m.output, "dense"), (m, "output"), "post_ln_output"))
        elif hasattr(m, "mlp") and (hasattr(m, "attn") or hasattr(m, "self_attn")):
            out.append(FFNBlock((m, "mlp"), (m, "mlp"), "pre_ln_mlp", x_from=_ffn_norm(m)))
    return out


def projections(attn: nn.Module, family: str, hidden: int) -> dict:
    """role -> (parent, attribute, output columns or None) of one attention module."""
    if family == "gpt2":  # c_attn's output is [query | key | value]
        return {
            r: (attn, "c_attn", (i * hidden, (i + 1) * hidden))
            for i, r in enumerate(("query", "key", "value"))
        }
    return {role: (attn, name, None) for role, name in PROJECTIONS[family].items()}


def check_residual_placement(block: nn.Module) -> None:
    """Refuse "block_output" / "ffn_parallel" on blocks that add something other than the FFN's
    output to the residual stream (the placements' formulas, hf/placements.py, would silently
    not hold): a norm on the FFN output (Gemma 2/3's sandwich norms, OLMo2's post-norms, where
    post_attention_layernorm normalizes the attention output, not the residual) or a residual
    multiplier (Granite)."""
    placements = "adapter placements 'block_output' and 'ffn_parallel'"
    todo = "use AdapterConfig(placement='ffn_output') or 'attn_and_ffn_output'"
    if isinstance(getattr(block, "post_feedforward_layernorm", None), nn.Module):
        raise NotImplementedError(
            f"apply_unipelt: {placements} on {type(block).__name__}: the block normalizes its "
            "FFN output (post_feedforward_layernorm) before adding it to the residual stream, "
            f"so the placement's formula does not hold there; {todo}"
        )
    mult = getattr(getattr(block, "config", None), "residual_multiplier", 1.0)
    if getattr(block, "residual_multiplier", mult) != 1.0:
        raise NotImplementedError(
            f"apply_unipelt: {placements} on {type(block).__name__}: the block scales its FFN "
            f"output by residual_multiplier={getattr(block, 'residual_multiplier', mult)} "
            f"before adding it to the residual stream; {todo}"
        )


def _ffn_norm(block: nn.Module) -> tuple[nn.Module, str] | None:
    """A pre-LN block's norm before the FFN (its input is the residual stream)."""
    for name in ("ln_2", "post_attention_layernorm"):
        if isinstance(getattr(block, name, None), nn.Module):
            return block, name
    return None


def _attn_outputs(model: nn.Module, attns: list[nn.Module], family: str) -> list:
    """(parent, attribute) of each attention output projection (AdapterHub's mh_adapter
    site), None where not found; for BERT-like models the ``*SelfOutput.dense`` of each
    self-attention's parent."""
    if family == "gpt2":
        return [(a, "c_proj") for a in attns]
    if family == "llama":
        return [(a, "o_proj") for a in attns]
    outs = _bert_attn_outputs(model)
    return outs if len(outs) == len(attns) else [None] * len(attns)


def model_layout(model: nn.Module) -> ModelLayout:
    """Where this model keeps its attention, FFN and projections (layout.py)."""
    dims = model_dims(model.config)
    if is_encdec(dims["model_type"]):
        return encdec.layout(model, dims)
    family = model_family(dims["model_type"])
    attns = _attention_modules(model, family)
    attention = [
        AttentionBlock(a, projections(a, family, dims["hidden"]), out)
        for a, out in zip(attns, _attn_outputs(model, attns, family), strict=True)
    ]
    return ModelLayout(dims, family, attention, _ffn_blocks(model, family))


def _bert_attn_outputs(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [
        (m.output, "dense")
        for m in model.modules()
        if hasattr(m, "self")
        and not getattr(m.self, "is_cross_attention", False)
        and hasattr(getattr(m, "output", None), "dense")
        and hasattr(m.output, "LayerNorm")
    ]
