"""Per-model UniPELT state: the root module (prefix encoder, gates, prompt, runtime state)
and the :class:`Site` records that wire hooked modules to it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import UniPELTConfig
from ..modules import PrefixEncoder, PrefixGate


def _forward_state() -> dict:
    """The per-forward state of a root, empty. Set at the model's entry (hooks.py), read by
    the hooks, wrappers and the attention function of that forward."""
    return {
        "task_ids": None,  # (B,) LongTensor, or None: the default task
        "mask2d": None,  # (B, L) bool real-token mask of the model's input
        "dec_mask2d": None,  # encoder-decoder: the decoder's
        "mask_cache": {},  # masks.layer_masks, worked out once per forward
        "entry_ref": None,  # the model forward's input (identity, see encoder_pre_hook)
        # handed from a hook to the module it precedes, by site index, taken when used:
        "gate_slots": {},  # a prefix site's gate G_P (B, 2)
        "residual_slots": {},  # an adapter site's FFN-block input x
    }


# The attribute that carries a hooked HF module's Site (its only UniPELT attribute).
SITE_ATTR = "unipelt_site"


@dataclass(eq=False)
class Site:
    """Static wiring of one hooked module, owned by its root (``root.sites``): its slot (the
    prefix rows and gate of an attention site; the residual slot of an adapter site) and the
    2-D masks its gates and keys read ("enc"/"dec" in an encoder-decoder; None: the model's
    one mask). Hooks and wrappers hold a Site, never a closure, so ``copy.deepcopy`` maps it
    (and through it the root) onto the copy, and pickling carries it."""

    root: UniPELTRoot = field(repr=False)
    index: int
    stack: str | None = None
    keys_of: str = "enc"


class UniPELTRoot(nn.Module):
    """Holds the prefix encoder, prefix gates and soft prompt, the static wiring
    (``sites``) and all per-forward state (see :meth:`reset_forward_state`)."""

    def __init__(self, cfg: UniPELTConfig, dims: dict, backend: str) -> None:
        super().__init__()
        self.cfg, self.dims, self.backend = cfg, dict(dims), backend
        self.default_task = 0
        self.sites: list[Site] = []
        self.reset_forward_state()
        T, L = len(cfg.tasks), dims["n_layers"]
        gm = "masked_mean" if cfg.gate_mode == "token" else cfg.gate_mode
        self.prefix = self.prefix_gates = self.prompt = None
        if cfg.prefix is not None:
            pc = cfg.prefix
            L = L if pc.layers is None else len(pc.layers)  # only the chosen layers' rows
            self.prefix = PrefixEncoder(
                pc.length,
                L,
                dims["n_kv_heads"],
                dims["head_dim"],
                hidden_size=pc.mlp_hidden,
                embed_dim=pc.embed_dim,
                n_tasks=T,
                reparam=pc.reparam,
                backend=backend,
            )
            if pc.gate:
                self.prefix_gates = nn.ModuleList(
                    nn.ModuleList(PrefixGate(dims["hidden"], gm) for _ in range(T))
                    for _ in range(L)
                )
        self._handles: list = []

    # runtime state ---------------------------------------------------------------------------
    def site(self, index: int, stack: str | None = None, keys_of: str = "enc") -> Site:
        """A new Site of this root (``index``: its slot in the per-forward state)."""
        s = Site(self, index, stack, keys_of)
        self.sites.append(s)
        return s

    def reset_forward_state(self) -> None:
        """Forget everything a forward leaves behind (the model pre-hook calls this first)."""
        self.__dict__.update(_forward_state())

    def __getstate__(self) -> dict:
        # deepcopy and pickle: the last forward's state is not part of the model (and may
        # hold non-leaf tensors, which deepcopy refuses)
        return {**self.__dict__, **_forward_state()}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.cfg.prefix is not None:  # unpickled in a fresh process: the model's config
            from .attention import _register  # names the "unipelt" attention function

            _register()

    def remove_hooks(self) -> None:
        """Remove every hook apply_unipelt registered for this root."""
        for h in self._handles:
            h.remove()

    def task_ids_for(self, batch: int) -> torch.Tensor | None:
        t = self.task_ids
        if t is None or t.shape[0] == batch:
            return t
        if batch % t.shape[0] == 0:  # generate() with beams / num_return_sequences
            return t.repeat_interleave(batch // t.shape[0])
        raise ValueError(f"unipelt: task_ids has {t.shape[0]} entries for a batch of {batch}")

    def prefix_index(self, batch: int, device: torch.device) -> torch.Tensor:
        t = self.task_ids_for(batch)
        if t is None:
            return torch.full((batch,), self.default_task, dtype=torch.long, device=device)
        return t

    def mask_for(self, x: torch.Tensor, stack: str | None = None) -> torch.Tensor | None:
        """The (B, L) real-token mask for a (B, L, d) activation: the last L columns of the
        forward's 2-D mask (with a KV cache the mask also covers the cached tokens). In an
        encoder-decoder, ``stack`` "dec" selects the decoder's mask."""
        m = self.dec_mask2d if stack == "dec" else self.mask2d
        if m is None or x.dim() != 3:
            return None
        B, L = x.shape[0], x.shape[1]
        if m.shape[1] < L:
            return None
        m = m[:, m.shape[1] - L :]
        if m.shape[0] != B and B % m.shape[0] == 0:
            m = m.repeat_interleave(B // m.shape[0], dim=0)
        return m if m.shape[0] == B else None

    # prefix ----------------------------------------------------------------------------------
    def layer_prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's (T, Hkv, P, D) prefix K/V; with the MLP, only that layer's rows of its
        output layer are computed (so each layer's prefix is recomputed with its layer under
        gradient checkpointing, and the MLP graph is never shared between layers)."""
        enc = self.prefix
        if enc.is_ejected or not enc.reparam:
            return enc()[layer]
        T, P, Hkv, D = enc.n_tasks, enc.prefix_len, enc.n_kv_heads, enc.head_dim
        emb = enc.embedding.weight.view(T, P, -1)
        h = enc.mlp[1](enc.mlp[0](emb))
        out = enc.mlp[2]
        n = 2 * Hkv * D
        rows = slice(layer * n, (layer + 1) * n)
        flat = F.linear(h, out.weight[rows], out.bias[rows])  # (T, P, 2*Hkv*D)
        kv = flat.view(T, P, 2, Hkv, D).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]


def root_of(model: nn.Module) -> UniPELTRoot:
    """The UniPELTRoot of an applied model (or of the model inside a DDP wrapper)."""
    inner = getattr(model, "module", model)  # DDP
    root = getattr(inner, "unipelt", None)
    if not isinstance(root, UniPELTRoot):
        raise ValueError("this model has no UniPELT methods: call apply_unipelt first")
    return root
