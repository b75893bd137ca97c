"""LoRA targets by module name (``LoRAConfig.target_modules``), with peft's semantics.

The rules are those of peft 0.21's ``check_target_module_exists`` and
``_maybe_include_all_linear_layers`` (peft/tuners/tuners_utils.py):

* a list: a module matches when its full name is in the list or ends in ``"." + name``;
  with ``layers`` (peft's ``layers_to_transform``) a suffix match also needs its layer index
  in ``layers``: the first numbered part after ``<something>.`` (``.*?\\.[^.]*\\.(\\d+)\\.``)
  or, with ``layers_pattern``, the number after one of those names. An exact full-name
  match skips the layer check (as in peft).
* a string: a regex the full name must match entirely (``re.fullmatch``); ``layers`` is not
  used (peft ignores ``layers_to_transform`` there; the config refuses it).
* ``"all-linear"`` (any case): every ``nn.Linear`` and HF ``Conv1D`` except the output
  embeddings (``model.get_output_embeddings()``, e.g. lm_head).
* never a module inside a trained head (peft: ``modules_to_save``; here the config's
  ``modules_to_save`` or the usual heads): a name with a ``head`` part is excluded.

Resolution is by name over ``model.named_modules()`` of the plain model (before BitFit swaps
any module), so it is generic: any family, any fused projection (one LoRA over its whole
output, as in peft). Only ``nn.Linear`` and ``Conv1D`` can hold LoRA here; a name matching
another kind of module is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch.nn as nn

from ..config import ALL_LINEAR, LoRAConfig


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """peft's linear classes: ``nn.Linear`` (and its subclasses) and HF's ``Conv1D``."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def layer_index(key: str, layers_pattern: Iterable[str] | None = None) -> int | None:
    """peft's layer index of a module name: the first numbered part (lazy, so an expert
    index after it is not taken), or the number after one of ``layers_pattern``."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = None
        for pattern in layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    return None if m is None else int(m.group("idx"))


def name_matches(
    target_modules: tuple[str, ...] | list[str] | str,
    key: str,
    layers: Iterable[int] | None = None,
    layers_pattern: Iterable[str] | None = None,
) -> bool:
    """Whether the module named ``key`` is a target (peft's check_target_module_exists,
    without its exclusions; "all-linear" is resolved by :func:`resolve` instead)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:
        return True
    if not any(key.endswith(f".{t}") for t in target_modules):
        return False
    if layers is None:
        return True
    i = layer_index(key, layers_pattern)
    return i is not None and i in set(layers)


def in_heads(key: str, heads: Iterable[str]) -> bool:
    """peft's modules_to_save exclusion: a name part equals a head's name."""
    return any(re.match(rf"(^|.*\.){h}($|\..*)", key) for h in heads)


def resolve(model: nn.Module, lc: LoRAConfig, heads: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """(full name, module) of every LoRA target of ``lc.target_modules`` in ``model``, in
    ``named_modules`` order. Raises ValueError when nothing matches and NotImplementedError
    naming a matched module that is not a linear layer."""
    tm, heads = lc.target_modules, tuple(heads)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    all_linear = isinstance(tm, str) and tm.lower() == ALL_LINEAR
    found = []
    for key, mod in model.named_modules():
        if not key or in_heads(key, heads):
            continue
        if all_linear:
            if is_linear(mod) and mod is not out_emb:
                found.append((key, mod))
            continue
        if not name_matches(tm, key, lc.layers, lc.layers_pattern):
            continue
        if not is_linear(mod):
            raise NotImplementedError(
                f"apply_unipelt: LoRAConfig.target_modules={tm!r} matches {key!r}, a "
                f"{type(mod).__name__}; LoRA here goes on nn.Linear and HF Conv1D layers only"
            )
        found.append((key, mod))
    if not found:
        raise ValueError(
            f"apply_unipelt: LoRAConfig.target_modules={tm!r} (layers={lc.layers}) matches no "
            f"linear layer of this {type(model).__name__} (trained heads {list(heads)} excluded)"
        )
    return found
