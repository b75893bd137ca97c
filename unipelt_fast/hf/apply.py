"""apply_unipelt: freeze the base model and inject the configured methods, atomically.

The model's layout (families.py / encdec.py) says where its attention, FFN and projections
are; one injector per method (inject.py) works from it; a :class:`Snapshot` undoes a failed
apply."""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .._backend import BACKENDS
from ..config import UniPELTConfig
from ..distributed import is_sharded
from .families import model_layout
from .hooks import encoder_pre_hook, model_pre_hook
from .inject import (
    Injection,
    inject_adapters,
    inject_bitfit,
    inject_lora,
    inject_prefix,
    inject_prompt,
    lora_slots,
)
from .layout import ModelLayout
from .root import UniPELTRoot
from .snapshot import Snapshot


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def apply_unipelt(
    model: nn.Module, cfg: UniPELTConfig | None = None, *, backend: str = "auto"
) -> nn.Module:
    """Freeze ``model`` and inject the methods of ``cfg``, in place; returns the model.

    Supports the families of ``families.FAMILIES`` (BERT-like, DeBERTa-v2, DistilBERT,
    ModernBERT, GPT-2, LLaMA-like, Phi-3, OPT, GPT-J, GPT-NeoX, Falcon; docs/hf.md) and the
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
    if is_sharded(model):
        raise ValueError(
            "apply_unipelt: this model is already sharded (fully_shard / DTensor parameters); "
            "apply UniPELT first, then shard"
        )
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    if len(devices) > 1:  # the new modules would all sit on the first parameter's device
        raise NotImplementedError(
            f"apply_unipelt: the model is split over devices {sorted(map(str, devices))} "
            "(device_map); UniPELT supports a model on one device: load it on one, or shard "
            "it with FSDP2 after apply_unipelt (docs/distributed.md)"
        )
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError("apply_unipelt: expects a transformers PreTrainedModel")
    _check_modules_to_save(model, cfg.modules_to_save)
    snap = Snapshot(model)
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


def _check_fits(layout: ModelLayout, cfg: UniPELTConfig) -> None:
    """Refuse, before any change, what this model's layout cannot hold."""
    dims = layout.dims
    n_ffn = dims.get("n_ffn", dims["n_layers"])
    n_attn, n_found_ffn = len(layout.attention), len(layout.ffn)
    if n_attn != dims["n_layers"] or (cfg.adapter is not None and n_found_ffn != n_ffn):
        raise NotImplementedError(
            f"apply_unipelt: found {n_attn} attention and {n_found_ffn} FFN blocks for "
            f"{dims['n_layers']} layers in this {dims['model_type']} model; supported: the "
            "families in docs/hf.md (BERT-like, DistilBERT, DeBERTa-v2, ModernBERT, GPT-2, "
            "LLaMA-like, Phi-3, OPT, GPT-J, GPT-NeoX, Falcon) and BART/T5-family models"
        )
    for name in ("adapter", "prefix", "lora"):
        sub = getattr(cfg, name)
        if name == "lora" and sub is not None and sub.target_modules is not None:
            continue  # layers of named targets: peft's index in the module name (targets.py)
        if sub is not None and sub.layers is not None and layout.encdec:
            raise NotImplementedError(
                f"apply_unipelt: {type(sub).__name__}.layers is not supported on "
                "encoder-decoder models (their layers are not one sequence); leave it None"
            )
        if sub is not None and sub.layers is not None and sub.layers[-1] >= dims["n_layers"]:
            raise ValueError(
                f"apply_unipelt: {type(sub).__name__}.layers {list(sub.layers)} is out of range "
                f"for a model with {dims['n_layers']} layers"
            )
    if layout.encdec and cfg.prefix is not None and cfg.prefix.positions != "tokens_only":
        raise NotImplementedError(
            "apply_unipelt: PrefixConfig.positions='after_prefix' is not supported on "
            "encoder-decoder models; use 'tokens_only'"
        )


def _apply(model: nn.Module, cfg: UniPELTConfig, backend: str, snap: Snapshot) -> None:
    layout = model_layout(model)
    _check_fits(layout, cfg)
    dtype, device = _model_dtype_device(model)
    root = UniPELTRoot(cfg, layout.dims, backend)
    ctx = Injection(model, layout, cfg, root, snap, backend, new_modules=[root])
    if cfg.lora is not None and cfg.lora.target_modules is not None:
        ctx.lora_slots = lora_slots(model, cfg)  # by name, before BitFit swaps modules
    inject_bitfit(ctx)  # freezes the model first; the heads stay trainable
    if cfg.lora is not None:
        inject_lora(ctx)
    if cfg.adapter is not None:
        inject_adapters(ctx)
    if cfg.prompt is not None:
        inject_prompt(ctx)
    if cfg.prefix is not None:
        inject_prefix(ctx)

    for m in ctx.new_modules:
        m.to(device=device, dtype=dtype)
        for p in m.parameters():
            p.requires_grad_(True)
    model.unipelt = root
    snap.handles.append(model.register_forward_pre_hook(model_pre_hook, with_kwargs=True))
    if layout.encoder is not None:  # encoder-decoder: generate() calls the encoder directly
        hook = functools.partial(encoder_pre_hook, root)
        snap.handles.append(layout.encoder.register_forward_pre_hook(hook, with_kwargs=True))
    root._handles = snap.handles
    _install_save_pretrained(model, snap)
    # Reentrant gradient checkpointing only backpropagates into a checkpointed block when its
    # input requires grad; with a frozen embedding it would not (and the PELT gradients would
    # silently be lost), so make the embedding output require grad (what peft does too).
    if hasattr(model, "enable_input_require_grads") and device.type != "meta":
        model.enable_input_require_grads()
        handles = getattr(model, "_require_grads_hooks", None) or [
            getattr(model, "_require_grads_hook", None) or _NoHandle()
        ]
        for h in handles:  # transformers' hook is a local function, which pickle refuses
            hooks = h.hooks_dict_ref() if hasattr(h, "hooks_dict_ref") else None
            if hooks is not None and h.id in hooks:
                hooks[h.id] = _inputs_require_grad
        snap.handles.extend(handles)


def _inputs_require_grad(module: nn.Module, args, output: torch.Tensor) -> None:
    output.requires_grad_(True)  # what transformers' enable_input_require_grads hook does


def _install_save_pretrained(model: nn.Module, snap: Snapshot) -> None:
    """``model.save_pretrained`` (and so every Trainer checkpoint) writes the tuned tensors
    only (checkpoint.save_pretrained); the frozen keys become ``_keys_to_ignore_on_save``, the
    keys Trainer's resume expects to be absent from the checkpoint (no missing-key warning)."""
    if not hasattr(model, "save_pretrained"):
        return
    tuned = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {k for k in model.state_dict(keep_vars=True) if k not in tuned}
    # a partial over a module-level function: deepcopy binds it to the copy, pickle keeps it
    save = functools.partial(_save_pretrained, model)
    snap.tag(model, save_pretrained=save, _keys_to_ignore_on_save=frozen)


def _save_pretrained(model: nn.Module, save_directory, *args, **kwargs) -> None:
    from ..checkpoint import save_pretrained

    save_pretrained(model, save_directory, *args, **kwargs)


class _NoHandle:
    def remove(self) -> None:
        pass
