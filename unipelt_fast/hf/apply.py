"""apply_unipelt: freeze the base model and inject the configured methods, atomically."""

from __future__ import annotations

import types

import torch
import torch.nn as nn

from .._backend import BACKENDS
from ..bitfit import bitfit
from ..config import UniPELTConfig
from ..distributed import is_sharded
from ..lora import GatedLoRA
from ..modules import GatedAdapter
from ..prompt import SoftPrompt
from . import encdec
from .attention import ATTN_NAME, _legacy_bert_forward, _register, _uses_attention_interface
from .families import (
    _DEFAULT_HEADS,
    _attention_modules,
    _attn_output_target,
    _bert_attn_outputs,
    _dims,
    _family,
    _ffn_norm,
    _ffn_targets,
    _linear_dims,
    _lora_targets,
)
from .hooks import _attn_pre_hook, _encoder_pre_hook, _model_pre_hook
from .placements import (
    PostLNNormWrapper,
    PostLNOutputWrapper,
    PreLNMLPWrapper,
    SublayerOutputAdapters,
    _residual_pre_hook,
)
from .root import UniPELTRoot
from .wrappers import AdapterWrapper

_MISSING = object()


class _Snapshot:
    """Everything apply_unipelt changes, so a failure can put the model back as it was."""

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

    def restore(self) -> None:
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
        for m in self.model.modules():
            m.__dict__.pop("_unipelt_gate", None)
        if "unipelt" in self.model._modules:
            del self.model._modules["unipelt"]
        for p, rg in self.grad:
            p.requires_grad_(rg)
        if self.attn is not None:
            self.model.config._attn_implementation = self.attn
        for c, old in self.sub_configs:
            c._attn_implementation = old


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def _tag(module: nn.Module, snap: _Snapshot, **attrs) -> None:
    for k, val in attrs.items():
        snap.tagged.append((module, k, module.__dict__.get(k, _MISSING)))
        module.__dict__[k] = val  # plain attributes: not registered as submodules


def apply_unipelt(
    model: nn.Module, cfg: UniPELTConfig | None = None, *, backend: str = "auto"
) -> nn.Module:
    """Freeze ``model`` and inject the methods of ``cfg``, in place; returns the model.

    Supports BERT/RoBERTa, GPT-2, LLaMA-family (LLaMA, Mistral, Qwen2) and the
    encoder-decoders BART, mBART, Marian, Pegasus, T5 and mT5, any head. On error the model
    is left as it was.
    """
    cfg = UniPELTConfig() if cfg is None else cfg
    if not isinstance(cfg, UniPELTConfig):
        raise TypeError("apply_unipelt: cfg must be a UniPELTConfig")
    cfg.validate()  # again: a field may have been changed since construction
    if backend not in BACKENDS:
        raise ValueError(f"apply_unipelt: backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(getattr(model, "unipelt", None), UniPELTRoot):
        raise ValueError("apply_unipelt: this model already has UniPELT methods")
    if is_sharded(model):
        raise ValueError(
            "apply_unipelt: this model is already sharded (fully_shard / DTensor parameters); "
            "apply UniPELT first, then shard"
        )
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError("apply_unipelt: expects a transformers PreTrainedModel")
    _check_modules_to_save(model, cfg.modules_to_save)
    snap = _Snapshot(model)
    try:
        _apply(model, cfg, backend, snap)
    except BaseException:
        snap.restore()
        raise
    return model


def _check_modules_to_save(model: nn.Module, names: tuple[str, ...] | None) -> None:
    """Every name in modules_to_save must be a submodule name (a typo would leave that head
    frozen silently)."""
    if names is None:
        return
    present = {n for m in model.modules() for n, _ in m.named_children()}
    missing = [n for n in names if n not in present]
    if missing:
        valid = sorted(n for n in present if not n.isdigit())
        raise ValueError(
            f"apply_unipelt: modules_to_save names {missing} match no submodule of this "
            f"{type(model).__name__}; its submodule names are {valid}"
        )


def _apply(model: nn.Module, cfg: UniPELTConfig, backend: str, snap: _Snapshot) -> None:
    dims = _dims(model.config)
    if encdec.is_encdec(dims["model_type"]):
        family = encdec.lora_family(dims["model_type"])
        sites = encdec.attention_sites(model)
        attns = [m for m, _, _ in sites]
        stacks = [s for _, s, _ in sites]
        attn_types = [t for _, _, t in sites]
        ffn_sites = encdec.ffn_targets(model)
        ffns = [(p, a) for p, a, _ in ffn_sites]
        ffn_stacks = [s for _, _, s in ffn_sites]
    else:
        family = _family(dims["model_type"])
        attns = _attention_modules(model, family)
        ffns = _ffn_targets(model, family)
        stacks = ffn_stacks = attn_types = None
    n_ffn = dims.get("n_ffn", dims["n_layers"])
    if len(attns) != dims["n_layers"] or (cfg.adapter is not None and len(ffns) != n_ffn):
        raise NotImplementedError(
            f"apply_unipelt: found {len(attns)} attention and {len(ffns)} FFN blocks for "
            f"{dims['n_layers']} layers in this {dims['model_type']} model; supported: BERT, "
            "RoBERTa, GPT-2, LLaMA-family and BART-family models"
        )
    dtype, device = _model_dtype_device(model)
    T = len(cfg.tasks)
    for name in ("adapter", "prefix", "lora"):
        sub = getattr(cfg, name)
        if sub is not None and sub.layers is not None and stacks is not None:
            raise NotImplementedError(
                f"apply_unipelt: {type(sub).__name__}.layers is not supported on "
                "encoder-decoder models (their layers are not one sequence); leave it None"
            )
        if sub is not None and sub.layers is not None and sub.layers[-1] >= dims["n_layers"]:
            raise ValueError(
                f"apply_unipelt: {type(sub).__name__}.layers {list(sub.layers)} is out of range "
                f"for a model with {dims['n_layers']} layers"
            )

    if stacks is not None and cfg.prefix is not None and cfg.prefix.positions != "tokens_only":
        raise NotImplementedError(
            "apply_unipelt: PrefixConfig.positions='after_prefix' is not supported on "
            "encoder-decoder models; use 'tokens_only'"
        )

    def chosen(sub) -> set[int]:
        return set(range(dims["n_layers"]) if sub.layers is None else sub.layers)

    # 1. freeze; BitFit; task heads trained in full (kept as ordinary modules)
    heads = cfg.modules_to_save if cfg.modules_to_save is not None else _DEFAULT_HEADS
    head_mods = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if name in heads
    ]
    head_tree = [  # bitfit swaps modules inside the heads too (RoBERTa's head has two)
        (parent, name, child)
        for _, _, head in head_mods
        for parent in head.modules()
        for name, child in parent.named_children()
    ]
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.bitfit:
        bitfit(model, backend=backend)
    for parent, name, child in [*head_mods, *head_tree]:
        setattr(parent, name, child)
    for _, _, head in head_mods:
        for p in head.parameters():
            p.requires_grad_(True)

    root = UniPELTRoot(cfg, dims, backend)
    new_modules: list[nn.Module] = [root]

    # 2. LoRA on the query/value projections
    if cfg.lora is not None:
        lora_layers = chosen(cfg.lora)
        for i, attn in enumerate(attns):
            if i not in lora_layers or (
                attn_types is not None and attn_types[i] not in cfg.lora.attention_types
            ):
                continue
            for parent, attr, slices in _lora_targets(attn, family, cfg.lora.targets, dims):
                base = getattr(parent, attr)
                d_in, d_out = _linear_dims(base)
                w = GatedLoRA(
                    base,
                    d_in,
                    d_out,
                    r=cfg.lora.r,
                    alpha=cfg.lora.alpha,
                    n_tasks=T,
                    gate=cfg.lora.gate,
                    gate_mode=cfg.gate_mode,
                    out_slices=slices,
                    gate_replaces_scaling=cfg.lora.gate_replaces_scaling,
                    backend=backend,
                )
                _tag(w, snap, _unipelt_root=root)
                setattr(parent, attr, w)
                new_modules.append(w.units)

    # 3. adapters at their placement (config.PLACEMENTS; hf/placements.py)
    if cfg.adapter is not None:
        ac = cfg.adapter
        r = ac.bottleneck or max(1, dims["hidden"] // 16)
        adapter_layers = chosen(ac)

        def make() -> nn.ModuleList:
            return nn.ModuleList(
                GatedAdapter(
                    dims["hidden"],
                    r,
                    activation=ac.activation,
                    gate=ac.gate,
                    gate_mode=cfg.gate_mode,
                    scaling=ac.scaling,
                    backend=backend,
                )
                for _ in range(T)
            )

        def wrap(parent: nn.Module, attr: str, cls, *extra, stack: str | None = None):
            adapters = make()
            w = cls(getattr(parent, attr), adapters, *extra)
            _tag(w, snap, _unipelt_root=root, _unipelt_stack=stack)  # stack: the gate's mask
            setattr(parent, attr, w)
            new_modules.append(adapters)
            return w

        def hooked(module: nn.Module, x_from: nn.Module | None, stack: str) -> None:
            """Adapters on ``module``'s output by a forward hook (encoder-decoder layers)."""
            adapters = make()
            h = SublayerOutputAdapters(adapters, ac.placement, x_is_input=x_from is None)
            _tag(h, snap, _unipelt_root=root, _unipelt_stack=stack)
            snap.added.append((module, "unipelt_adapters"))
            module.add_module("unipelt_adapters", h)
            snap.handles.append(module.register_forward_hook(h.hook, with_kwargs=True))
            if x_from is not None and ac.placement == "ffn_parallel":
                snap.handles.append(
                    x_from.register_forward_pre_hook(_residual_pre_hook(h), with_kwargs=True)
                )
            new_modules.append(adapters)

        seq = ac.placement in ("ffn_output", "attn_and_ffn_output")
        blocks = ffns
        if not seq and family == "bert":  # the *Output module: dense -> LayerNorm(h + x)
            blocks = [(_parent_of(model, p), _name_in_parent(model, p)) for p, _ in ffns]
        if ffn_stacks is not None and ac.placement == "attn_and_ffn_output":
            raise NotImplementedError(
                "apply_unipelt: adapter placement 'attn_and_ffn_output' is not supported on "
                "encoder-decoder models; use 'block_output', 'ffn_output' or 'ffn_parallel'"
            )
        for i, (parent, attr) in enumerate(blocks):
            if i not in adapter_layers:
                continue
            stack = None if ffn_stacks is None else ffn_stacks[i]
            if seq:
                wrap(parent, attr, AdapterWrapper, stack=stack)
            elif stack is not None and encdec.ffn_is_post_ln(dims["model_type"]):
                w = wrap(parent, "final_layer_norm", PostLNNormWrapper, ac.placement, stack=stack)
                if ac.placement == "ffn_parallel":
                    snap.handles.append(
                        parent.fc1.register_forward_pre_hook(
                            _residual_pre_hook(w), with_kwargs=True
                        )
                    )
            elif stack is not None:  # T5LayerFF (x is its input) or a pre-LN BART layer
                t5 = attr == "DenseReluDense"
                hooked(parent, None if t5 else parent.final_layer_norm, stack)
            elif family == "bert":
                wrap(parent, attr, PostLNOutputWrapper, ac.placement)
            else:
                norm = _ffn_norm(parent)
                if norm is None:
                    raise NotImplementedError(
                        f"apply_unipelt: adapter placement {ac.placement!r} needs the pre-FFN "
                        f"norm of {type(parent).__name__}"
                    )
                w = wrap(parent, attr, PreLNMLPWrapper, ac.placement)
                snap.handles.append(
                    norm.register_forward_pre_hook(_residual_pre_hook(w), with_kwargs=True)
                )
        if ac.placement == "attn_and_ffn_output":
            outs = (
                _bert_attn_outputs(model)
                if family == "bert"
                else [_attn_output_target(a, family) for a in attns]
            )
            if len(outs) != len(attns):
                raise NotImplementedError(
                    f"apply_unipelt: found {len(outs)} attention outputs for {len(attns)} layers"
                )
            for i, (parent, attr) in enumerate(outs):
                if i in adapter_layers:
                    wrap(parent, attr, AdapterWrapper)

    # 4. soft prompt
    if cfg.prompt is not None:
        emb = model.get_input_embeddings().weight
        gen = torch.Generator().manual_seed(0)
        rows = torch.randint(0, emb.shape[0], (T * cfg.prompt.length,), generator=gen)
        init = None if emb.device.type == "meta" else emb.detach()[rows.to(emb.device)].float()
        root.prompt = SoftPrompt(
            T,
            cfg.prompt.length,
            dims["hidden"],
            gate=cfg.prompt.gate,
            gate_mode=cfg.gate_mode,
            init=None if init is None else init.cpu(),
        )

    # 5. prefix: attention function + per-layer tags + gate pre-hooks
    if cfg.prefix is not None:
        _register()
        legacy = not _uses_attention_interface(attns[0])
        if legacy and family != "bert":
            raise NotImplementedError(
                f"apply_unipelt: {type(attns[0]).__name__} does not use transformers' attention "
                "registry; upgrade transformers"
            )
        prefix_layers = sorted(chosen(cfg.prefix))
        for slot, i in enumerate(prefix_layers):  # slot: the layer's rows in the encoder
            attn = attns[i]
            _tag(attn, snap, _unipelt_root=root, _unipelt_layer=slot)
            if stacks is not None:  # the gate's mask (query side) and the keys' mask
                keys_of = "enc" if attn_types[i] == "cross" else stacks[i]
                _tag(attn, snap, _unipelt_stack=stacks[i], _unipelt_keys=keys_of)
            if legacy:
                _tag(attn, snap, forward=types.MethodType(_legacy_bert_forward, attn))
            if root.prefix_gates is not None:
                snap.handles.append(
                    attn.register_forward_pre_hook(_attn_pre_hook, with_kwargs=True)
                )
        if not legacy:
            model.config._attn_implementation = ATTN_NAME
            for c in {id(a.config): a.config for a in attns if hasattr(a, "config")}.values():
                if c is not model.config:  # T5's stacks hold their own copies of the config
                    snap.sub_configs.append((c, c._attn_implementation))
                    c._attn_implementation = ATTN_NAME

    for m in new_modules:
        m.to(device=device, dtype=dtype)
        for p in m.parameters():
            p.requires_grad_(True)
    model.unipelt = root
    snap.handles.append(model.register_forward_pre_hook(_model_pre_hook, with_kwargs=True))
    if stacks is not None:  # encoder-decoder: generate() calls the encoder directly
        enc = model.get_encoder()
        _tag(enc, snap, _unipelt_root=root)
        snap.handles.append(enc.register_forward_pre_hook(_encoder_pre_hook, with_kwargs=True))
    root._handles = snap.handles
    _install_save_pretrained(model, snap)
    # Reentrant gradient checkpointing only backpropagates into a checkpointed block when its
    # input requires grad; with a frozen embedding it would not (and the PELT gradients would
    # silently be lost), so make the embedding output require grad (what peft does too).
    if hasattr(model, "enable_input_require_grads") and device.type != "meta":
        model.enable_input_require_grads()
        snap.handles.append(getattr(model, "_require_grads_hook", None) or _NoHandle())


def _install_save_pretrained(model: nn.Module, snap: _Snapshot) -> None:
    """``model.save_pretrained`` (and so every Trainer checkpoint) writes the tuned tensors
    only (checkpoint.save_pretrained); the frozen keys become ``_keys_to_ignore_on_save``, the
    keys Trainer's resume expects to be absent from the checkpoint (no missing-key warning)."""
    if not hasattr(model, "save_pretrained"):
        return
    tuned = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {k for k in model.state_dict(keep_vars=True) if k not in tuned}
    # a bound method, so copy.deepcopy(model) gets one bound to the copy
    save = types.MethodType(_save_pretrained, model)
    _tag(model, snap, save_pretrained=save, _keys_to_ignore_on_save=frozen)


def _save_pretrained(model: nn.Module, save_directory, *args, **kwargs) -> None:
    from ..checkpoint import save_pretrained

    save_pretrained(model, save_directory, *args, **kwargs)


def _parent_of(model: nn.Module, child: nn.Module) -> nn.Module:
    for m in model.modules():
        if any(c is child for c in m.children()):
            return m
    raise AssertionError("module not found in model")


def _name_in_parent(model: nn.Module, child: nn.Module) -> str:
    for name, c in _parent_of(model, child).named_children():
        if c is child:
            return name
    raise AssertionError("module not found in model")


class _NoHandle:
    def remove(self) -> None:
        pass
