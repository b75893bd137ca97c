"""HF attention masks -> ``key_padding_mask`` + bottom-right ``causal``, checked exact."""

from __future__ import annotations

import torch

from .. import reference


def _mask_is(vis: torch.Tensor, kpm: torch.Tensor, causal: bool) -> bool:
    """Is the (B, Lq|1, Lk) visibility exactly ``kpm`` + bottom-right ``causal``?"""
    if vis.shape[1] == 1:
        return True  # one broadcast row: padding only; causal comes from the module
    B, Lq, Lk = vis.shape
    exp = reference.token_key_visibility(B, Lq, Lk, kpm, causal, vis.device)[:, 0]
    # rows that some torch-version workarounds unmask in full are fine where none is visible
    ok = (exp == vis) | (vis.all(-1, keepdim=True) & ~exp.any(-1, keepdim=True))
    return bool(ok.all())


def _convert_mask(
    mask: torch.Tensor | None,
    causal: bool,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
):
    """HF mask -> (key_padding_mask or None, causal, k, v), checking it is representable."""
    B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
    if mask is None:
        return None, causal, k, v
    if mask.dim() == 2:  # (B, Lk), 1 = real
        kpm = mask.bool()
        return (None if bool(kpm.all()) else kpm), causal, k, v
    if mask.dim() != 4:
        raise ValueError(f"unipelt attention: unsupported mask shape {tuple(mask.shape)}")
    # bool: True = attend; float: additive (0 = attend, very negative = masked)
    vis = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > -1.0
    if vis.shape[-1] > Lk:
        vis = vis[..., :Lk]
    if vis.shape[-1] < Lk:
        raise ValueError(f"unipelt attention: mask covers {vis.shape[-1]} of {Lk} keys")
    vis = vis.expand(B, vis.shape[1], Lk)
    if vis.shape[1] not in (1, Lq):
        raise ValueError("unipelt attention: mask rows do not match the queries")
    kpm = vis[:, -1, :]  # bottom-right causal: the last query sees every real key
    if vis.shape[1] > 1 and not _mask_is(vis, kpm, causal) and _mask_is(vis, kpm, not causal):
        causal = not causal  # e.g. GPT-2 on transformers 4.x passes is_causal=False with a mask
    if not _mask_is(vis, kpm, causal):
        # A static cache: keys no query may see at the end are unwritten slots. Dropping
        # them restores the bottom-right alignment for the keys that remain.
        seen = vis.any(dim=1).any(dim=0).nonzero()
        n = int(seen.max()) + 1 if seen.numel() else Lk
        if not (Lq <= n < Lk and _mask_is(vis[..., :n], kpm[:, :n], causal)):
            raise NotImplementedError(
                "unipelt prefix attention supports padding masks with (bottom-right) causal "
                "masking only; this mask is something else (a sliding window shorter than "
                "the sequence, packed sequences or a custom 4-D mask)"
            )
        kpm, k, v = kpm[:, :n], k[:, :, :n], v[:, :, :n]
    return (None if bool(kpm.all()) else kpm), causal, k, v
