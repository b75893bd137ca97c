"""Module wrappers that run a PELT method on a wrapped HF submodule's output."""

from __future__ import annotations

import torch
import torch.nn as nn

from .._tasks import run_per_task, select


class AdapterWrapper(nn.Module):
    """Runs the wrapped FFN-output module, then the task's gated adapter on its output."""

    def __init__(self, inner: nn.Module, adapters: nn.ModuleList) -> None:
        super().__init__()
        self.inner, self.adapters = inner, adapters

    def forward(self, *args, **kwargs):
        y = self.inner(*args, **kwargs)
        root = self.__dict__.get("_unipelt_root")
        task_ids = None if root is None else root.task_ids_for(y.shape[0])
        mask = None if root is None else root.mask_for(y, self.__dict__.get("_unipelt_stack"))
        dt = self.adapters[0].down.weight.dtype

        def one(t: int, idx: torch.Tensor | None) -> torch.Tensor:
            ys = select(y, idx)
            return self.adapters[t](ys.to(dt), mask=select(mask, idx)).to(y.dtype)

        return run_per_task(one, task_ids, 0 if root is None else root.default_task)
