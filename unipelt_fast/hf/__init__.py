"""UniPELT for Hugging Face models: :func:`apply_unipelt`, :func:`eject`, :func:`trainable_report`.

How it hooks in (transformers >= 4.57):

* **Prefix** -- an attention function registered as "unipelt" in transformers'
  ``AttentionInterface`` (and a matching mask function in ``AttentionMaskInterface`` that
  builds the boolean sdpa-style mask). The model's ``config._attn_implementation`` is set to
  it; each self-attention module is tagged with its layer index. The function turns the HF
  mask into ``key_padding_mask`` + bottom-right ``causal`` (checking that the mask is exactly
  that, else it raises: sliding windows that bite, packed sequences and custom 4-D masks are
  not supported) and calls :func:`unipelt_fast.prefix_attention`. The prefix keys are not
  rotated (they never pass through RoPE) and never enter the KV cache: each layer's prefix
  is computed inside the attention call, so gradient checkpointing (reentrant or not)
  recomputes it with its layer.
* **Gates** -- the prefix gate is computed from the attention module's input in a forward
  pre-hook; adapter/LoRA/prompt gates from their own inputs. "masked_mean" uses the 2-D
  attention mask captured by a pre-hook on the model's forward (the last L columns, so it also
  works with a KV cache). The prefix gate is per example, so gate_mode "token" falls back to
  "masked_mean" for it (and for the prompt gate).
* **Adapter** -- at ``AdapterConfig.placement`` (config.PLACEMENTS): "ffn_output" and the
  attention-output adapter wrap the output projection (BERT/RoBERTa ``output.dense``, GPT-2 /
  LLaMA ``mlp``); "block_output" / "ffn_parallel" replace BERT's ``*Output`` or wrap a pre-LN
  ``mlp`` whose residual a pre-hook on the pre-FFN norm records (``placements.py``).
* **LoRA** -- wraps the query/value projections (GPT-2: slices of ``c_attn``).
* **BitFit** -- :func:`unipelt_fast.bitfit` (bias-only ops); task heads are trained in full.
* **Tasks** -- ``model(..., task_ids=LongTensor[B])``: the prefix goes through
  ``prefix_index`` (one fused call); per-task adapters/LoRA/gates loop over the tasks present
  in a mixed batch, each on its own rows (eager; one call when the batch has one task).

Runtime state (task ids, the 2-D mask) is kept on the model between a forward and its
backward: a gradient-checkpointed backward recomputes with the state of the *latest* forward,
so run forward/backward pairs in order (as every training loop does).

Attention-probability dropout on the prefix path is the attention module's own (training
mode only, as HF's eager/SDPA attention), passed to ``prefix_attention(dropout_p=)``. Not
supported on the prefix path: ``output_attentions``.

Layout: ``apply.py`` (apply_unipelt), ``families.py`` (per-family wiring tables), ``masks.py``
(HF mask conversion), ``attention.py`` (the registered attention function), ``hooks.py``
(model-entry and per-layer pre-hooks), ``root.py`` (per-model state), ``wrappers.py``,
``report.py`` (tasks, eject, trainable_report).
"""

from .apply import _Snapshot, apply_unipelt
from .attention import ATTN_NAME, unipelt_attention
from .families import _dims
from .masks import _convert_mask
from .report import eject, set_active_task, trainable_report
from .root import UniPELTRoot, _root
from .wrappers import AdapterWrapper

__all__ = [
    "ATTN_NAME",
    "AdapterWrapper",
    "UniPELTRoot",
    "_Snapshot",
    "_convert_mask",
    "_dims",
    "_root",
    "apply_unipelt",
    "eject",
    "set_active_task",
    "trainable_report",
    "unipelt_attention",
]
