"""Module wrappers that run a PELT method on a wrapped HF submodule's output."""

from __future__ import annotations

import torch.nn as nn

from .. import _tasks


class AdapterWrapper(nn.Module):
    """Runs the wrapped FFN-output module, then each example's task's gated adapter on its
    output: one fused ``gated_adapter`` call for the whole (mixed-task) batch."""

    def __init__(self, inner: nn.Module, adapters: nn.ModuleList) -> None:
        super().__init__()
        self.inner, self.adapters = inner, adapters

    def forward(self, *args, **kwargs):
        y = self.inner(*args, **kwargs)
        root = self.__dict__.get("_unipelt_root")
        task_ids = None if root is None else root.task_ids_for(y.shape[0])
        mask = None if root is None else root.mask_for(y, self.__dict__.get("_unipelt_stack"))
        dt = self.adapters[0].down.weight.dtype
        default = 0 if root is None else root.default_task
        return _tasks.gated_adapters(self.adapters, y.to(dt), task_ids, default, mask=mask).to(
            y.dtype
        )
