"""peft-style configuration dataclasses for :func:`unipelt_fast.apply_unipelt`.

Defaults follow UniPELT (Mao et al., 2022): a bottleneck adapter of hidden/16 with relu after
the FFN output (Pfeiffer / seq_bn), a prefix of 10 positions with the MLP reparameterisation,
LoRA r=8 on the query and value projections, and a gate on every method.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ._validation import ACTIVATIONS
from .modules import GATE_MODES


@dataclass
class AdapterConfig:
    """Bottleneck adapter after each FFN output. ``bottleneck=None`` means hidden_size // 16."""

    bottleneck: int | None = None
    activation: str = "relu"
    scaling: float = 1.0
    gate: bool = True


@dataclass
class PrefixConfig:
    """Prefix tuning: ``length`` key/value positions per layer (prefix keys are not rotated).

    With ``reparam`` the prefix is an MLP's output during training (Li & Liang); ``eject()``
    turns it into fixed K/V. The MLP's output for ``length`` positions has rank at most
    ``length + 1``, so a narrow hidden layer (``mlp_hidden``) loses no expressiveness while
    keeping the training-time parameter count small (0.6M instead of 9.8M for BERT-base at
    512). ``embed_dim=None`` means the model's kv width.
    """

    length: int = 10
    reparam: bool = True
    mlp_hidden: int = 32
    embed_dim: int | None = None
    gate: bool = True


@dataclass
class LoRAConfig:
    """Gated LoRA: ``y = base(x) + g * (alpha / r) * B(A(x))`` on the listed projections.

    ``targets`` names roles, not module names: "query", "key", "value" (GPT-2's fused c_attn
    gets the matching output slices).
    """

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "value")
    gate: bool = True


@dataclass
class PromptConfig:
    """Soft prompt: ``length`` trainable embeddings prepended to the input embeddings."""

    length: int = 10
    gate: bool = True


_SUB = {
    "adapter": AdapterConfig,
    "prefix": PrefixConfig,
    "lora": LoRAConfig,
    "prompt": PromptConfig,
}


@dataclass
class UniPELTConfig:
    """Which methods to inject and how.

    ``adapter``, ``prefix``, ``lora`` and ``prompt`` each accept True (the defaults),
    False/None (off) or their sub-config. ``tasks`` names the tasks a model holds (each gets
    its own prefix, adapter, LoRA, prompt and gates); ``model(..., task_ids=LongTensor[B])``
    picks one per example. ``modules_to_save``: extra module names trained in full (None: the
    usual HF task heads "classifier", "score", "qa_outputs" when present).
    """

    bitfit: bool = True
    adapter: Any = True
    prefix: Any = True
    lora: Any = False
    prompt: Any = False
    gate_mode: str = "mean"
    tasks: tuple[str, ...] = ("default",)
    modules_to_save: tuple[str, ...] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, cls in _SUB.items():
            v = getattr(self, name)
            if v is True:
                v = cls()
            elif v is False or v is None:
                v = None
            elif isinstance(v, dict):
                v = cls(**v)
            elif not isinstance(v, cls):
                raise TypeError(
                    f"UniPELTConfig.{name} must be True, False, None or {cls.__name__}, "
                    f"got {type(v).__name__}"
                )
            setattr(self, name, v)
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"UniPELTConfig.gate_mode must be one of {GATE_MODES}")
        if isinstance(self.tasks, str):
            self.tasks = (self.tasks,)
        self.tasks = tuple(self.tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError("UniPELTConfig.tasks must be non-empty distinct names")
        if self.modules_to_save is not None:
            self.modules_to_save = tuple(self.modules_to_save)
        if self.adapter is not None:
            if self.adapter.activation not in ACTIVATIONS:
                raise ValueError(f"AdapterConfig.activation must be one of {ACTIVATIONS}")
            if self.adapter.bottleneck is not None and self.adapter.bottleneck < 1:
                raise ValueError("AdapterConfig.bottleneck must be >= 1")
        if self.prefix is not None and (self.prefix.length < 1 or self.prefix.mlp_hidden < 1):
            raise ValueError("PrefixConfig.length and mlp_hidden must be >= 1")
        if self.lora is not None:
            self.lora.targets = tuple(self.lora.targets)
            bad = set(self.lora.targets) - {"query", "key", "value"}
            if self.lora.r < 1 or bad or not self.lora.targets:
                raise ValueError("LoRAConfig: r >= 1 and targets within query/key/value")
        if self.prompt is not None and self.prompt.length < 1:
            raise ValueError("PromptConfig.length must be >= 1")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("tasks", "modules_to_save"):
            d[k] = None if d[k] is None else list(d[k])
        if d["lora"] is not None:
            d["lora"]["targets"] = list(d["lora"]["targets"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UniPELTConfig:
        d = dict(d)
        for name in _SUB:
            if d.get(name) is None:
                d[name] = None
        return cls(**d)
