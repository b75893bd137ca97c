"""Per-family wiring tables: where each model family keeps its attention, FFN and projections."""

from __future__ import annotations

import torch.nn as nn

from .encdec import encdec_dims, is_encdec

_DEFAULT_HEADS = ("classifier", "score", "qa_outputs")
_BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert", "electra")


def _dims(config) -> dict:
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


def _family(model_type: str) -> str:
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


def _ffn_targets(model: nn.Module, family: str) -> list[tuple[nn.Module, str]]:
    out = []
    for m in model.modules():
        if family == "bert":
            if hasattr(m, "intermediate") and hasattr(getattr(m, "output", None), "dense"):
                out.append((m.output, "dense"))
        elif hasattr(m, "mlp") and (hasattr(m, "attn") or hasattr(m, "self_attn")):
            out.append((m, "mlp"))
    return out


def _linear_dims(mod: nn.Module) -> tuple[int, int]:
    if hasattr(mod, "in_features"):
        return mod.in_features, mod.out_features
    w = mod.weight  # HF Conv1D: (d_in, d_out)
    return w.shape[0], w.shape[1]


def _lora_targets(attn: nn.Module, family: str, roles, dims) -> list:
    """(parent, attribute, out_slices) per LoRA target of one attention module."""
    if family == "gpt2":
        d = dims["hidden"]
        pos = {"query": 0, "key": 1, "value": 2}
        slices = sorted((pos[r] * d, (pos[r] + 1) * d) for r in roles)
        return [(attn, "c_attn", slices)]
    names = {"query": "query", "key": "key", "value": "value"}
    if family == "t5":
        names = {"query": "q", "key": "k", "value": "v"}
    elif family != "bert":
        names = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
    return [(attn, names[r], None) for r in roles]


def _ffn_norm(block: nn.Module) -> nn.Module | None:
    """A pre-LN block's norm before the FFN (its input is the residual stream).

    Blocks that add something other than the FFN's output to the residual stream are refused
    (the placements' formulas, hf/placements.py, would silently not hold): a norm on the FFN
    output (Gemma 2/3's sandwich norms, OLMo2's post-norms, where post_attention_layernorm
    normalizes the attention output, not the residual) or a residual multiplier (Granite)."""
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
    for name in ("ln_2", "post_attention_layernorm"):
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    return None


def _attn_output_target(attn: nn.Module, family: str) -> tuple[nn.Module, str]:
    """(parent, attribute) of the attention output projection (AdapterHub's mh_adapter site);
    for BERT-like models its ``*SelfOutput.dense``, found from the self-attention's parent."""
    if family == "gpt2":
        return attn, "c_proj"
    if family == "llama":
        return attn, "o_proj"
    raise AssertionError("BERT-like attention outputs are found by _bert_attn_outputs")


def _bert_attn_outputs(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [
        (m.output, "dense")
        for m in model.modules()
        if hasattr(m, "self")
        and not getattr(m.self, "is_cross_attention", False)
        and hasattr(getattr(m, "output", None), "dense")
        and hasattr(m.output, "LayerNorm")
    ]
