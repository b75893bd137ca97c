"""Where a model keeps what the methods attach to: the one description every injector reads.

:func:`~unipelt_fast.hf.families.model_layout` builds it (from the family tables in
``families.py``, or ``encdec.py`` for encoder-decoders); the injectors (``inject.py``) only
read it, so a new family is a new table, not new injection code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

# (parent module, attribute): a submodule, looked up when an injector attaches to it (BitFit
# and the wrappers replace submodules, so a layout never holds a leaf module itself)
Slot = tuple[nn.Module, str]


@dataclass(eq=False)
class AttentionBlock:
    """One attention module: a prefix site, LoRA on its projections, an adapter at its output.

    ``projections``: role ("query"/"key"/"value") -> (parent, attribute, columns): columns
    is None for a projection of its own, or for a fused q/k/v projection (GPT-2's ``c_attn``,
    Phi-3's ``qkv_proj``, GPT-NeoX's and Falcon's ``query_key_value``, ModernBERT's
    ``Wqkv``) the tuple of (start, stop) output column ranges that are this role's: one
    range where the roles are stacked, one per head or head group where they are
    interleaved (``families.fused_columns``). Roles sharing a projection share its module.
    ``output``: the attention output projection ("attn_and_ffn_output"), None where this
    family's is not known. ``stack``: "enc"/"dec" in an encoder-decoder, else None.
    """

    module: nn.Module
    projections: dict[str, tuple[nn.Module, str, tuple[tuple[int, int], ...] | None]]
    output: Slot | None = None
    stack: str | None = None
    kind: str = "self"  # "self" / "cross"


# How "block_output" / "ffn_parallel" attach to an FFN block (placements.py):
#   "post_ln_output": replace ``block`` (BERT's *Output: dense -> LayerNorm(h + x))
#   "pre_ln_mlp":     wrap ``block`` (the MLP); x recorded at ``x_from`` (the pre-FFN norm)
#   "post_ln_norm":   wrap ``block`` (the post-FFN norm); x recorded at ``x_from`` (fc1)
#   "sublayer":       hook ``block`` (returns s = x + h); x is its input, or from ``x_from``
#                     (also a parallel block, GPT-J/Cohere/GPT-NeoX/Falcon: s = x + attn + h)
FFN_STYLES = ("post_ln_output", "pre_ln_mlp", "post_ln_norm", "sublayer")


@dataclass(eq=False)
class FFNBlock:
    """One FFN: ``output`` is its output projection (or the module returning h: "ffn_output"
    wraps it); ``block``, ``style`` and ``x_from`` say where the residual placements go.
    ``flat_rows``: the FFN sees its tokens flattened to (B*L, d) rows (OPT); the "ffn_output"
    adapter runs on them as (B, L, d) (``placements.TokenRows``)."""

    output: Slot
    block: Slot
    style: str
    x_from: Slot | None = None
    stack: str | None = None
    flat_rows: bool = False


@dataclass(eq=False)
class ModelLayout:
    """A model's attention and FFN blocks (in prefix-site order: one sequence of layers, or
    encoder self, decoder self, decoder cross), its sizes and, for an encoder-decoder, the
    encoder (generate() runs it outside the model's forward)."""

    dims: dict
    family: str
    attention: list[AttentionBlock]
    ffn: list[FFNBlock]
    encoder: nn.Module | None = None

    @property
    def encdec(self) -> bool:
        return self.encoder is not None
