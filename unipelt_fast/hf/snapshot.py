"""Snapshot: everything apply_unipelt changes in a model, so a failure puts it back."""

from __future__ import annotations

import functools

import torch.nn as nn

from .attention import _legacy_bert_forward
from .root import SITE_ATTR, UniPELTRoot

_MISSING = object()


class Snapshot:
    """Taken before apply_unipelt (or a loader that applies) changes ``model``; ``restore()``
    undoes every change: children swapped, requires_grad flags, hooks, attributes tagged on
    HF modules, added submodules, the attention implementation of every config."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.children = [
            (parent, name, child)
            for parent in model.modules()
            for name, child in parent.named_children()
        ]
        self.grad = [(p, p.requires_grad) for p in model.parameters()]
        self.attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
        self.sub_configs: list[tuple[object, object]] = []  # (config, old attn implementation)
        self.handles: list = []
        self.tagged: list[tuple[nn.Module, str, object]] = []
        self.added: list[tuple[nn.Module, str]] = []  # (module, name) of new children

    def tag(self, module: nn.Module, **attrs) -> None:
        """Set plain attributes on an HF module (not registered as submodules)."""
        for k, val in attrs.items():
            self.tagged.append((module, k, module.__dict__.get(k, _MISSING)))
            module.__dict__[k] = val

    def restore(self) -> None:
        root = self.model._modules.get("unipelt")
        if isinstance(root, UniPELTRoot):  # also when this snapshot's caller did not apply
            root.remove_hooks()
        for h in self.handles:
            h.remove()
        for parent, name, child in self.children:
            setattr(parent, name, child)
        for m, name in self.added:
            m._modules.pop(name, None)
        for m, k, old in reversed(self.tagged):
            if old is _MISSING:
                m.__dict__.pop(k, None)
            else:
                m.__dict__[k] = old
        for m in self.model.modules():  # the tags of an apply this snapshot did not see
            m.__dict__.pop(SITE_ATTR, None)
            fwd = m.__dict__.get("forward")
            if isinstance(fwd, functools.partial) and fwd.func is _legacy_bert_forward:
                del m.__dict__["forward"]
        if "unipelt" in self.model._modules:
            del self.model._modules["unipelt"]
        for p, rg in self.grad:
            p.requires_grad_(rg)
        if self.attn is not None:
            self.model.config._attn_implementation = self.attn
        for c, old in self.sub_configs:
            c._attn_implementation = old
