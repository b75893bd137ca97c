"""Adapter placements that need the residual (``config.PLACEMENTS``; "ffn_output" and the
attention-output adapter use :class:`~unipelt_fast.hf.wrappers.AdapterWrapper`).

h: the FFN's output, x: the FFN block's input on the residual stream, a: the task's gated
adapter (its gate reads a's input), N: the post-FFN LayerNorm (BERT-like) or nothing (pre-LN):

* "block_output": ``N(h + x + a(N(h + x)))`` (AdapterHub SeqBn, ``original_ln_before=True``)
* "ffn_parallel": ``N(h + x + a(x))`` (AdapterHub ParBn)

Encoder-decoder layers run their FFN inline, so the adapter attaches where ``s = x + h``
(after the FFN's dropout) is visible: the post-FFN LayerNorm of post-LN BART/Marian
(:class:`PostLNNormWrapper`), or a forward hook on the module that returns ``s`` (T5's
``T5LayerFF``, a pre-LN mBART/Pegasus layer: :class:`SublayerOutputAdapters`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .root import Site
from .wrappers import AdapterWrapper, hidden_of, run_adapters


def _recorded_residual(wrapper: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The FFN block's input x that ``hooks.residual_pre_hook`` recorded for this wrapper's
    site in this forward (taken, so a stale one is never read). OPT's FFN sees its tokens
    as (B*L, d) rows: x recorded there takes the shape of ``like``."""
    site = wrapper.site
    x = None if site is None else site.root.residual_slots.pop(site.index, None)
    if x is None or x.numel() != like.numel() or x.shape[-1] != like.shape[-1]:
        raise RuntimeError(
            f"unipelt: adapter placement {wrapper.placement!r} did not see this block's "
            "residual (the hook before its FFN did not run in this forward)"
        )
    return x.view(like.shape)


class TokenRows(nn.Module):
    """Runs ``inner`` (an adapter wrapper) on (B, L, d) tokens where the model passes them as
    (B*L, d) rows (OPT's FFN), so that the gates average over each example's tokens and the
    task routing sees B examples. B is the batch of the model's input (recorded by the model
    pre-hook, so a gradient-checkpointed recompute of the layer sees it too)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, rows: torch.Tensor, *args, **kwargs):
        if rows.dim() != 2:  # already (B, L, d)
            return self.inner(rows, *args, **kwargs)
        site = self.inner.site
        ref = None if site is None else site.root.entry_ref
        B = None if ref is None else ref.shape[0]
        if not B or rows.shape[0] % B:
            raise RuntimeError(
                "unipelt: the adapter on a flattened FFN does not know the batch of its "
                f"{rows.shape[0]} rows (call the model itself, whose pre-hook records it)"
            )
        out = self.inner(rows.view(B, rows.shape[0] // B, rows.shape[-1]), *args, **kwargs)
        return out.reshape(rows.shape[0], out.shape[-1])


class PostLNOutputWrapper(nn.Module):
    """Replaces a BERT-like ``*Output`` (dense -> dropout -> LayerNorm(h + x)) with a placement
    that reads the residual ``x`` (its ``input_tensor``)."""

    def __init__(
        self, inner: nn.Module, adapters: nn.ModuleList, placement: str, site: Site | None = None
    ) -> None:
        super().__init__()
        self.inner, self.adapters, self.placement, self.site = inner, adapters, placement, site

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, *args, **kwargs):
        inner = self.inner
        h = inner.dropout(inner.dense(hidden_states))
        if self.placement == "block_output":
            a_in = inner.LayerNorm(h + input_tensor)
        else:  # ffn_parallel
            a_in = input_tensor
        return inner.LayerNorm(run_adapters(self, a_in, h + input_tensor))


class PreLNMLPWrapper(nn.Module):
    """Wraps a pre-LN block's MLP; the block adds its return value to the residual stream
    ``x``, which a pre-hook on the block's pre-FFN norm records (that norm's input is x)."""

    def __init__(
        self, inner: nn.Module, adapters: nn.ModuleList, placement: str, site: Site | None = None
    ) -> None:
        super().__init__()
        self.inner, self.adapters, self.placement, self.site = inner, adapters, placement, site

    def forward(self, *args, **kwargs):
        h, rebuild = hidden_of(self.inner(*args, **kwargs))  # MoE: (h, router output)
        x = _recorded_residual(self, h)
        a_in = x + h if self.placement == "block_output" else x
        return rebuild(run_adapters(self, a_in, h))  # the block adds x


class PostLNNormWrapper(nn.Module):
    """Replaces the post-FFN LayerNorm N of a post-LN layer with an inline FFN (BART,
    Marian), whose input is ``s = x + h``: "block_output" ``N(s + a(N(s)))``,
    "ffn_parallel" ``N(s + a(x))`` (x recorded by a pre-hook on the first FFN projection)."""

    def __init__(
        self, inner: nn.Module, adapters: nn.ModuleList, placement: str, site: Site | None = None
    ) -> None:
        super().__init__()
        self.inner, self.adapters, self.placement, self.site = inner, adapters, placement, site

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if self.placement == "block_output":
            a_in = self.inner(s)
        else:
            a_in = _recorded_residual(self, s)
        return self.inner(run_adapters(self, a_in, s))


class SublayerOutputAdapters(nn.Module):
    """The adapters of a module whose output is ``s = x + h`` (T5LayerFF, a pre-LN
    mBART/Pegasus layer), run by a forward hook so the module itself stays as it is:
    "block_output" ``s + a(s)``, "ffn_parallel" ``s + a(x)`` (x: the FFN's input, the
    hooked module's input for T5, recorded from the pre-FFN norm otherwise)."""

    def __init__(
        self, adapters: nn.ModuleList, placement: str, x_is_input: bool, site: Site | None = None
    ) -> None:
        super().__init__()
        self.adapters, self.placement, self.x_is_input = adapters, placement, x_is_input
        self.site = site

    def hook(self, module: nn.Module, args, kwargs, output):
        s = output[0] if isinstance(output, tuple) else output
        if self.placement == "block_output":
            a_in = s
        elif self.x_is_input:
            a_in = kwargs.get("hidden_states", args[0] if args else None)
        else:
            a_in = _recorded_residual(self, s)
            if torch.is_grad_enabled() and s.requires_grad and not a_in.requires_grad:
                # x was recorded inside the module's forward under no_grad: reentrant
                # gradient checkpointing, which runs this hook outside the checkpoint
                raise NotImplementedError(
                    "unipelt: adapter placement 'ffn_parallel' on "
                    f"{type(module).__name__} reads x from inside the layer, which reentrant "
                    "gradient checkpointing runs without gradients (its gradient would be "
                    "lost); use gradient_checkpointing_kwargs={'use_reentrant': False}, or "
                    "another placement"
                )
        new = run_adapters(self, a_in, s)
        return (new, *output[1:]) if isinstance(output, tuple) else new


# Every module that holds a layer's per-task adapters (as ``.adapters``), whatever the placement.
ADAPTER_HOSTS = (
    AdapterWrapper,
    PostLNOutputWrapper,
    PreLNMLPWrapper,
    PostLNNormWrapper,
    SublayerOutputAdapters,
)
