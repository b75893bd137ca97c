"""HF attention masks -> ``key_padding_mask`` + bottom-right ``causal``, checked exact.

:func:`layer_masks` is what the attention function calls on every layer: it works the
answer out once per forward (cached on the root, reset by the model pre-hook) and, where
the model pre-hook captured a 2-D mask, from that mask without reading it on the host.
"""

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


def convert_mask(
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


def layer_masks(
    root,
    mask: torch.Tensor | None,
    causal: bool,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys_of: str = "enc",
):
    """(key_padding_mask or None, causal, k, v) for one layer, with no host read per layer.

    With the forward's 2-D mask covering every key (the usual case, KV cache included) the
    padding mask is that mask and ``causal`` the module's: nothing is read on the host and
    the 4-D mask HF built from it is not inspected. A 2-D mask is passed even when it has no
    padding (knowing that would need a host read). Sliding-window layers take this path too:
    the window goes to the op (``window=``), HF's window being over cache positions, which
    are the key indices here (left padding included). Otherwise (a 4-D mask from the caller,
    a static cache whose slots outnumber the mask, a sliding-window cache that dropped old
    keys) the 4-D mask is inspected with :func:`convert_mask`, once per forward per mask.
    Encoder-decoders: ``keys_of`` "dec" (decoder self-attention) takes the decoder's 2-D
    mask; encoder self- and cross-attention keys are the encoder's tokens.
    """
    B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
    cache = root.mask_cache
    m2 = root.dec_mask2d if keys_of == "dec" else root.mask2d
    if m2 is not None and m2.shape[1] == Lk and B % m2.shape[0] == 0:
        key = ("2d", keys_of, B, Lk, q.device)
        kpm = cache.get(key)
        if kpm is None:
            kpm = m2.to(q.device)
            if kpm.shape[0] != B:  # generate() with beams / num_return_sequences
                kpm = kpm.repeat_interleave(B // kpm.shape[0], 0)
            cache[key] = kpm
        return kpm, causal, k, v
    if mask is None:
        return None, causal, k, v
    key = ("4d", id(mask), B, Lq, Lk, causal)
    hit = cache.get(key)
    if hit is None or hit[0] is not mask:  # the identity check: ids can be reused
        kpm, c, k2, _ = convert_mask(mask, causal, q, k, k)
        hit = (mask, kpm, c, k2.shape[2])
        cache[key] = hit
    _, kpm, causal, n = hit
    if n != Lk:  # a static cache's unwritten slots
        k, v = k[:, :, :n], v[:, :, :n]
    return kpm, causal, k, v
