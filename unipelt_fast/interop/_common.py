"""Shared by the converters: safe file reading and an all-or-nothing apply-and-copy."""

from __future__ import annotations

import json
import os
import warnings

import torch
import torch.nn as nn

from ..checkpoint import UniPELTCheckpointError
from ..config import UniPELTConfig
from ..hf import Snapshot, UniPELTRoot, apply_unipelt


class InteropError(UniPELTCheckpointError):
    """A peft / adapters checkpoint that this package cannot hold exactly, does not fit the
    model, or is corrupt. (A ValueError, like every checkpoint error here.)"""


def read_json(path: str, who: str) -> dict:
    if not os.path.isfile(path):
        raise InteropError(f"{who}: missing {path}")
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise InteropError(f"{who}: {path} is not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise InteropError(f"{who}: {path} does not hold a JSON object")
    return d


def read_weights(directory: str, stems: tuple[str, ...], who: str) -> dict[str, torch.Tensor]:
    """The first of ``stem.safetensors`` / ``stem.bin`` that exists. ``.bin`` files are read
    with ``weights_only=True``: tensors only, never arbitrary pickled objects."""
    for stem in stems:
        st, bn = (
            os.path.join(directory, stem + ".safetensors"),
            os.path.join(directory, stem + ".bin"),
        )
        if os.path.isfile(st):
            from safetensors.torch import load_file

            try:
                return load_file(st)
            except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
                raise InteropError(f"{who}: cannot read {st} ({e})") from e
        if os.path.isfile(bn):
            try:
                out = torch.load(bn, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - corrupt, or holds more than tensors
                raise InteropError(f"{who}: cannot read {bn} safely ({e})") from e
            if not isinstance(out, dict) or not all(
                isinstance(k, str) and torch.is_tensor(v) for k, v in out.items()
            ):
                raise InteropError(f"{who}: {bn} is not a dict of tensors")
            return out
    names = ", ".join(f"{s}.safetensors/.bin" for s in stems)
    raise InteropError(f"{who}: no weights file ({names}) in {directory}")


def need(cond: bool, who: str, msg: str) -> None:
    if not cond:
        raise InteropError(f"{who}: {msg}")


def apply_and_copy(
    model: nn.Module,
    cfg: UniPELTConfig,
    backend: str,
    assign,
    who: str,
) -> nn.Module:
    """apply_unipelt(model, cfg), then ``assign(model) -> [(tensor, value)]`` lists where each
    value goes; every pair is checked (shape, floating point) before anything is copied. Any
    failure puts the model back as it was."""
    inner = getattr(model, "module", model)
    if isinstance(getattr(inner, "unipelt", None), UniPELTRoot):
        raise InteropError(f"{who}: the model already has UniPELT methods; pass its base model")
    snap = Snapshot(inner)
    try:
        apply_unipelt(inner, cfg, backend=backend)
        pairs = assign(inner)
        for dst, src in pairs:
            need(
                tuple(dst.shape) == tuple(src.shape),
                who,
                f"a tensor of shape {tuple(src.shape)} does not fit {tuple(dst.shape)}",
            )
            need(src.is_floating_point(), who, "a weight is not floating point")
        with torch.no_grad():
            for dst, src in pairs:
                dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
    except BaseException:
        snap.restore()  # also removes the hooks of the root apply_unipelt added
        raise
    return model


def head_pairs(
    model: nn.Module, heads: dict[str, torch.Tensor], who: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Head tensors (by HF parameter name) that map onto the model's own head parameters;
    the others are skipped with a warning naming them."""
    params = dict(model.named_parameters())
    pairs, skipped = [], []
    for name, t in sorted(heads.items()):
        p = params.get(name)
        if p is None or tuple(p.shape) != tuple(t.shape) or not p.requires_grad:
            skipped.append(name)
        else:
            pairs.append((p, t))
    if skipped:
        warnings.warn(
            f"{who}: skipped head tensors that do not map onto this model's head: {skipped}",
            stacklevel=3,
        )
    return pairs


def lora_ab(wrapper: nn.Module, task: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's (A (r, d_in), B (width, r)) weights of a GatedLoRA (the one place that
    knows how GatedLoRA stores them)."""
    u = wrapper.units[task]
    return u.A.weight, u.B.weight
