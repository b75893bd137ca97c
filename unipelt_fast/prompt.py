"""Soft prompt (Lester et al., 2021): trainable embeddings prepended to the input embeddings.

Gate: UniPELT has no prompt gate, so this one follows its pattern: ``g = sigmoid(Linear(e))``
computed from the example's input token embeddings ``e`` and averaged over its real tokens
(``masked_mean``; "mean" averages over all tokens), one value per example, multiplying the
prompt embeddings. A per-token gate has no meaning for tokens that are not in the input, so
gate_mode "token" uses "masked_mean" here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import _tasks
from .modules import Gate


class SoftPrompt(nn.Module):
    """``length`` prompt embeddings per task, (B, length, d) for a batch."""

    def __init__(
        self,
        n_tasks: int,
        length: int,
        hidden_size: int,
        *,
        gate: bool = True,
        gate_mode: str = "masked_mean",
        init: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.length = length
        w = torch.randn(n_tasks, length, hidden_size) * 0.02 if init is None else init
        self.embeddings = nn.Parameter(w.detach().clone().reshape(n_tasks, length, hidden_size))
        mode = "masked_mean" if gate_mode == "token" else gate_mode
        self.gates = (
            nn.ModuleList(Gate(hidden_size, mode) for _ in range(n_tasks)) if gate else None
        )

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        mask: torch.Tensor | None,
        task_ids: torch.Tensor | None,
        default_task: int = 0,
    ) -> torch.Tensor:
        B = inputs_embeds.shape[0]
        # Each example's task's prompt, gathered from the (T, n, d) stack: no loop over tasks.
        p = _tasks.rows(self.embeddings, task_ids, B, default_task)
        if self.gates is not None:
            e = inputs_embeds.to(p.dtype)
            p = p * _tasks.gates(self.gates, e, task_ids, default_task, mask=mask)
        return p
