"""peft-style configuration dataclasses for :func:`unipelt_fast.apply_unipelt`.

Defaults follow UniPELT (Mao et al., 2022): a bottleneck adapter of hidden/16 with relu on the
layer's output (AdapterHub's SeqBn with ``original_ln_before=True``, as in the UniPELT
reference), a prefix of 10 positions with the MLP reparameterisation, LoRA r=8 on the query and
value projections, and a gate on every method.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ._validation import ACTIVATIONS
from .modules import GATE_MODES

LORA_TARGETS = ("query", "key", "value")
DEFAULT_LORA_TARGETS = ("query", "value")
ALL_LINEAR = "all-linear"  # peft's INCLUDE_LINEAR_LAYERS_SHORTHAND (compared lower-cased)


# --- field checks: every config field is type- and range-checked here, in one place -------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # bool is an int subclass


def _check_bool(owner: str, name: str, v: object) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{owner}.{name} must be True or False, got {v!r}")


def _check_int(owner: str, name: str, v: object, lo: int, optional: bool = False) -> None:
    if v is None and optional:
        return
    if not _is_int(v):
        none = " or None" if optional else ""
        raise TypeError(f"{owner}.{name} must be an int{none}, got {type(v).__name__} {v!r}")
    if v < lo:
        raise ValueError(f"{owner}.{name} must be >= {lo}, got {v}")


def _check_float(owner: str, name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"{owner}.{name} must be a float, got {type(v).__name__} {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{owner}.{name} must be finite, got {v}")


def _check_choice(owner: str, name: str, v: object, choices: tuple) -> None:
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{owner}.{name} must be one of {choices}, got {v!r}")


def _check_names(owner: str, name: str, v: object, choices: tuple | None = None) -> tuple:
    """A tuple of distinct, non-empty strings (a single string means one name)."""
    if isinstance(v, str):
        v = (v,)
    if not isinstance(v, list | tuple):
        raise TypeError(f"{owner}.{name} must be a tuple of names, got {type(v).__name__}")
    for n in v:
        if not isinstance(n, str) or not n:
            raise TypeError(f"{owner}.{name} must hold non-empty strings, got {n!r}")
        if choices is not None and n not in choices:
            raise ValueError(f"{owner}.{name}: {n!r} is not one of {choices}")
    if len(set(v)) != len(v):
        raise ValueError(f"{owner}.{name} must hold distinct names, got {tuple(v)}")
    return tuple(v)


def _check_layers(owner: str, v: object) -> tuple[int, ...] | None:
    """Per-layer selection: None (every layer) or distinct layer indices >= 0, sorted."""
    if v is None:
        return None
    if not isinstance(v, list | tuple | range) or not all(_is_int(i) for i in v):
        raise TypeError(f"{owner}.layers must be None or a sequence of ints, got {v!r}")
    if not v or min(v) < 0:
        raise ValueError(f"{owner}.layers must be non-empty and >= 0, got {v!r}")
    return tuple(sorted(set(v)))


# Where the bottleneck adapter sits (h: the FFN's output, x: the FFN block's input on the
# residual stream, N: the post-FFN LayerNorm of BERT-like models, identity for pre-LN models).
# AdapterHub names in brackets; docs/interop.md has the table.
PLACEMENTS = (
    "block_output",  # N(h + x + a(N(h + x)))  [SeqBn, original_ln_before=True; UniPELT]
    "ffn_output",  # N(h + a(h) + x)  [SeqBn, original_ln_before=False]
    "ffn_parallel",  # N(h + a(x) + x)  [ParBn]
    "attn_and_ffn_output",  # "ffn_output" after the attention output too  [DoubleSeqBn]
)
PREFIX_POSITIONS = (
    "tokens_only",  # tokens at positions 0..L-1 (the UniPELT reference)
    "after_prefix",  # tokens at P..P+L-1, as if the prefix were P real tokens (peft)
)


@dataclass
class AdapterConfig:
    """Bottleneck adapter(s) per layer, at ``placement`` (see ``PLACEMENTS``).

    ``bottleneck=None`` means hidden_size // 16. ``layers``: the layer indices that get an
    adapter (None: every layer).
    """

    bottleneck: int | None = None
    activation: str = "relu"
    scaling: float = 1.0
    gate: bool = True
    placement: str = "block_output"
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        o = "AdapterConfig"
        _check_int(o, "bottleneck", self.bottleneck, 1, optional=True)
        _check_choice(o, "activation", self.activation, ACTIVATIONS)
        _check_float(o, "scaling", self.scaling)
        _check_bool(o, "gate", self.gate)
        _check_choice(o, "placement", self.placement, PLACEMENTS)
        self.layers = _check_layers(o, self.layers)


@dataclass
class PrefixConfig:
    """Prefix tuning: ``length`` key/value positions per layer (prefix keys are not rotated).

    With ``reparam`` the prefix is an MLP's output during training (Li & Liang); ``eject()``
    turns it into fixed K/V. The MLP's output for ``length`` positions has rank at most
    ``length + 1``, so a narrow hidden layer (``mlp_hidden``) loses no expressiveness while
    keeping the training-time parameter count small (0.6M instead of 9.8M for BERT-base at
    512). ``embed_dim=None`` means the model's kv width.

    ``positions``: "tokens_only" keeps the tokens at positions 0..L-1 (the UniPELT reference);
    "after_prefix" counts the prefix as ``length`` virtual tokens, so tokens sit at
    ``length..length+L-1`` in forward and ``generate()`` (peft's convention). ``layers``: the
    layer indices that get a prefix (None: every layer); the encoder holds only those layers.
    """

    length: int = 10
    reparam: bool = True
    mlp_hidden: int = 32
    embed_dim: int | None = None
    gate: bool = True
    positions: str = "tokens_only"
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        o = "PrefixConfig"
        _check_int(o, "length", self.length, 1)
        _check_bool(o, "reparam", self.reparam)
        _check_int(o, "mlp_hidden", self.mlp_hidden, 1)
        _check_int(o, "embed_dim", self.embed_dim, 1, optional=True)
        _check_bool(o, "gate", self.gate)
        _check_choice(o, "positions", self.positions, PREFIX_POSITIONS)
        self.layers = _check_layers(o, self.layers)


@dataclass
class LoRAConfig:
    """Gated LoRA: ``y = base(x) + g * (alpha / r) * B(A(x))`` on the chosen projections.

    The projections are chosen one of two ways:

    * ``targets`` names roles: "query", "key", "value" of each attention (GPT-2's fused
      c_attn gets the matching output slices). The default, ("query", "value").
    * ``target_modules`` names modules as peft's ``LoraConfig.target_modules`` does (see
      :mod:`unipelt_fast.hf.targets`): a list of names, each matching a module whose full
      name is it or ends in ``"." + name``; a string is a regex the full name must match
      entirely; ``"all-linear"`` is every ``nn.Linear`` / HF ``Conv1D`` except the output
      embeddings (lm_head) and the trained heads. Any linear layer can be a target (the
      attention output, the MLP's gate/up/down, a fused projection: one LoRA over its whole
      output). With a list, ``layers`` keeps the modules whose layer index (peft's: the
      first numbered part of the name, or the number after a ``layers_pattern`` name) is
      listed; a string takes no ``layers``.

    ``gate_replaces_scaling``: with a gate, drop alpha / r (``y = base(x) + g * B(A(x))``,
    the adapters library's convention). ``layers``: with ``targets``, the attention layers
    that get LoRA (None: every layer). ``split_fused`` (with ``targets``): on a fused
    projection (GPT-2's c_attn), each role's slice gets its own A, B and gate (the adapters
    library's LoRAMergedLinear) instead of one A, B and gate over all the roles' slices.
    """

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None  # None: ("query", "value") unless target_modules
    gate: bool = True
    gate_replaces_scaling: bool = False
    layers: tuple[int, ...] | None = None
    # encoder-decoder models: which attentions get LoRA ("self": encoder and decoder
    # self-attention; "cross": decoder cross-attention). Ignored by decoder/encoder-only models.
    attention_types: tuple[str, ...] = ("self", "cross")
    target_modules: tuple[str, ...] | str | None = None
    layers_pattern: tuple[str, ...] | None = None
    split_fused: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        o = "LoRAConfig"
        _check_int(o, "r", self.r, 1)
        _check_float(o, "alpha", self.alpha)
        if self.target_modules is None:
            if self.targets is None:
                self.targets = DEFAULT_LORA_TARGETS
            self.targets = _check_names(o, "targets", self.targets, LORA_TARGETS)
            if not self.targets:
                raise ValueError(f"{o}.targets must name at least one of {LORA_TARGETS}")
            if self.layers_pattern is not None:
                raise ValueError(f"{o}.layers_pattern goes with target_modules, not targets")
        else:
            self._validate_target_modules(o)
        _check_bool(o, "gate", self.gate)
        _check_bool(o, "gate_replaces_scaling", self.gate_replaces_scaling)
        self.layers = _check_layers(o, self.layers)
        types = ("self", "cross")
        self.attention_types = _check_names(o, "attention_types", self.attention_types, types)
        if not self.attention_types:
            raise ValueError(f"{o}.attention_types must name at least one of {types}")
        _check_bool(o, "split_fused", self.split_fused)
        if self.split_fused and self.target_modules is not None:
            raise ValueError(
                f"{o}.split_fused splits a fused projection by role; it goes with targets, "
                "not target_modules (a named module gets one LoRA over its whole output)"
            )
        if self.target_modules is not None and self.attention_types != types:
            raise ValueError(
                f"{o}.attention_types chooses among role targets; with target_modules, name "
                "the modules (e.g. a regex over the cross-attention's names)"
            )
        if isinstance(self.target_modules, str) and self.layers is not None:
            raise ValueError(
                f"{o}.layers goes with a list of target_modules (peft ignores "
                "layers_to_transform for a regex or 'all-linear'); put the layers in the regex"
            )

    def _validate_target_modules(self, o: str) -> None:
        if self.targets is not None:
            raise ValueError(
                f"{o}: give targets (roles) or target_modules (module names), not both; "
                f"got targets={self.targets!r}, target_modules={self.target_modules!r}"
            )
        tm = self.target_modules
        if isinstance(tm, str):
            if not tm:
                raise ValueError(f"{o}.target_modules must not be empty")
            if tm.lower() != ALL_LINEAR:
                try:
                    re.compile(tm)
                except re.error as e:
                    raise ValueError(f"{o}.target_modules {tm!r} is not a valid regex ({e})") from e
        else:
            self.target_modules = _check_names(o, "target_modules", tm)
            if not self.target_modules:
                raise ValueError(f"{o}.target_modules must name at least one module")
        if self.layers_pattern is not None:
            self.layers_pattern = _check_names(o, "layers_pattern", self.layers_pattern)
            if not self.layers_pattern or self.layers is None:
                raise ValueError(f"{o}.layers_pattern needs layers (and at least one name)")


@dataclass
class PromptConfig:
    """Soft prompt: ``length`` trainable embeddings prepended to the input embeddings."""

    length: int = 10
    gate: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_int("PromptConfig", "length", self.length, 1)
        _check_bool("PromptConfig", "gate", self.gate)


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
        self.validate()

    def validate(self) -> None:
        """Check every field (also the sub-configs'); apply_unipelt calls this again, so a
        field changed after construction is checked before anything changes."""
        o = "UniPELTConfig"
        _check_bool(o, "bitfit", self.bitfit)
        for name, cls in _SUB.items():
            v = getattr(self, name)
            if v is not None and not isinstance(v, cls):
                raise TypeError(f"{o}.{name} must be None or {cls.__name__}, got {v!r}")
            if v is not None:
                v.validate()
        _check_choice(o, "gate_mode", self.gate_mode, GATE_MODES)
        self.tasks = _check_names(o, "tasks", self.tasks)
        if not self.tasks:
            raise ValueError(f"{o}.tasks must name at least one task")
        if self.modules_to_save is not None:
            self.modules_to_save = _check_names(o, "modules_to_save", self.modules_to_save)
        if not isinstance(self.extra, dict):
            raise TypeError(f"{o}.extra must be a dict, got {type(self.extra).__name__}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("tasks", "modules_to_save"):
            d[k] = None if d[k] is None else list(d[k])
        if d["lora"] is not None:
            for k in ("targets", "layers_pattern", "target_modules"):
                if isinstance(d["lora"][k], tuple):
                    d["lora"][k] = list(d["lora"][k])
        for name in ("adapter", "prefix", "lora"):
            if d[name] is not None and d[name].get("layers") is not None:
                d[name]["layers"] = list(d[name]["layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UniPELTConfig:
        d = dict(d)
        for name in _SUB:
            if d.get(name) is None:
                d[name] = None
        if isinstance(d.get("adapter"), dict) and "placement" not in d["adapter"]:
            # written before placements existed: the adapter wrapped the FFN output
            d["adapter"] = {**d["adapter"], "placement": "ffn_output"}
        return cls(**d)
