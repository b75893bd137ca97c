"""Adapter placements that need the residual (``config.PLACEMENTS``; "ffn_output" and the
attention-output adapter use :class:`~unipelt_fast.hf.wrappers.AdapterWrapper`).

h: the FFN's output, x: the FFN block's input on the residual stream, a: the task's gated
adapter (its gate reads a's input), N: the post-FFN LayerNorm (BERT-like) or nothing (pre-LN):

* "block_output": ``N(h + x + a(N(h + x)))`` (AdapterHub SeqBn, ``original_ln_before=True``)
* "ffn_parallel": ``N(h + x + a(x))`` (AdapterHub ParBn)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import _tasks


def _run_adapters(wrapper: nn.Module, a_in: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + g * scaling * a(a_in)`` with each example's task adapter: one fused call
    for the whole (mixed-task) batch."""
    root = wrapper.__dict__.get("_unipelt_root")
    task_ids = None if root is None else root.task_ids_for(a_in.shape[0])
    mask = None if root is None else root.mask_for(a_in)
    adapters = wrapper.adapters
    dt = adapters[0].down.weight.dtype
    default = 0 if root is None else root.default_task
    out = _tasks.gated_adapters(
        adapters, a_in.to(dt), task_ids, default, mask=mask, residual=residual.to(dt)
    )
    return out.to(residual.dtype)


class PostLNOutputWrapper(nn.Module):
    """Replaces a BERT-like ``*Output`` (dense -> dropout -> LayerNorm(h + x)) with a placement
    that reads the residual ``x`` (its ``input_tensor``)."""

    def __init__(self, inner: nn.Module, adapters: nn.ModuleList, placement: str) -> None:
        super().__init__()
        self.inner, self.adapters, self.placement = inner, adapters, placement

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, *args, **kwargs):
        inner = self.inner
        h = inner.dropout(inner.dense(hidden_states))
        if self.placement == "block_output":
            a_in = inner.LayerNorm(h + input_tensor)
        else:  # ffn_parallel
            a_in = input_tensor
        return inner.LayerNorm(_run_adapters(self, a_in, h + input_tensor))


class PreLNMLPWrapper(nn.Module):
    """Wraps a pre-LN block's MLP; the block adds its return value to the residual stream
    ``x``, which a pre-hook on the block's pre-FFN norm records (that norm's input is x)."""

    def __init__(self, inner: nn.Module, adapters: nn.ModuleList, placement: str) -> None:
        super().__init__()
        self.inner, self.adapters, self.placement = inner, adapters, placement

    def forward(self, *args, **kwargs):
        h = self.inner(*args, **kwargs)
        x = self.__dict__.get("_unipelt_residual")
        if x is None or x.shape != h.shape:
            raise RuntimeError(
                f"unipelt: adapter placement {self.placement!r} did not see this block's "
                "residual (its pre-FFN norm did not run before the MLP)"
            )
        self.__dict__["_unipelt_residual"] = None
        a_in = x + h if self.placement == "block_output" else x
        return _run_adapters(self, a_in, h)  # the block adds x


def _residual_pre_hook(wrapper: PreLNMLPWrapper):
    def hook(module: nn.Module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        wrapper.__dict__["_unipelt_residual"] = x
        return None

    return hook
