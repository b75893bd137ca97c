"""Per-example task routing shared by the HF wrappers (adapters, LoRA, gates, prompts).

A mixed-task batch runs in one pass: each method keeps one module per task (so checkpoint
keys stay ``...adapters.<t>...``, ``...units.<t>...``), their parameters are stacked into
(T, ...) tensors for the call (a few small copies, differentiable), and each example picks
its task's slice on the device (``adapter_index`` of the fused ops, or a gather). Nothing
here reads the host: the task ids were validated once, at the model's entry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from . import ops
from .reference import task_linear

Tensor = torch.Tensor


# gate_report's probe: every routed call reports (owner, x, task_ids, default_task, mask),
# owner being its per-task module list. None outside gate_report (one global read per call).
_probe: Callable | None = None


@contextlib.contextmanager
def probing(fn: Callable) -> Iterator[None]:
    global _probe
    old, _probe = _probe, fn
    try:
        yield
    finally:
        _probe = old


def observe(owner, x: Tensor, task_ids: Tensor | None, default_task: int, mask) -> None:
    if _probe is not None:
        _probe(owner, x, task_ids, default_task, mask)


def stack(ts: Sequence[Tensor | None]) -> Tensor | None:
    """(T, ...) stack of one parameter over the tasks; None where the tasks have none."""
    return None if ts[0] is None else torch.stack(list(ts))


def per_task(n_tasks: int, task_ids: Tensor | None) -> bool:
    """Whether examples may use different tasks' weights (else one task serves the batch:
    no task ids, or a single task, whose ids the model's entry checked are all 0)."""
    return task_ids is not None and n_tasks > 1


def gated_adapters(
    adapters: Sequence,
    x: Tensor,
    task_ids: Tensor | None,
    default_task: int = 0,
    *,
    mask: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """Each example through its task's :class:`~unipelt_fast.modules.GatedAdapter`: one
    fused ``gated_adapter`` call (``adapter_index``) whatever the tasks in the batch.
    ``residual``: what the adapter's output is added to (None: ``x``)."""
    observe(adapters, x, task_ids, default_task, mask)
    if not per_task(len(adapters), task_ids):
        return adapters[default_task if task_ids is None else 0](x, residual=residual, mask=mask)
    a = adapters[0]
    w_gate = b_gate = None
    if a.gate is not None:
        w_gate = stack([m.gate.weight for m in adapters])
        b_gate = stack([m.gate.bias for m in adapters])
    return ops.gated_adapter(
        x,
        stack([m.down.weight for m in adapters]),
        stack([m.down.bias for m in adapters]),
        stack([m.up.weight for m in adapters]),
        stack([m.up.bias for m in adapters]),
        residual=residual,
        w_gate=w_gate,
        b_gate=b_gate,
        gate_mode="token" if a.gate_mode == "token" else "mean",
        gate_mask=mask if (a.gate_mode == "masked_mean" and a.gate is not None) else None,
        activation=a.activation,
        scaling=a.scaling,
        adapter_index=task_ids,
        backend=a.backend,
    )


def gates(
    gates: Sequence,
    h: Tensor,
    task_ids: Tensor | None,
    default_task: int = 0,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """Each example's :class:`~unipelt_fast.modules.Gate` (or PrefixGate) value: one
    batched logit computation with each example's task weights gathered."""
    observe(gates, h, task_ids, default_task, mask)
    if not per_task(len(gates), task_ids):
        return gates[default_task if task_ids is None else 0](h, mask)
    w = stack([g.proj.weight for g in gates])  # (T, n, d)
    b = stack([g.proj.bias for g in gates])
    return gates[0].pool(torch.sigmoid(task_linear(h, w, b, task_ids)), mask)


def rows(stacked: Tensor, task_ids: Tensor | None, batch: int, default_task: int = 0) -> Tensor:
    """(B, ...) per-example rows of a (T, ...) per-task tensor (a gather, no host read)."""
    if task_ids is None:
        return stacked[default_task].unsqueeze(0).expand(batch, *stacked.shape[1:])
    return stacked.index_select(0, task_ids)


# ---- the per-task loop: kept as the benchmark baseline only --------------------------------


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
    """``fn(task, idx)`` computes the rows ``idx`` with ``task``'s modules, looping over the
    tasks present (``unique`` and ``nonzero`` read the host). The routing before the fused
    per-example path; no forward uses it, ``unipelt-fast bench`` compares against it."""
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
