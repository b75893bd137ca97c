"""Per-example task routing shared by the HF wrappers (adapters, LoRA, gates, prompts)."""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def select(t: Tensor | None, idx: Tensor | None) -> Tensor | None:
    """Rows ``idx`` of ``t`` (all of it when idx is None)."""
    if t is None or idx is None:
        return t
    return t.index_select(0, idx)


def run_per_task(
    fn: Callable[[int, Tensor | None], Tensor],
    task_ids: Tensor | None,
    default_task: int = 0,
) -> Tensor:
    """``fn(task, idx)`` computes the rows ``idx`` (None: the whole batch) with ``task``'s
    modules; the results are put back in batch order.

    A batch of one task (the common case) is a single call. A mixed batch loops over the
    tasks present, eagerly, each on its own rows (``unique`` syncs with the device): the
    per-task adapter/LoRA/gate weights differ, so there is no single fused call for them.
    """
    if task_ids is None:
        return fn(default_task, None)
    uniq = torch.unique(task_ids).tolist()
    if len(uniq) == 1:
        return fn(int(uniq[0]), None)
    idxs, pieces = [], []
    for t in uniq:
        idx = (task_ids == t).nonzero().squeeze(1)
        idxs.append(idx)
        pieces.append(fn(int(t), idx))
    order = torch.argsort(torch.cat(idxs))
    return torch.cat(pieces, dim=0).index_select(0, order)
