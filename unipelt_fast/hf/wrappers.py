"""Module wrappers that run a PELT method on a wrapped HF submodule's output."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .. import _tasks


def hidden_of(out) -> tuple[torch.Tensor, Callable[[torch.Tensor], object]]:
    """(hidden states, rebuild) of a wrapped block's output. An MoE block may return a tuple
    (hidden states, router logits/scores): gpt-oss always, Mixtral and Qwen3-MoE on
    transformers 4.x. The adapter runs on the hidden states; ``rebuild(new)`` puts them back
    with the block's other outputs unchanged."""
    if isinstance(out, tuple):
        if not out or not isinstance(out[0], torch.Tensor):
            raise TypeError(
                "unipelt: the adapter's block returned a tuple whose first element is not "
                "its hidden states"
            )
        rest = out[1:]
        return out[0], lambda new: (new, *rest)
    return out, lambda new: new


class AdapterWrapper(nn.Module):
    """Runs the wrapped FFN-output module, then each example's task's gated adapter on its
    output: one fused ``gated_adapter`` call for the whole (mixed-task) batch."""

    def __init__(self, inner: nn.Module, adapters: nn.ModuleList) -> None:
        super().__init__()
        self.inner, self.adapters = inner, adapters

    def forward(self, *args, **kwargs):
        y, rebuild = hidden_of(self.inner(*args, **kwargs))
        root = self.__dict__.get("_unipelt_root")
        task_ids = None if root is None else root.task_ids_for(y.shape[0])
        mask = None if root is None else root.mask_for(y, self.__dict__.get("_unipelt_stack"))
        dt = self.adapters[0].down.weight.dtype
        default = 0 if root is None else root.default_task
        out = _tasks.gated_adapters(self.adapters, y.to(dt), task_ids, default, mask=mask)
        return rebuild(out.to(y.dtype))
