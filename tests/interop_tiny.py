"""The interop tests' shared helpers (peft and the adapters library): the families, a padded
batch, the relative-norm check, and one forward/backward of a peer model and of ours."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tests.hf_tiny import VOCAB

KINDS = ("bert", "roberta", "gpt2", "llama")  # tiny LLaMA has GQA (4 heads, 2 kv heads)
DECODER = ("gpt2", "llama")


def interop_batch(kind: str, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """3 examples of 7 tokens; example 1 is padded (on the left if ``left``)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 7), generator=g)
    am = torch.ones(3, 7, dtype=torch.long)
    if left:
        am[1, :3] = 0
    else:
        am[1, 4:] = 0
    if kind == "roberta":
        ids = ids.masked_fill(am == 0, 1)  # RoBERTa's positions come from its padding id
    return ids, am


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Relative norm error of ``a`` against ``b`` (float64) at most ``tol``."""
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    return bool((a - b).norm() <= tol * b.norm() + 1e-12)


def run_both(peer, ours, ids: torch.Tensor, am: torch.Tensor, run: Callable):
    """``run(model, ids, am) -> (output, loss)`` on the peer model and on ours, then each
    loss's backward into fresh gradients; returns (the peer's output, ours)."""
    want, lw = run(peer, ids, am)
    got, lg = run(ours, ids, am)
    peer.zero_grad()
    ours.zero_grad()
    lw.backward()
    lg.backward()
    return want, got
