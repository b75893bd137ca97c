"""Gated LoRA for HF projections: ``y = base(x) + g * (alpha / r) * B(A(x))``.

The update is a standard LoRA (Hu et al., 2021); the gate ``g = sigmoid(Linear(x))`` is
UniPELT's G_L (a :class:`~unipelt_fast.modules.Gate`). For GPT-2's fused ``c_attn`` the update
only covers the chosen output slices (query and value by default).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._tasks import run_per_task, select
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
    UniPELT root, attached by :func:`unipelt_fast.apply_unipelt`.
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
    ) -> None:
        super().__init__()
        self.base = base
        self.d_out, self.r = d_out, r
        self.scaling = lora_scaling(alpha, r, gate, gate_replaces_scaling)
        self.out_slices = out_slices
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

    def _place(self, delta: torch.Tensor) -> torch.Tensor:
        """Spread the update over ``out_slices``, zeros elsewhere."""
        if self.out_slices is None:
            return delta
        parts, pos, used = [], 0, 0
        for a, b in self.out_slices:
            if a > pos:
                parts.append(delta.new_zeros(*delta.shape[:-1], a - pos))
            parts.append(delta[..., used : used + b - a])
            used, pos = used + b - a, b
        if pos < self.d_out:
            parts.append(delta.new_zeros(*delta.shape[:-1], self.d_out - pos))
        return torch.cat(parts, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        root = self.__dict__.get("_unipelt_root")
        task_ids = None if root is None else root.task_ids_for(x.shape[0])
        mask = None if root is None else root.mask_for(x)

        def one(t: int, idx: torch.Tensor | None) -> torch.Tensor:
            u = self.units[t]
            xs = select(x, idx)
            d = u.B(u.A(xs.to(u.A.weight.dtype))) * self.scaling
            if u.gate is not None:
                d = d * u.gate(xs.to(u.A.weight.dtype), select(mask, idx))
            return d

        delta = run_per_task(one, task_ids, 0 if root is None else root.default_task)
        return y + self._place(delta).to(y.dtype)
