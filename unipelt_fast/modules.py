"""Reference nn.Modules built on the public ops. Each has a ``backend`` attribute."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import ops
from ._validation import ACTIVATIONS

GATE_MODES = ("token", "mean", "masked_mean")


class Gate(nn.Module):
    """UniPELT gate ``sigmoid(Linear(h))``.

    mode "token": one gate per token, (..., 1) (the paper). "mean": averaged over the
    sequence dim of a (B, L, d) input, (B, 1, 1) (the reference code). "masked_mean": the
    mean over real tokens only, given ``mask`` (B, L) bool; an example with none gets 0.
    """

    def __init__(self, hidden_size: int, mode: str = "token") -> None:
        super().__init__()
        if mode not in GATE_MODES:
            raise ValueError(f"Gate: mode must be one of {GATE_MODES}, got {mode!r}")
        self.mode = mode
        self.proj = nn.Linear(hidden_size, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(torch.sigmoid(self.proj(h)), mask)

    def pool(self, g: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The gate from per-token values ``g = sigmoid(logits)`` (..., n), by ``mode``
        (split out so mixed-task batches can compute g with per-example weights)."""
        if self.mode == "token":
            return g
        if g.dim() != 3:
            raise ValueError(
                f"Gate: mode {self.mode!r} needs a (B, L, d) input, got a "
                f"{g.dim()}-D one of leading shape {tuple(g.shape[:-1])}"
            )
        if self.mode == "mean" or mask is None:
            return g.mean(dim=-2, keepdim=True)
        m = mask.unsqueeze(-1).bool()
        # where, not g * m: a NaN in an excluded (padding) token must not reach the mean.
        total = torch.where(m, g, torch.zeros_like(g)).sum(dim=-2, keepdim=True)
        return total / m.sum(dim=-2, keepdim=True).clamp_min(1).to(g.dtype)


class PrefixGate(Gate):
    """G_P for prefix_attention: one value per example, (B,) or (B, 2) with ``split_kv``.

    ``prefix_attention`` takes a per-example gate, so this gate always averages over the
    sequence ("mean", or "masked_mean" with a mask); "token" is not available here.
    """

    def __init__(self, hidden_size: int, mode: str = "mean", split_kv: bool = False) -> None:
        if mode == "token":
            raise ValueError(
                "PrefixGate: prefix_attention gates per example; use 'mean' or 'masked_mean'"
            )
        nn.Module.__init__(self)
        self.mode = mode
        self.proj = nn.Linear(hidden_size, 2 if split_kv else 1)

    def pool(self, g: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        g = super().pool(g, mask)  # (B, 1, n)
        return g.reshape(g.shape[0], -1).squeeze(-1)


class GatedAdapter(nn.Module):
    """Bottleneck adapter with a UniPELT gate: ``residual + g * scaling * up(act(down(x)))``.

    The up-projection starts at zero, so a fresh adapter is the identity (Houlsby et al.).
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck: int,
        *,
        activation: str = "relu",
        gate: bool = True,
        gate_mode: str = "token",
        scaling: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"GatedAdapter: activation must be one of {ACTIVATIONS}, got {activation!r}"
            )
        if gate_mode not in GATE_MODES:
            raise ValueError(
                f"GatedAdapter: gate_mode must be one of {GATE_MODES}, got {gate_mode!r}"
            )
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.gate = nn.Linear(hidden_size, 1) if gate else None
        self.activation, self.gate_mode, self.scaling, self.backend = (
            activation,
            gate_mode,
            scaling,
            backend,
        )

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``mask`` (B, L) bool is used by gate_mode "masked_mean" only."""
        mode = "token" if self.gate_mode == "token" else "mean"
        gate_mask = mask if (self.gate_mode == "masked_mean" and self.gate is not None) else None
        return ops.gated_adapter(
            x,
            self.down.weight,
            self.down.bias,
            self.up.weight,
            self.up.bias,
            residual=residual,
            w_gate=None if self.gate is None else self.gate.weight,
            b_gate=None if self.gate is None else self.gate.bias,
            gate_mode=mode,
            gate_mask=gate_mask,
            activation=self.activation,
            scaling=self.scaling,
            backend=self.backend,
        )


class PrefixEncoder(nn.Module):
    """Per-layer prefix keys/values for ``n_tasks`` tasks.

    Reparameterised (default): an embedding of ``prefix_len`` positions per task, then
    Linear -> tanh -> Linear out to ``n_layers * 2 * n_kv_heads * head_dim`` (Li & Liang).
    Flat (``reparam=False``): those values are a parameter directly. ``eject()`` freezes the
    MLP's output into fixed per-layer K/V for inference.

    ``forward()`` returns one ``(prefix_k, prefix_v)`` per layer, each (T, Hkv, P, D): pass
    them with ``prefix_index`` (mixed-task batches), or ``[0]`` of them for a shared prefix.
    """

    def __init__(
        self,
        prefix_len: int,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        hidden_size: int = 512,
        embed_dim: int | None = None,
        n_tasks: int = 1,
        reparam: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if min(prefix_len, n_layers, n_kv_heads, head_dim, n_tasks) < 0 or n_tasks == 0:
            raise ValueError("PrefixEncoder: sizes must be non-negative and n_tasks >= 1")
        self.prefix_len, self.n_layers, self.n_kv_heads, self.head_dim = (
            prefix_len,
            n_layers,
            n_kv_heads,
            head_dim,
        )
        self.n_tasks, self.reparam, self.backend = n_tasks, reparam, backend
        out_dim = n_layers * 2 * n_kv_heads * head_dim
        if reparam:
            embed_dim = embed_dim or n_kv_heads * head_dim
            self.embedding = nn.Embedding(n_tasks * prefix_len, embed_dim)
            self.mlp = nn.Sequential(
                nn.Linear(embed_dim, hidden_size), nn.Tanh(), nn.Linear(hidden_size, out_dim)
            )
        else:
            self.prefix = nn.Parameter(
                torch.randn(n_tasks, prefix_len, out_dim) / math.sqrt(head_dim)
            )
        self.register_buffer("ejected", None, persistent=True)

    @property
    def is_ejected(self) -> bool:
        return self.ejected is not None

    def _flat(self) -> torch.Tensor:
        """(T, P, n_layers * 2 * Hkv * D)."""
        if self.ejected is not None:
            return self.ejected
        if not self.reparam:
            return self.prefix
        emb = self.embedding.weight.view(self.n_tasks, self.prefix_len, -1)
        return self.mlp(emb)

    def forward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        T, P = self.n_tasks, self.prefix_len
        kv = self._flat().view(T, P, self.n_layers, 2, self.n_kv_heads, self.head_dim)
        kv = kv.permute(2, 3, 0, 4, 1, 5)  # (layers, 2, T, Hkv, P, D)
        return [(kv[i, 0], kv[i, 1]) for i in range(self.n_layers)]

    def attend(
        self,
        layer_kv: tuple[torch.Tensor, torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        prefix_index: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``prefix_attention`` with one layer's prefix from :meth:`forward`, on ``self.backend``.

        With a single task and no ``prefix_index``, the prefix is shared by the batch.
        """
        pk, pv = layer_kv
        if prefix_index is None:
            if pk.shape[0] != 1:
                raise ValueError(f"PrefixEncoder.attend: {pk.shape[0]} tasks need a prefix_index")
            pk, pv = pk[0], pv[0]
        return ops.prefix_attention(
            q, k, v, pk, pv, prefix_index=prefix_index, backend=self.backend, **kwargs
        )

    @torch.no_grad()
    def eject(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Compute the prefix once, keep it as a fixed buffer, drop the MLP; return the K/V."""
        flat = self._flat().detach().clone()
        self.ejected = flat
        if self.reparam:
            del self.embedding, self.mlp
            self.reparam = False
        elif hasattr(self, "prefix"):
            del self.prefix
        return self.forward()


class BiasOnlyLinear(nn.Module):
    """A Linear with a frozen weight and a trainable bias (BitFit), on ``bias_only_linear``.

    The weight Parameter is kept as given (not copied), so tied weights stay tied. With
    ``transposed=True`` the weight is stored (d_in, d_out), as in HF's GPT-2 Conv1D.
    """

    def __init__(
        self,
        weight: nn.Parameter | torch.Tensor,
        bias: nn.Parameter | torch.Tensor | None = None,
        *,
        activation: str | None = None,
        transposed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(weight, nn.Parameter):
            weight = nn.Parameter(weight.detach())
        self.weight = weight.requires_grad_(False)
        d_out = weight.shape[1] if transposed else weight.shape[0]
        if bias is None:
            bias = torch.zeros(d_out, dtype=weight.dtype, device=weight.device)
        if not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias.detach().clone())
        self.bias = bias.requires_grad_(True)
        self.activation, self.transposed, self.backend = activation, transposed, backend

    @classmethod
    def from_linear(cls, linear: nn.Module, **kw) -> BiasOnlyLinear:
        return cls(linear.weight, linear.bias, **kw)

    @property
    def in_features(self) -> int:
        return self.weight.shape[0 if self.transposed else 1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1 if self.transposed else 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t() if self.transposed else self.weight
        return ops.bias_only_linear(
            x, w, self.bias, activation=self.activation, backend=self.backend
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"activation={self.activation}, backend={self.backend!r}"
        )


class BiasOnlyLayerNorm(nn.Module):
    """LayerNorm with a frozen gamma and a trainable beta (BitFit), on ``bias_only_layer_norm``."""

    def __init__(
        self,
        weight: nn.Parameter | torch.Tensor,
        bias: nn.Parameter | torch.Tensor,
        eps: float = 1e-5,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(weight, nn.Parameter):
            weight = nn.Parameter(weight.detach())
        if not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias.detach().clone())
        self.weight = weight.requires_grad_(False)
        self.bias = bias.requires_grad_(True)
        self.eps, self.backend = eps, backend

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm, **kw) -> BiasOnlyLayerNorm:
        if ln.weight is None or ln.bias is None or len(ln.normalized_shape) != 1:
            raise ValueError("BiasOnlyLayerNorm needs an affine LayerNorm over the last dim")
        return cls(ln.weight, ln.bias, ln.eps, **kw)

    @property
    def normalized_shape(self) -> tuple[int]:
        return (self.weight.shape[0],)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.bias_only_layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)
