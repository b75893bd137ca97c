"""Forward pre-hooks: model entry (task ids, 2-D mask, soft prompt), per-layer prefix gates
and the residual that adapter placements read.

Every hook is a module-level function: a per-site hook is bound to its :class:`Site` with
``functools.partial`` (never a closure), so ``copy.deepcopy`` maps it onto the copy's
modules and pickling carries it. What a hook hands on goes to the root's per-forward state.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from .. import _tasks
from .root import Site, UniPELTRoot


def prefix_gate_pre_hook(site: Site, module: nn.Module, args, kwargs):
    """Compute this site's prefix gate G_P from the attention module's input; the attention
    function takes it from ``root.gate_slots``."""
    root = site.root
    h = kwargs.get("hidden_states", args[0] if args else None)
    if h is None or root.prefix_gates is None:
        return None
    gates = root.prefix_gates[site.index]
    mask = root.mask_for(h, site.stack)
    dt = gates[0].proj.weight.dtype
    root.gate_slots[site.index] = _tasks.gates(
        gates, h.to(dt), root.task_ids_for(h.shape[0]), root.default_task, mask=mask
    )
    return None


def residual_pre_hook(site: Site, module: nn.Module, args, kwargs):
    """Record the FFN block's input x (the hooked norm's or projection's input) for the
    adapter placement that reads it (``placements.py``)."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    site.root.residual_slots[site.index] = x
    return None


_SIGS: dict[type, list[str]] = {}


def _positional_names(model: nn.Module) -> list[str]:
    cls = type(model)
    if cls not in _SIGS:
        params = inspect.signature(model.forward).parameters.values()
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        _SIGS[cls] = [p.name for p in params if p.kind in kinds]
    return _SIGS[cls]


def model_pre_hook(model: nn.Module, args, kwargs):
    """Capture task ids and the 2-D mask; prepend the soft prompt."""
    root: UniPELTRoot = model.unipelt
    root.reset_forward_state()
    if args:
        kwargs = {**dict(zip(_positional_names(model), args, strict=False)), **kwargs}
        args = ()
    task_ids = kwargs.pop("task_ids", None)
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if task_ids is not None:
        task_ids = _task_ids_tensor(task_ids, root.cfg.tasks, None if ref is None else ref.device)
        if ref is not None and task_ids.shape[0] != ref.shape[0]:
            raise ValueError(
                f"task_ids has {task_ids.shape[0]} entries for {ref.shape[0]} examples"
            )
        n = len(root.cfg.tasks)
        if bool(((task_ids < 0) | (task_ids >= n)).any()):
            raise ValueError(f"task_ids must be in [0, {n})")
    root.task_ids = task_ids
    mask = kwargs.get("attention_mask")
    if root.prompt is not None:
        kwargs, mask = _soft_prompt_entry(model, root, kwargs, task_ids, mask)
    if root.prefix is not None and root.cfg.prefix.positions == "after_prefix":
        _positions_after_prefix(model, root, kwargs)
    root.mask2d = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    dmask = kwargs.get("decoder_attention_mask")
    is_2d = isinstance(dmask, torch.Tensor) and dmask.dim() == 2
    root.dec_mask2d = dmask.bool() if is_2d else None
    ids = kwargs.get("input_ids")
    root.entry_ref = ids if ids is not None else kwargs.get("inputs_embeds")
    return args, kwargs


def _task_ids_tensor(task_ids, tasks: tuple[str, ...], device) -> torch.Tensor:
    """task_ids as a LongTensor (B,): an integer tensor, or a list of task names (or ints).

    Floats and bools are refused rather than truncated; an unknown name lists the tasks."""
    if isinstance(task_ids, torch.Tensor):
        if task_ids.is_floating_point() or task_ids.is_complex() or task_ids.dtype == torch.bool:
            raise TypeError(
                f"task_ids must be an integer tensor (LongTensor) or a list of task names "
                f"{tasks}, got a {task_ids.dtype} tensor"
            )
        # contiguous: a strided view (a rank's rows ids[r::world]) reached the triton kernels,
        # which read adapter_index as dense (issue 27)
        return task_ids.to(device=device, dtype=torch.long).reshape(-1).contiguous()
    if isinstance(task_ids, str) or not isinstance(task_ids, list | tuple):
        raise TypeError(
            f"task_ids must be an integer tensor (LongTensor) or a list of task names {tasks}, "
            f"got {type(task_ids).__name__}"
        )
    ids = []
    for t in task_ids:
        if isinstance(t, str):
            if t not in tasks:
                raise ValueError(f"task_ids: unknown task {t!r}; the tasks are {tasks}")
            ids.append(tasks.index(t))
        elif isinstance(t, int) and not isinstance(t, bool):
            ids.append(t)
        else:
            raise TypeError(
                f"task_ids entries must be task names {tasks} or ints, got {type(t).__name__} {t!r}"
            )
    return torch.tensor(ids, dtype=torch.long, device=device)


def encoder_pre_hook(root: UniPELTRoot, encoder: nn.Module, args, kwargs):
    """Encoder-decoder models: generate() runs the encoder directly, not through the
    model's forward (whose pre-hook set the state). Then take the encoder's own mask and the
    active task (generate takes no task_ids), instead of a previous forward's, and prepend
    the soft prompt to the encoder input as the model's forward does (peft's
    PeftModelForSeq2SeqLM.generate prepends it to the encoder's inputs_embeds)."""
    if args:
        kwargs = {**dict(zip(_positional_names(encoder), args, strict=False)), **kwargs}
        args = ()
    ids = kwargs.get("input_ids")
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    if ref is not None and ref is root.entry_ref:
        return None  # called by the model's forward
    root.reset_forward_state()
    mask = kwargs.get("attention_mask")
    if root.prompt is not None and ref is not None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = encoder.embed_tokens(kwargs.pop("input_ids"))
        embeds, mask = _with_prompt(root, embeds, mask, None)
        kwargs["inputs_embeds"], kwargs["attention_mask"] = embeds, mask
        kwargs.pop("input_ids", None)
    root.mask2d = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    return args, kwargs


def _cache_len(kwargs: dict) -> int:
    """The length of the KV cache a call was given (transformers 5.25 names it ``cache``,
    earlier versions ``past_key_values``)."""
    past = kwargs.get("past_key_values")
    if past is None:
        past = kwargs.get("cache")
    return past.get_seq_length() if hasattr(past, "get_seq_length") else 0


def _soft_prompt_entry(model, root, kwargs, task_ids, mask):
    """The model's entry with a soft prompt, as peft runs prompt tuning (peft_model.py,
    PeftModelForCausalLM.prepare_inputs_for_generation and _adjust_prompt_learning_kwargs):

    * the prompt is prepended to the input embeddings of a call without cached tokens
      (a forward, or generate()'s prefill), with ones for it in the attention mask;
    * a decoder call on a cache that already holds the prompt (generate()'s later steps)
      adds no prompt; its attention mask, which covers the caller's tokens only, gets the
      prompt's ones in front;
    * position_ids are ignored (generate() passes them) and cache_position is dropped, so
      the model numbers the prompt and the tokens 0, 1, ... from the cache's length, padding
      included, as peft does;
    * an encoder-decoder given ``encoder_outputs`` (generate()'s decoder steps; the encoder
      pre-hook prepended the prompt there) gets the prompt's ones in its encoder mask."""
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        raise NotImplementedError(
            "unipelt: the soft prompt takes a 2-D attention_mask (generate() with a static "
            "cache passes a 4-D one; use the default dynamic cache)"
        )
    P = root.prompt.length
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if getattr(model.config, "is_encoder_decoder", False):
        if ids is not None or embeds is not None:
            return _prepend_prompt(model, root, kwargs, task_ids, mask)
        enc = kwargs.get("encoder_outputs")
        if enc is not None and mask is not None:
            enc_len = (enc[0] if isinstance(enc, tuple | list) else enc.last_hidden_state).shape[1]
            if mask.shape[1] + P == enc_len:
                mask = torch.cat([mask.new_ones(mask.shape[0], P), mask], dim=1)
                kwargs["attention_mask"] = mask
            elif mask.shape[1] != enc_len:
                raise ValueError(
                    f"unipelt: attention_mask has {mask.shape[1]} columns for "
                    f"{enc_len} encoder outputs ({P} of them the soft prompt)"
                )
        return kwargs, mask
    kwargs.pop("position_ids", None)
    kwargs.pop("cache_position", None)
    if ids is None and embeds is None:
        return kwargs, mask
    if _cache_len(kwargs) == 0:
        return _prepend_prompt(model, root, kwargs, task_ids, mask)
    if mask is not None:  # a later step: the prompt is in the cache
        mask = torch.cat([mask.new_ones(mask.shape[0], P), mask], dim=1)
        kwargs["attention_mask"] = mask
    return kwargs, mask


def _with_prompt(root, embeds, mask, task_ids):
    """[prompt ; embeds] and the mask with ones for the prompt."""
    B, L = embeds.shape[:2]
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.long, device=embeds.device)
    P = root.prompt.length
    prompt = root.prompt(embeds, mask.bool(), task_ids, root.default_task)
    embeds = torch.cat([prompt.to(embeds.dtype), embeds], dim=1)
    return embeds, torch.cat([mask.new_ones(B, P), mask], dim=1)


def _prepend_prompt(model, root, kwargs, task_ids, mask):
    ids = kwargs.pop("input_ids", None)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)
    B, L = embeds.shape[:2]
    P = root.prompt.length
    kwargs["inputs_embeds"], mask = _with_prompt(root, embeds, mask, task_ids)
    kwargs["attention_mask"] = mask
    tt = kwargs.get("token_type_ids")
    if tt is not None:
        kwargs["token_type_ids"] = torch.cat([tt.new_zeros(B, P), tt], dim=1)
    labels = kwargs.get("labels")
    decoder_side = getattr(model.config, "is_encoder_decoder", False)  # labels: the decoder's
    if (
        not decoder_side
        and isinstance(labels, torch.Tensor)
        and labels.dim() == 2
        and labels.shape[1] == L
    ):
        kwargs["labels"] = torch.cat([labels.new_full((B, P), -100), labels], dim=1)
    return kwargs, mask


def _positions_after_prefix(model: nn.Module, root: UniPELTRoot, kwargs: dict) -> None:
    """PrefixConfig.positions="after_prefix" (peft): the tokens' positions as if the P prefix
    positions were P earlier tokens. Given position_ids (generate() passes them) move by P;
    otherwise the model's own default is rebuilt with a past P longer."""
    P = root.prefix.prefix_len
    pos = kwargs.get("position_ids")
    if pos is not None:
        kwargs["position_ids"] = pos + P
        return
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if ref is None:
        return
    B, L = ref.shape[:2]
    past_len = _cache_len(kwargs)
    if root.dims["model_type"] in ("roberta", "xlm-roberta", "camembert"):
        if ids is None:
            raise NotImplementedError(
                "unipelt: positions='after_prefix' on RoBERTa needs input_ids (its positions "
                "come from the padding)"
            )
        pad = model.get_input_embeddings().padding_idx
        real = ids.ne(pad).long()
        kwargs["position_ids"] = (torch.cumsum(real, 1) + past_len + P) * real + pad
        return
    if root.dims["model_type"] == "opt":  # OPT numbers tokens from its 2-D padding mask
        am = kwargs.get("attention_mask")
        if am is None or am.dim() != 2:
            am = torch.ones(B, past_len + L, dtype=torch.long, device=ref.device)
        full = torch.cat([am.new_ones(B, P), am], 1).long()  # the prefix as P real tokens
        kwargs["position_ids"] = (torch.cumsum(full, 1) * full - 1)[:, -L:]
        return
    start = past_len + P
    kwargs["position_ids"] = torch.arange(start, start + L, device=ref.device).expand(B, L)
