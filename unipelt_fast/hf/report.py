"""Task selection, eject and the trainable-parameter report."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import distributed
from ..bitfit import is_quantized
from ..lora import GatedLoRA
from .families import DEFAULT_HEADS
from .placements import ADAPTER_HOSTS
from .root import root_of


def set_active_task(model: nn.Module, task: str | int) -> None:
    """The task used by forwards that pass no ``task_ids`` (e.g. inside ``generate()``)."""
    root = root_of(model)
    tasks = root.cfg.tasks
    if isinstance(task, str):
        if task not in tasks:
            raise ValueError(f"set_active_task: unknown task {task!r}; the tasks are {tasks}")
        idx = tasks.index(task)
    elif isinstance(task, int) and not isinstance(task, bool):
        idx = task
        if not 0 <= idx < len(tasks):
            raise ValueError(
                f"set_active_task: task index {task} is out of range; the tasks are {tasks}"
            )
    else:
        raise TypeError(
            f"set_active_task: task must be a task name {tasks} or an int, got {task!r}"
        )
    root.default_task = idx


def eject(model: nn.Module) -> nn.Module:
    """Replace the prefix MLP by its fixed per-layer K/V (for inference). Outputs are
    unchanged. Returns the model. On a model sharded with FSDP2, call it on every rank."""
    root = root_of(model)
    if root.prefix is not None and not root.prefix.is_ejected:
        with distributed.unsharded(getattr(model, "module", model), root.prefix):
            root.prefix.eject()
    return model


def _method_of_params(model: nn.Module) -> dict[int, str]:
    owner: dict[int, str] = {}
    root = root_of(model)
    inner = getattr(model, "module", model)
    for m in inner.modules():
        what = None
        if isinstance(m, ADAPTER_HOSTS):
            what, ps = "adapter", m.adapters.parameters()
        elif isinstance(m, GatedLoRA):
            what, ps = "lora", m.units.parameters()
        if what is not None:
            for p in ps:
                owner[id(p)] = what
    for name, sub in (("prefix", root.prefix), ("prefix", root.prefix_gates)):
        if sub is not None:
            for p in sub.parameters():
                owner[id(p)] = name
    if root.prompt is not None:
        for p in root.prompt.parameters():
            owner[id(p)] = "prompt"
    return owner


def _numel(p: torch.Tensor) -> int:
    """The parameter's logical element count (bitsandbytes 4-bit packs two per byte)."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else p.numel()


def _nbytes(t: torch.Tensor) -> int:
    """Bytes the tensor holds, quantization scales included; a sharded (DTensor) tensor
    counts in full (the whole model's memory, over all ranks)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor) or not hasattr(t, "__tensor_flatten__"):
        n = t.numel() * t.element_size()
        absmax = getattr(getattr(t, "quant_state", None), "absmax", None)
        for scales in (absmax, getattr(t, "SCB", None)):  # bitsandbytes 4-bit / 8-bit scales
            if isinstance(scales, torch.Tensor):
                n += scales.numel() * scales.element_size()
        return n
    names, _ = t.__tensor_flatten__()  # a tensor subclass (torchao): its inner tensors
    return sum(_nbytes(getattr(t, name)) for name in names)


def trainable_report(model: nn.Module) -> str:
    """Trainable / total parameters and %, per method, plus what an inference copy adds."""
    root = root_of(model)
    owner = _method_of_params(model)
    inner = getattr(model, "module", model)
    heads = root.cfg.modules_to_save
    heads = DEFAULT_HEADS if heads is None else heads
    seen: set[int] = set()
    total = frozen_bytes = n_quantized = 0
    per: dict[str, int] = {}
    for name, p in inner.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += _numel(p)
        if not p.requires_grad:
            frozen_bytes += _nbytes(p)
            n_quantized += is_quantized(p)
            continue
        what = owner.get(id(p))
        if what is None:
            in_head = any(part in heads for part in name.split("."))
            what = "bitfit" if name.endswith("bias") and not in_head else "head"
        per[what] = per.get(what, 0) + _numel(p)
    trainable = sum(per.values())
    base = total - sum(n for w, n in per.items() if w in ("adapter", "lora", "prefix", "prompt"))
    lines = [
        f"UniPELT ({root.dims['model_type']}, tasks={list(root.cfg.tasks)}, "
        f"gate_mode={root.cfg.gate_mode!r}, backend={root.backend!r})",
        f"trainable: {trainable:,} of {total:,} parameters "
        f"({100 * trainable / max(total, 1):.3f}%)",
    ]
    for what in ("bitfit", "adapter", "prefix", "lora", "prompt", "head"):
        if what in per:
            lines.append(f"  {what:<8} {per[what]:>12,}  ({100 * per[what] / max(total, 1):.3f}%)")
    quantized = f", {n_quantized} of them quantized" if n_quantized else ""
    lines.append(f"frozen weights: {frozen_bytes / 2**20:,.2f} MiB in memory{quantized}")
    if root.prefix is not None and root.prefix.reparam:
        d = root.dims
        kv = len(root.cfg.tasks) * root.prefix.prefix_len * root.prefix.n_layers * 2
        kv *= d["n_kv_heads"] * d["head_dim"]
        mlp = sum(p.numel() for p in root.prefix.parameters())
        added = trainable - mlp + kv - per.get("head", 0)
        lines.append(
            f"after eject(): the prefix MLP ({mlp:,}) becomes {kv:,} fixed K/V values; "
            f"tuned parameters excluding heads: {added:,} ({100 * added / max(base, 1):.3f}% "
            "of the base model)"
        )
    return "\n".join(lines)
