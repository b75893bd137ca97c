"""One injector per method: BitFit (with the trained heads), LoRA, adapters, soft prompt,
prefix. Each reads the model's :class:`~unipelt_fast.hf.layout.ModelLayout` and records
every change in the :class:`~unipelt_fast.hf.apply.Snapshot`, so apply_unipelt can undo a
failed apply. Hooks are module-level functions bound to a :class:`~unipelt_fast.hf.root.Site`
by ``functools.partial`` (see hooks.py): a deep copy or a pickle of the model carries them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..bitfit import _fuse_intermediate_activations, bitfit
from ..config import UniPELTConfig
from ..lora import GatedLoRA
from ..modules import GatedAdapter
from ..prompt import SoftPrompt
from .attention import ATTN_NAME, _legacy_bert_forward, _register, _uses_attention_interface
from .families import DEFAULT_HEADS, check_residual_placement
from .hooks import prefix_gate_pre_hook, residual_pre_hook
from .layout import FFNBlock, ModelLayout
from .placements import (
    PostLNNormWrapper,
    PostLNOutputWrapper,
    PreLNMLPWrapper,
    SublayerOutputAdapters,
    TokenRows,
)
from .root import SITE_ATTR, Site, UniPELTRoot
from .snapshot import Snapshot
from .targets import layer_index
from .targets import resolve as resolve_targets
from .wrappers import AdapterWrapper


@dataclass(eq=False)
class Injection:
    """What every injector works from, and the modules they add (moved to the model's
    dtype/device and made trainable at the end)."""

    model: nn.Module
    layout: ModelLayout
    cfg: UniPELTConfig
    root: UniPELTRoot
    snap: Snapshot
    backend: str
    new_modules: list[nn.Module] = field(default_factory=list)
    # LoRA targets by name (LoRAConfig.target_modules): (full name, parent, attribute),
    # resolved on the plain model before BitFit swaps modules (see lora_slots)
    lora_slots: list[tuple[str, nn.Module, str]] | None = None

    @property
    def n_tasks(self) -> int:
        return len(self.cfg.tasks)

    def chosen(self, sub) -> set[int]:
        """The layers a method's config selects (``layers``; None: all)."""
        n = self.layout.dims["n_layers"]
        return set(range(n) if sub.layers is None else sub.layers)

    def hook_before(self, module: nn.Module | tuple[nn.Module, str], hook, site: Site) -> None:
        """``hook(site, module, args, kwargs)`` as a forward pre-hook of ``module`` (or of the
        module in a layout slot)."""
        if isinstance(module, tuple):
            module = getattr(*module)
        h = module.register_forward_pre_hook(functools.partial(hook, site), with_kwargs=True)
        self.snap.handles.append(h)


def trained_heads(cfg: UniPELTConfig) -> tuple[str, ...]:
    """The names of the heads trained in full (``modules_to_save``, or the usual heads)."""
    return cfg.modules_to_save if cfg.modules_to_save is not None else DEFAULT_HEADS


def lora_slots(model: nn.Module, cfg: UniPELTConfig) -> list[tuple[str, nn.Module, str]]:
    """(full name, parent, attribute) of each module ``LoRAConfig.target_modules`` names
    (targets.py). Slots, not modules: BitFit replaces the leaf modules, not their parents."""
    mods = dict(model.named_modules())
    out = []
    for name, _ in resolve_targets(model, cfg.lora, trained_heads(cfg)):
        parent, _, attr = name.rpartition(".")
        out.append((name, mods[parent], attr))
    return out


def _linear_dims(mod: nn.Module) -> tuple[int, int]:
    if hasattr(mod, "in_features"):
        return mod.in_features, mod.out_features
    w = mod.weight  # HF Conv1D: (d_in, d_out)
    return w.shape[0], w.shape[1]


def inject_bitfit(ctx: Injection) -> None:
    """Freeze the model; BitFit's bias-only ops; task heads trained in full (kept as
    ordinary modules)."""
    model, cfg = ctx.model, ctx.cfg
    heads = trained_heads(cfg)
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
        # an intermediate dense that gets LoRA keeps its activation outside (LoRA adds to
        # the dense's output, before the activation)
        bitfit(model, backend=ctx.backend, fuse_activations=False)
        keep = {id(parent) for _, parent, _ in ctx.lora_slots or ()}
        _fuse_intermediate_activations(model, skip=keep)
    for parent, name, child in [*head_mods, *head_tree]:
        setattr(parent, name, child)
    for _, _, head in head_mods:
        for p in head.parameters():
            p.requires_grad_(True)


def inject_lora(ctx: Injection) -> None:
    """Gated LoRA on the chosen projections (``LoRAConfig.targets``) of the chosen layers'
    attention; roles that share a fused projection share one wrapper (its column ranges), or
    with ``split_fused`` get one wrapper each, nested."""
    lc = ctx.cfg.lora
    if lc.target_modules is not None:
        _inject_lora_by_name(ctx)
        return
    layers = ctx.chosen(lc)
    for i, blk in enumerate(ctx.layout.attention):
        if i not in layers or (ctx.layout.encdec and blk.kind not in lc.attention_types):
            continue
        # (parent, attribute) -> each role's column ranges (None: the whole projection), and
        # the stack whose mask its masked_mean gate reads: the query's input is this
        # stack's, a cross-attention's key/value input is the encoder's
        targets: dict[tuple[int, str], tuple[nn.Module, str, list | None, str | None]] = {}
        for role in lc.targets:
            parent, attr, cols = blk.projections[role]
            key = (id(parent), attr)
            if key not in targets:
                stack = "enc" if blk.kind == "cross" and role != "query" else blk.stack
                targets[key] = (parent, attr, None if cols is None else [], stack)
            if cols is not None:
                targets[key][2].append(cols)  # this role's ranges (one per head if interleaved)
        for parent, attr, roles, stack in targets.values():
            # one wrapper over all the roles' ranges; split_fused: one per role, each around
            # the previous one (the roles' columns are disjoint: one update per column)
            if roles is None:
                groups = [None]
            elif lc.split_fused:
                groups = [sorted(r) for r in sorted(roles)]
            else:
                groups = [sorted(c for r in roles for c in r)]
            for out_slices in groups:
                _wrap_lora(ctx, parent, attr, out_slices, i, stack)


def _wrap_lora(ctx: Injection, parent, attr, cols, index: int, stack: str | None) -> None:
    lc = ctx.cfg.lora
    base = getattr(parent, attr)
    d_in, d_out = _linear_dims(base)
    w = GatedLoRA(
        base,
        d_in,
        d_out,
        r=lc.r,
        alpha=lc.alpha,
        n_tasks=ctx.n_tasks,
        gate=lc.gate,
        gate_mode=ctx.cfg.gate_mode,
        out_slices=cols,
        gate_replaces_scaling=lc.gate_replaces_scaling,
        backend=ctx.backend,
    )
    w.site = ctx.root.site(index, stack)
    setattr(parent, attr, w)
    ctx.new_modules.append(w.units)


def _inject_lora_by_name(ctx: Injection) -> None:
    """LoRA over the whole output of each module ``target_modules`` names (resolved before
    BitFit: ``ctx.lora_slots``). In an encoder-decoder each reads its stack's mask for a
    masked_mean gate; a cross-attention's key/value projection reads the encoder's."""
    stacks: dict[int, str] = {}
    if ctx.layout.encdec:
        model = ctx.model
        for stack, part in (("enc", model.get_encoder()), ("dec", model.get_decoder())):
            stacks.update({id(m): stack for m in part.modules()})
        for blk in ctx.layout.attention:
            if blk.kind == "cross":
                for role in ("key", "value"):
                    parent, attr, _ = blk.projections[role]
                    stacks[id(getattr(parent, attr))] = "enc"
    for name, parent, attr in ctx.lora_slots:
        stack = stacks.get(id(getattr(parent, attr)))  # None: the model's one mask
        _wrap_lora(ctx, parent, attr, None, layer_index(name) or 0, stack)


def inject_adapters(ctx: Injection) -> None:
    """Adapters at ``AdapterConfig.placement`` (config.PLACEMENTS; placements.py): on the
    FFN output ("ffn_output", "attn_and_ffn_output" also on the attention output), or where
    the FFN block's residual is visible ("block_output", "ffn_parallel")."""
    ac, layout = ctx.cfg.adapter, ctx.layout
    if layout.encdec and ac.placement == "attn_and_ffn_output":
        raise NotImplementedError(
            "apply_unipelt: adapter placement 'attn_and_ffn_output' is not supported on "
            "encoder-decoder models; use 'block_output', 'ffn_output' or 'ffn_parallel'"
        )
    layers = ctx.chosen(ac)
    on_output = ac.placement in ("ffn_output", "attn_and_ffn_output")
    for i, blk in enumerate(layout.ffn):
        if i not in layers:
            continue
        if on_output:
            w = _wrap(ctx, blk.output, AdapterWrapper, stack=blk.stack)
        else:
            w = _residual_placement(ctx, blk)
        if blk.flat_rows and on_output:  # OPT: fc2 sees (B*L, d) rows
            _token_rows(ctx, blk, w)
    if ac.placement == "attn_and_ffn_output":
        for i, blk in enumerate(layout.attention):
            if blk.output is None:
                raise NotImplementedError(
                    "apply_unipelt: adapter placement 'attn_and_ffn_output' found no attention "
                    f"output projection for layer {i} of this {layout.dims['model_type']} model"
                )
            if i in layers:
                _wrap(ctx, blk.output, AdapterWrapper)


def _adapters(ctx: Injection) -> nn.ModuleList:
    """One layer's per-task adapters (added to the modules made trainable)."""
    ac, dims = ctx.cfg.adapter, ctx.layout.dims
    adapters = nn.ModuleList(
        GatedAdapter(
            dims["hidden"],
            ac.bottleneck or max(1, dims["hidden"] // 16),
            activation=ac.activation,
            gate=ac.gate,
            gate_mode=ctx.cfg.gate_mode,
            scaling=ac.scaling,
            backend=ctx.backend,
        )
        for _ in range(ctx.n_tasks)
    )
    ctx.new_modules.append(adapters)
    return adapters


def _wrap(ctx: Injection, slot, cls, *extra, stack: str | None = None) -> nn.Module:
    parent, attr = slot
    adapters = _adapters(ctx)
    site = ctx.root.site(len(ctx.root.sites), stack)  # stack: the mask its gates read
    w = cls(getattr(parent, attr), adapters, *extra, site=site)
    setattr(parent, attr, w)
    return w


def _token_rows(ctx: Injection, blk: FFNBlock, w: nn.Module) -> None:
    """Where the FFN sees its tokens as (B*L, d) rows (``blk.flat_rows``, OPT), wrap the
    FFN output's adapter wrapper ``w`` so that it runs on (B, L, d). (The residual
    placements see (B, L, d): the layer's output, or its post-FFN norm's input.)"""
    parent, attr = blk.output
    setattr(parent, attr, TokenRows(w))


def _residual_placement(ctx: Injection, blk: FFNBlock) -> nn.Module | None:
    """The "block_output" / "ffn_parallel" adapters of one FFN block, by its style; returns
    the wrapper that replaced a module (None: a hook on the module)."""
    placement = ctx.cfg.adapter.placement
    parallel = placement == "ffn_parallel"
    if blk.style == "post_ln_output":
        return _wrap(ctx, blk.block, PostLNOutputWrapper, placement, stack=blk.stack)
    if blk.style == "pre_ln_mlp":
        check_residual_placement(blk.block[0])  # the decoder layer that holds the MLP
        if blk.x_from is None:
            raise NotImplementedError(
                f"apply_unipelt: adapter placement {placement!r} needs the pre-FFN norm of "
                f"{type(blk.block[0]).__name__}"
            )
        w = _wrap(ctx, blk.block, PreLNMLPWrapper, placement, stack=blk.stack)
        ctx.hook_before(blk.x_from, residual_pre_hook, w.site)
        return w
    if blk.style == "post_ln_norm":
        w = _wrap(ctx, blk.block, PostLNNormWrapper, placement, stack=blk.stack)
        if parallel:
            ctx.hook_before(blk.x_from, residual_pre_hook, w.site)
        return w
    if blk.style == "sublayer":  # adapters run by a forward hook; the module stays
        module = getattr(*blk.block)
        site = ctx.root.site(len(ctx.root.sites), blk.stack)
        h = SublayerOutputAdapters(_adapters(ctx), placement, blk.x_from is None, site=site)
        ctx.snap.added.append((module, "unipelt_adapters"))
        module.add_module("unipelt_adapters", h)
        ctx.snap.handles.append(module.register_forward_hook(h.hook, with_kwargs=True))
        if blk.x_from is not None and parallel:
            ctx.hook_before(blk.x_from, residual_pre_hook, site)
        return None
    raise AssertionError(f"unknown FFN style {blk.style!r}")


def inject_prompt(ctx: Injection) -> None:
    """The soft prompt, initialised from the embeddings of random vocabulary rows."""
    T, length = ctx.n_tasks, ctx.cfg.prompt.length
    emb = ctx.model.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, emb.shape[0], (T * length,), generator=gen)
    init = None if emb.device.type == "meta" else emb.detach()[rows.to(emb.device)].float()
    ctx.root.prompt = SoftPrompt(
        T,
        length,
        ctx.layout.dims["hidden"],
        gate=ctx.cfg.prompt.gate,
        gate_mode=ctx.cfg.gate_mode,
        init=None if init is None else init.cpu(),
    )


# Families whose attention the prefix cannot enter, and why (the support table's cells).
PREFIX_REFUSED = {
    "deberta_v2": "DeBERTa-v2's disentangled attention computes its scores itself (content "
    "plus content-to-position and position-to-content terms from its relative position "
    "embeddings) instead of calling transformers' attention function, and a prefix key has no "
    "relative position for those terms",
}


def _check_prefix_family(ctx: Injection) -> None:
    """Refuse the prefix, up front, where it cannot be exact."""
    layout, config = ctx.layout, ctx.model.config
    why = PREFIX_REFUSED.get(layout.family)
    if why is None and layout.family == "falcon" and getattr(config, "alibi", False):
        why = (
            "Falcon with alibi=True adds its ALiBi position bias through the attention mask, "
            "which the prefix path does not take as a bias"
        )
    if why is not None:
        raise NotImplementedError(
            f"apply_unipelt: the prefix on {layout.dims['model_type']}: {why}; train without "
            "the prefix (UniPELTConfig(prefix=None)): LoRA, adapters, BitFit and the prompt "
            "are supported"
        )


def inject_prefix(ctx: Injection) -> None:
    """The prefix: each chosen attention module gets a Site (its rows of the prefix encoder,
    its gate, its masks) and, with gates, a pre-hook computing G_P; the model's attention
    implementation becomes the "unipelt" function (attention.py)."""
    layout, root, snap = ctx.layout, ctx.root, ctx.snap
    attns = [blk.module for blk in layout.attention]
    _check_prefix_family(ctx)
    _register()
    legacy = not _uses_attention_interface(attns[0])
    if legacy and layout.family != "bert":
        raise NotImplementedError(
            f"apply_unipelt: {type(attns[0]).__name__} does not use transformers' attention "
            "registry; upgrade transformers"
        )
    for slot, i in enumerate(sorted(ctx.chosen(ctx.cfg.prefix))):  # slot: the layer's rows
        blk = layout.attention[i]
        site = root.site(slot, blk.stack)  # stack: the gate's mask (the query side)
        if blk.stack is not None:  # whose 2-D mask covers the keys
            site.keys_of = "enc" if blk.kind == "cross" else blk.stack
        snap.tag(blk.module, **{SITE_ATTR: site})
        if legacy:  # a partial, not a bound method: deepcopy and pickle carry it
            snap.tag(blk.module, forward=functools.partial(_legacy_bert_forward, blk.module))
        if root.prefix_gates is not None:
            ctx.hook_before(blk.module, prefix_gate_pre_hook, site)
    if not legacy:
        model = ctx.model
        model.config._attn_implementation = ATTN_NAME
        for c in {id(a.config): a.config for a in attns if hasattr(a, "config")}.values():
            if c is not model.config:  # T5's stacks hold their own copies of the config
                snap.sub_configs.append((c, c._attn_implementation))
                c._attn_implementation = ATTN_NAME
