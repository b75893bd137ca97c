"""Per-family wiring tables: where each model family keeps its attention, FFN and
projections, collected into the model's :class:`~unipelt_fast.hf.layout.ModelLayout`
(:func:`model_layout`; encoder-decoders: ``encdec.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from . import encdec
from .encdec import encdec_dims, is_encdec
from .layout import AttentionBlock, FFNBlock, ModelLayout

DEFAULT_HEADS = ("classifier", "score", "qa_outputs")
_BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
ROLES = ("query", "key", "value")


@dataclass(frozen=True)
class Family:
    """How one wiring family names its attention parts.

    ``projections``: role -> attribute of the attention module, or one attribute (a str)
    for a fused q/k/v projection whose column ranges :func:`fused_columns` gives.
    ``output``: the attention output projection's attribute (None: found per model).
    ``needs``: attributes that identify the attention module (besides the projections)."""

    projections: dict[str, str] | str
    output: str | None
    needs: tuple[str, ...] = ()


FAMILIES = {
    "bert": Family(dict(zip(ROLES, ROLES, strict=True)), None, ("attention_head_size",)),
    "deberta_v2": Family(
        {r: f"{r}_proj" for r in ROLES}, None, ("attention_head_size", "pos_att_type")
    ),
    "distilbert": Family({"query": "q_lin", "key": "k_lin", "value": "v_lin"}, "out_lin"),
    "gpt2": Family("c_attn", "c_proj"),
    "llama": Family({"query": "q_proj", "key": "k_proj", "value": "v_proj"}, "o_proj"),
    "opt": Family({"query": "q_proj", "key": "k_proj", "value": "v_proj"}, "out_proj"),
    "gptj": Family({"query": "q_proj", "key": "k_proj", "value": "v_proj"}, "out_proj"),
    "phi3": Family("qkv_proj", "o_proj"),
    "gpt_neox": Family("query_key_value", "dense", ("rotary_ndims",)),
    "falcon": Family("query_key_value", "dense", ("multi_query",)),
    "modernbert": Family("Wqkv", "Wo"),
}
# model_type -> wiring family (anything else: "llama", LLaMA-like q/k/v/o_proj)
_MODEL_FAMILY = {
    **{t: "bert" for t in _BERT_LIKE},
    "deberta-v2": "deberta_v2",
    "distilbert": "distilbert",
    "gpt2": "gpt2",
    "opt": "opt",
    "gptj": "gptj",
    "phi3": "phi3",
    "gpt_neox": "gpt_neox",
    "falcon": "falcon",
    "modernbert": "modernbert",
}
# each family's names of the query/key/value projections (for encdec.py and the docs)
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
    """The wiring family of a decoder-only or encoder-only model type."""
    return _MODEL_FAMILY.get(model_type, "llama")


def _attention_modules(model: nn.Module, family: str) -> list[nn.Module]:
    spec = FAMILIES[family]
    proj = spec.projections
    names = [proj] if isinstance(proj, str) else [*proj.values()]
    names += [*spec.needs, *([spec.output] if spec.output else [])]
    found = []
    for m in model.modules():
        if getattr(m, "is_cross_attention", False) or "Cross" in type(m).__name__:
            continue
        if all(hasattr(m, a) for a in names):
            found.append(m)
    return found


def fused_columns(attn: nn.Module, family: str, dims: dict) -> dict[str, tuple]:
    """role -> the (start, stop) output column ranges of a fused q/k/v projection, read from
    how each family's attention splits it (transformers 5.x modeling code)."""
    H, D, hidden = dims["n_heads"], dims["head_dim"], dims["hidden"]
    if family == "gpt2":  # c_attn: [query | key | value], hidden columns each
        return {r: ((i * hidden, (i + 1) * hidden),) for i, r in enumerate(ROLES)}
    if family == "modernbert":  # Wqkv viewed (3, H, D): [query | key | value]
        return {r: ((i * H * D, (i + 1) * H * D),) for i, r in enumerate(ROLES)}
    if family == "phi3":  # qkv_proj: [query (H*D) | key (Hkv*D) | value (Hkv*D)]
        q, kv = H * D, dims["n_kv_heads"] * D
        return {"query": ((0, q),), "key": ((q, q + kv),), "value": ((q + kv, q + 2 * kv),)}
    if family == "falcon" and attn.new_decoder_architecture:
        # viewed (Hkv, H/Hkv + 2, D): each group's queries, then its key, then its value
        G, n = H // attn.num_kv_heads, attn.num_kv_heads
        size = (G + 2) * D
        return {
            "query": tuple((g * size, g * size + G * D) for g in range(n)),
            "key": tuple((g * size + G * D, g * size + (G + 1) * D) for g in range(n)),
            "value": tuple((g * size + (G + 1) * D, (g + 1) * size) for g in range(n)),
        }
    if family == "falcon" and attn.multi_query:  # [query (H*D) | key (D) | value (D)]
        q = H * D
        return {"query": ((0, q),), "key": ((q, q + D),), "value": ((q + D, q + 2 * D),)}
    # GPT-NeoX, Falcon without multi-query: viewed (H, 3, D), q/k/v interleaved per head
    return {r: tuple((h * 3 * D + i * D, h * 3 * D + (i + 1) * D) for h in range(H))
            for i, r in enumerate(ROLES)}  # fmt: skip


def projections(attn: nn.Module, family: str, dims: dict) -> dict:
    """role -> (parent, attribute, output column ranges or None) of one attention module."""
    spec = FAMILIES[family]
    if isinstance(spec.projections, str):
        cols = fused_columns(attn, family, dims)
        return {r: (attn, spec.projections, cols[r]) for r in ROLES}
    return {role: (attn, name, None) for role, name in spec.projections.items()}


# Blocks whose attention and FFN both read the block input x: x + attn(x) + ffn(x)
# (GPT-J, Cohere always; GPT-NeoX and Falcon by their configs).
_PARALLEL = ("gptj", "cohere", "cohere2")
_ATTN_NAMES = ("attn", "self_attn", "attention", "self_attention")


def is_parallel(config) -> bool:
    """Does each block run its attention and FFN side by side on the block input?"""
    if config.model_type == "gpt_neox":
        return bool(config.use_parallel_residual)
    if config.model_type == "falcon":
        return bool(config.parallel_attn or config.new_decoder_architecture)
    return config.model_type in _PARALLEL


def _slots(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """id(module) -> (parent, attribute) for every submodule."""
    return {id(c): (p, n) for p in model.modules() for n, c in p.named_children()}


def _ffn_blocks(model: nn.Module, family: str) -> list[FFNBlock]:
    out = []
    config = model.config
    parallel = is_parallel(config)
    slots = _slots(model)
    for m in model.modules():
        if family in ("bert", "deberta_v2"):  # *Layer: its *Output is dense -> LN(h + x)
            if hasattr(m, "intermediate") and hasattr(getattr(m, "output", None), "dense"):
                out.append(FFNBlock((m.output, "dense"), (m, "output"), "post_ln_output"))
        elif family == "distilbert":  # TransformerBlock: output_layer_norm(ffn(x) + x)
            if hasattr(m, "ffn") and hasattr(m, "output_layer_norm"):
                blk = FFNBlock(
                    (m.ffn, "lin2"), (m, "output_layer_norm"), "post_ln_norm", (m, "ffn")
                )
                out.append(blk)
        elif family == "opt":  # the FFN runs inline on (B*L, d) rows
            if hasattr(m, "fc1") and hasattr(m, "final_layer_norm") and hasattr(m, "self_attn"):
                if config.do_layer_norm_before:  # the layer returns s = x + h
                    blk = FFNBlock((m, "fc2"), slots[id(m)], "sublayer", (m, "final_layer_norm"))
                else:  # OPT-350m: final_layer_norm(x + h), on (B, L, d) again
                    blk = FFNBlock((m, "fc2"), (m, "final_layer_norm"), "post_ln_norm", (m, "fc1"))
                blk.flat_rows = True
                out.append(blk)
        elif hasattr(m, "mlp") and any(hasattr(m, a) for a in _ATTN_NAMES):
            if parallel:  # the block returns s = x + attn(x) + h: hook it, x is its input
                out.append(FFNBlock((m, "mlp"), slots[id(m)], "sublayer"))
            else:
                out.append(FFNBlock((m, "mlp"), (m, "mlp"), "pre_ln_mlp", x_from=_ffn_norm(m)))
    return out


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
    for name in ("ln_2", "post_attention_layernorm", "mlp_norm"):
        if isinstance(getattr(block, name, None), nn.Module):
            return block, name
    return None


def _attn_outputs(model: nn.Module, attns: list[nn.Module], family: str) -> list:
    """(parent, attribute) of each attention output projection (AdapterHub's mh_adapter
    site), None where not found; for BERT-like models the ``*SelfOutput.dense`` of each
    self-attention's parent."""
    name = FAMILIES[family].output
    if name is not None:
        return [(a, name) for a in attns]
    outs = _bert_attn_outputs(model)
    return outs if len(outs) == len(attns) else [None] * len(attns)


def model_layout(model: nn.Module) -> ModelLayout:
    """Where this model keeps its attention, FFN and projections (layout.py)."""
    dims = model_dims(model.config)
    if is_encdec(dims["model_type"]):
        return encdec.layout(model, dims)
    family = model_family(dims["model_type"])
    attns = _attention_modules(model, family)
    if attns:  # the key/value heads the attention makes (multi-query Falcon: 1)
        dims["n_kv_heads"] = _kv_heads(attns[0], family, dims)
    attention = [
        AttentionBlock(a, projections(a, family, dims), out)
        for a, out in zip(attns, _attn_outputs(model, attns, family), strict=True)
    ]
    return ModelLayout(dims, family, attention, _ffn_blocks(model, family))


def _kv_heads(attn: nn.Module, family: str, dims: dict) -> int:
    """The number of key heads of one attention module, from its key projection's width
    (a config may carry a num_key_value_heads its family ignores)."""
    parent, attr, cols = projections(attn, family, dims)["key"]
    if cols is not None:
        width = sum(b - a for a, b in cols)
    else:
        proj = getattr(parent, attr)
        width = proj.out_features if hasattr(proj, "out_features") else proj.weight.shape[-1]
    return width // dims["head_dim"]


def _bert_attn_outputs(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [
        (m.output, "dense")
        for m in model.modules()
        if hasattr(m, "self")
        and not getattr(m.self, "is_cross_attention", False)
        and hasattr(getattr(m, "output", None), "dense")
        and hasattr(m.output, "LayerNorm")
    ]
