"""Module wrappers that run a PELT method on a wrapped HF submodule's output."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .. import _tasks
from .root import Site


def run_adapters(
    wrapper: nn.Module, a_in: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``residual + g * scaling * a(a_in)`` (``residual`` None: ``a_in``) with each example's
    task adapter of ``wrapper.adapters``: one fused call for the whole (mixed-task) batch.
    The task ids and mask come from the root of ``wrapper.site`` (none: the first task)."""
    site = wrapper.site
    root = None if site is None else site.root
    task_ids = None if root is None else root.task_ids_for(a_in.shape[0])
    mask = None if root is None else root.mask_for(a_in, site.stack)
    adapters = wrapper.adapters
    dt = adapters[0].down.weight.dtype
    default = 0 if root is None else root.default_task
    res = None if residual is None else residual.to(dt)
    out = _tasks.gated_adapters(adapters, a_in.to(dt), task_ids, default, mask=mask, residual=res)
    return out.to(a_in.dtype if residual is None else residual.dtype)


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

    def __init__(self, inner: nn.Module, adapters: nn.ModuleList, site: Site | None = None) -> None:
        super().__init__()
        self.inner, self.adapters, self.site = inner, adapters, site

    def forward(self, *args, **kwargs):
        y, rebuild = hidden_of(self.inner(*args, **kwargs))
        return rebuild(run_adapters(self, y))
