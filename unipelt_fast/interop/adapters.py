"""adapters (AdapterHub) checkpoints: filled in below."""

from __future__ import annotations

import torch.nn as nn


def from_adapters(model: nn.Module, path: str, *, backend: str = "auto") -> nn.Module:
    raise NotImplementedError
