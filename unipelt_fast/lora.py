"""Gated LoRA for HF projections: ``y = base(x) + g * (alpha / r) * B(A(x))``.

The update is a standard LoRA (Hu et al., 2021); the gate ``g = sigmoid(Linear(x))`` is
UniPELT's G_L (a :class:`~unipelt_fast.modules.Gate`). It runs on the fused ``gated_adapter``
op: residual = the base output, activation "identity", w_down = A, w_up = B, so a mixed-task
batch is one call with ``adapter_index``. For GPT-2's fused ``c_attn`` targeted by role the
update only covers the chosen output slices (query and value by default): the op runs on
those slices only; a projection targeted by name (``LoRAConfig.target_modules``) gets one
update over its whole output. A 2-D input ``(rows, d)`` (BERT's pooler) is rows of one
position each: a "mean" gate is then per row.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import _tasks, ops
from .modules import Gate


def lora_scaling(alpha: float, r: int, gate: bool, gate_replaces_scaling: bool = False) -> float:
    """The factor on ``B(A(x))``: alpha / r (peft, Hu et al.), or 1 for a gated LoRA whose
    gate replaces it (the adapters library: ``hidden * gate``)."""
    return 1.0 if (gate and gate_replaces_scaling) else alpha / r


class LoRAUnit(nn.Module):
    """One task's A, B and gate. B starts at zero, so a fresh LoRA changes nothing."""

    def __init__(self, d_in: int, d_out: int, r: int, gate: bool, gate_mode: str) -> None:
        super().__init__()
        self.A = nn.Linear(d_in, r, bias=False)
        self.B = nn.Linear(r, d_out, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)
        self.gate = Gate(d_in, gate_mode) if gate else None


class GatedLoRA(nn.Module):
    """Wraps a projection (nn.Linear, BiasOnlyLinear or HF Conv1D) with per-task gated LoRA.

    ``out_slices``: the (start, stop) output ranges the update covers (None: all of them).
    The runtime state (task ids, attention mask for "masked_mean") comes from the model's
    UniPELT root, through the ``site`` that :func:`unipelt_fast.apply_unipelt` sets (None:
    the first task, no mask).
    """

    def __init__(
        self,
        base: nn.Module,
        d_in: int,
        d_out: int,
        *,
        r: int,
        alpha: float,
        n_tasks: int = 1,
        gate: bool = True,
        gate_mode: str = "token",
        out_slices: list[tuple[int, int]] | None = None,
        gate_replaces_scaling: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.base = base
        self.d_out, self.r = d_out, r
        self.scaling = lora_scaling(alpha, r, gate, gate_replaces_scaling)
        self.out_slices, self.backend = out_slices, backend
        self.site = None  # hf.root.Site: how this wrapper reaches its model's root
        width = d_out if out_slices is None else sum(b - a for a, b in out_slices)
        self.units = nn.ModuleList(
            LoRAUnit(d_in, width, r, gate, gate_mode) for _ in range(n_tasks)
        )

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        """The output columns the update covers (only those, never a full-width update)."""
        if self.out_slices is None:
            return y
        parts = [y[..., a:b] for a, b in self.out_slices]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _place(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The full output: the updated target columns, the base output elsewhere."""
        if self.out_slices is None:
            return out
        parts, pos, used = [], 0, 0
        for a, b in self.out_slices:
            if a > pos:
                parts.append(y[..., pos:a])
            parts.append(out[..., used : used + b - a])
            used, pos = used + b - a, b
        if pos < self.d_out:
            parts.append(y[..., pos:])
        return torch.cat(parts, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        root = None if self.site is None else self.site.root
        task_ids = None if root is None else root.task_ids_for(x.shape[0])
        mask = None if root is None else root.mask_for(x, self.site.stack)
        if x.dim() == 2:  # (rows, d), e.g. BERT's pooler: rows of one position each
            return self._update(x[:, None], y[:, None], task_ids, None, root)[:, 0]
        return self._update(x, y, task_ids, mask, root)

    def _update(self, x, y, task_ids, mask, root) -> torch.Tensor:
        mixed = _tasks.per_task(len(self.units), task_ids)
        t = (0 if root is None else root.default_task) if task_ids is None else 0

        def param(get):  # this task's parameter, or all tasks' stacked for adapter_index
            return _tasks.stack([get(u) for u in self.units]) if mixed else get(self.units[t])

        u0 = self.units[0]
        dt = u0.A.weight.dtype
        _tasks.observe(self.units, x, task_ids, t, mask)
        gate = u0.gate
        out = ops.gated_adapter(
            x.to(dt),
            param(lambda u: u.A.weight),
            None,
            param(lambda u: u.B.weight),
            None,
            residual=self._targets(y).to(dt),
            w_gate=None if gate is None else param(lambda u: u.gate.proj.weight),
            b_gate=None if gate is None else param(lambda u: u.gate.proj.bias),
            gate_mode="token" if gate is None or gate.mode == "token" else "mean",
            gate_mask=mask if gate is not None and gate.mode == "masked_mean" else None,
            activation="identity",
            scaling=self.scaling,
            adapter_index=task_ids if mixed else None,
            backend=self.backend,
        )
        return self._place(out.to(y.dtype), y)
