"""UniPELT for Hugging Face models: :func:`apply_unipelt`, :func:`eject`, :func:`trainable_report`.

How it hooks in (transformers >= 4.57):

* **Prefix** -- an attention function registered as "unipelt" in transformers'
  ``AttentionInterface`` (and a matching mask function in ``AttentionMaskInterface`` that
  builds the boolean sdpa-style mask). The model's ``config._attn_implementation`` is set to
  it; each self-attention module is tagged with its layer index. The function turns the HF
  mask into ``key_padding_mask`` + bottom-right ``causal`` (checking that the mask is exactly
  that, else it raises: sliding windows that bite, packed sequences and custom 4-D masks are
  not supported) and calls :func:`unipelt_fast.prefix_attention`. The prefix keys are not
  rotated (they never pass through RoPE) and never enter the KV cache: each layer's prefix
  is computed inside the attention call, so gradient checkpointing (reentrant or not)
  recomputes it with its layer.
* **Gates** -- the prefix gate is computed from the attention module's input in a forward
  pre-hook; adapter/LoRA/prompt gates from their own inputs. "masked_mean" uses the 2-D
  attention mask captured by a pre-hook on the model's forward (the last L columns, so it also
  works with a KV cache). The prefix gate is per example, so gate_mode "token" falls back to
  "masked_mean" for it (and for the prompt gate).
* **Adapter** -- wraps the FFN output (BERT/RoBERTa ``output.dense``, GPT-2 / LLaMA ``mlp``):
  ``y + g * up(relu(down(y)))`` on :func:`unipelt_fast.gated_adapter`.
* **LoRA** -- wraps the query/value projections (GPT-2: slices of ``c_attn``).
* **BitFit** -- :func:`unipelt_fast.bitfit` (bias-only ops); task heads are trained in full.
* **Tasks** -- ``model(..., task_ids=LongTensor[B])``: the prefix goes through
  ``prefix_index`` (one fused call); per-task adapters/LoRA/gates loop over the tasks present
  in a mixed batch, each on its own rows (eager; one call when the batch has one task).

Runtime state (task ids, the 2-D mask) is kept on the model between a forward and its
backward: a gradient-checkpointed backward recomputes with the state of the *latest* forward,
so run forward/backward pairs in order (as every training loop does).

Not supported on the prefix path: attention-probability dropout (the prefix path has none),
``output_attentions``.
"""

from __future__ import annotations

import inspect
import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops, reference
from ._backend import BACKENDS
from ._tasks import run_per_task, select
from .bitfit import bitfit
from .config import UniPELTConfig
from .lora import GatedLoRA
from .modules import GatedAdapter, PrefixEncoder, PrefixGate
from .prompt import SoftPrompt

ATTN_NAME = "unipelt"
_DEFAULT_HEADS = ("classifier", "score", "qa_outputs")
_BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert", "electra")


# --------------------------------------------------------------------------------------------
# the root module: per-model PELT state
# --------------------------------------------------------------------------------------------


class UniPELTRoot(nn.Module):
    """Holds the prefix encoder, prefix gates and soft prompt, plus the runtime state."""

    def __init__(self, cfg: UniPELTConfig, dims: dict, backend: str) -> None:
        super().__init__()
        self.cfg, self.dims, self.backend = cfg, dict(dims), backend
        self.default_task = 0
        self.task_ids: torch.Tensor | None = None
        self.mask2d: torch.Tensor | None = None
        T, L = len(cfg.tasks), dims["n_layers"]
        gm = "masked_mean" if cfg.gate_mode == "token" else cfg.gate_mode
        self.prefix = self.prefix_gates = self.prompt = None
        if cfg.prefix is not None:
            pc = cfg.prefix
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

    def mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The (B, L) real-token mask for a (B, L, d) activation: the last L columns of the
        forward's 2-D mask (with a KV cache the mask also covers the cached tokens)."""
        m = self.mask2d
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


def _root(model: nn.Module) -> UniPELTRoot:
    inner = getattr(model, "module", model)  # DDP
    root = getattr(inner, "unipelt", None)
    if not isinstance(root, UniPELTRoot):
        raise ValueError("this model has no UniPELT methods: call apply_unipelt first")
    return root


# --------------------------------------------------------------------------------------------
# wrappers
# --------------------------------------------------------------------------------------------


class AdapterWrapper(nn.Module):
    """Runs the wrapped FFN-output module, then the task's gated adapter on its output."""

    def __init__(self, inner: nn.Module, adapters: nn.ModuleList) -> None:
        super().__init__()
        self.inner, self.adapters = inner, adapters

    def forward(self, *args, **kwargs):
        y = self.inner(*args, **kwargs)
        root = self.__dict__.get("_unipelt_root")
        task_ids = None if root is None else root.task_ids_for(y.shape[0])
        mask = None if root is None else root.mask_for(y)
        dt = self.adapters[0].down.weight.dtype

        def one(t: int, idx: torch.Tensor | None) -> torch.Tensor:
            ys = select(y, idx)
            return self.adapters[t](ys.to(dt), mask=select(mask, idx)).to(y.dtype)

        return run_per_task(one, task_ids, 0 if root is None else root.default_task)


# --------------------------------------------------------------------------------------------
# attention function + mask conversion
# --------------------------------------------------------------------------------------------


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


def _fallback_attention():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def unipelt_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """The "unipelt" attention function: prefix attention for tagged self-attention modules,
    sdpa for everything else (cross-attention). Returns HF's (B, Lq, H, D) layout."""
    root = module.__dict__.get("_unipelt_root")
    layer = module.__dict__.get("_unipelt_layer")
    if root is None or layer is None or root.prefix is None:
        return _fallback_attention()(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    causal = bool(getattr(module, "is_causal", False))
    if attention_mask is None and kwargs.get("is_causal") is not None:
        causal = bool(kwargs["is_causal"])
    kpm, causal, key, value = _convert_mask(attention_mask, causal, query, key, value)
    pk, pv = root.layer_prefix(layer)
    gate = module.__dict__.pop("_unipelt_gate", None)
    B = query.shape[0]
    if gate is not None and gate.shape[0] != B:
        if B % gate.shape[0]:  # never drop the gate silently
            raise ValueError(
                f"unipelt attention: the prefix gate has {gate.shape[0]} rows for a batch of {B}"
            )
        gate = gate.repeat_interleave(B // gate.shape[0], 0)  # e.g. expanded beams
    out = ops.prefix_attention(
        query,
        key,
        value,
        pk.to(query.dtype) if not torch.is_autocast_enabled(query.device.type) else pk,
        pv.to(query.dtype) if not torch.is_autocast_enabled(query.device.type) else pv,
        prefix_index=root.prefix_index(B, query.device),
        prefix_gate=gate,
        key_padding_mask=kpm,
        causal=causal,
        softmax_scale=scaling,
        backend=root.backend,
    )
    return out.transpose(1, 2).contiguous(), None


def _uses_attention_interface(module: nn.Module) -> bool:
    """Does this attention module dispatch through transformers' attention registry? (BERT
    and RoBERTa do from transformers 5; on 4.x they compute attention themselves.)"""
    mod = sys.modules.get(type(module).__module__)
    return mod is not None and hasattr(mod, "ALL_ATTENTION_FUNCTIONS")


def _legacy_bert_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    past_key_values=None,
    output_attentions: bool = False,
    *args,
    **kwargs,
):
    """BertSelfAttention.forward for transformers 4.x (encoder self-attention), on
    :func:`unipelt_attention`. Returns (context, None) like the original."""
    if encoder_hidden_states is not None or past_key_values is not None:
        raise NotImplementedError("unipelt: legacy BERT attention with a cache/cross-attention")
    if output_attentions or head_mask is not None:
        raise NotImplementedError("unipelt: output_attentions / head_mask with the prefix")
    if getattr(self, "position_embedding_type", "absolute") != "absolute":
        raise NotImplementedError("unipelt: relative position embeddings with the prefix")
    B, L, _ = hidden_states.shape
    H, D = self.num_attention_heads, self.attention_head_size

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, L, H, D).transpose(1, 2)

    q, k, v = (
        heads(self.query(hidden_states)),
        heads(self.key(hidden_states)),
        heads(self.value(hidden_states)),
    )
    out, _ = unipelt_attention(self, q, k, v, attention_mask, scaling=D**-0.5)
    return out.reshape(B, L, H * D), None


_registered = False


def _register() -> None:
    """Register the attention and mask functions with transformers (once per process)."""
    global _registered
    if _registered:
        return
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_NAME, unipelt_attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # older masking: models build their own 4-D masks, converted above
        pass
    else:
        sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]

        def unipelt_mask(*args, **kwargs):
            kwargs["allow_is_causal_skip"] = False  # keep padding visible to the converter
            return sdpa_mask(*args, **kwargs)

        AttentionMaskInterface.register(ATTN_NAME, unipelt_mask)
    _registered = True


# --------------------------------------------------------------------------------------------
# model structure
# --------------------------------------------------------------------------------------------


def _dims(config) -> dict:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {
        "model_type": config.model_type,
        "hidden": hidden,
        "n_layers": config.num_hidden_layers,
        "n_heads": heads,
        "n_kv_heads": kv,
        "head_dim": head_dim,
        "vocab_size": getattr(config, "vocab_size", None),
    }


def _family(model_type: str) -> str:
    if model_type in _BERT_LIKE:
        return "bert"
    if model_type == "gpt2":
        return "gpt2"
    return "llama"  # q_proj/k_proj/v_proj + mlp: LLaMA, Mistral, Qwen2 and relatives


def _attention_modules(model: nn.Module, family: str) -> list[nn.Module]:
    found = []
    for m in model.modules():
        if getattr(m, "is_cross_attention", False):
            continue
        if family == "bert":
            ok = all(hasattr(m, a) for a in ("query", "key", "value", "attention_head_size"))
            ok = ok and "Cross" not in type(m).__name__
        elif family == "gpt2":
            ok = hasattr(m, "c_attn") and hasattr(m, "c_proj")
        else:
            ok = all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if ok:
            found.append(m)
    return found


def _ffn_targets(model: nn.Module, family: str) -> list[tuple[nn.Module, str]]:
    out = []
    for m in model.modules():
        if family == "bert":
            if hasattr(m, "intermediate") and hasattr(getattr(m, "output", None), "dense"):
                out.append((m.output, "dense"))
        elif hasattr(m, "mlp") and (hasattr(m, "attn") or hasattr(m, "self_attn")):
            out.append((m, "mlp"))
    return out


def _linear_dims(mod: nn.Module) -> tuple[int, int]:
    if hasattr(mod, "in_features"):
        return mod.in_features, mod.out_features
    w = mod.weight  # HF Conv1D: (d_in, d_out)
    return w.shape[0], w.shape[1]


def _lora_targets(attn: nn.Module, family: str, roles, dims) -> list:
    """(parent, attribute, out_slices) per LoRA target of one attention module."""
    if family == "gpt2":
        d = dims["hidden"]
        pos = {"query": 0, "key": 1, "value": 2}
        slices = sorted((pos[r] * d, (pos[r] + 1) * d) for r in roles)
        return [(attn, "c_attn", slices)]
    names = {"query": "query", "key": "key", "value": "value"}
    if family != "bert":
        names = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
    return [(attn, names[r], None) for r in roles]


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
        self.handles: list = []
        self.tagged: list[tuple[nn.Module, str, object]] = []

    def restore(self) -> None:
        for h in self.handles:
            h.remove()
        for parent, name, child in self.children:
            setattr(parent, name, child)
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

    Supports BERT/RoBERTa, GPT-2 and LLaMA-family (LLaMA, Mistral, Qwen2) models, any head.
    On error the model is left as it was.
    """
    cfg = UniPELTConfig() if cfg is None else cfg
    if not isinstance(cfg, UniPELTConfig):
        raise TypeError("apply_unipelt: cfg must be a UniPELTConfig")
    if backend not in BACKENDS:
        raise ValueError(f"apply_unipelt: backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(getattr(model, "unipelt", None), UniPELTRoot):
        raise ValueError("apply_unipelt: this model already has UniPELT methods")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError("apply_unipelt: expects a transformers PreTrainedModel")
    snap = _Snapshot(model)
    try:
        _apply(model, cfg, backend, snap)
    except BaseException:
        snap.restore()
        raise
    return model


def _apply(model: nn.Module, cfg: UniPELTConfig, backend: str, snap: _Snapshot) -> None:
    dims = _dims(model.config)
    family = _family(dims["model_type"])
    attns = _attention_modules(model, family)
    ffns = _ffn_targets(model, family)
    if len(attns) != dims["n_layers"] or (cfg.adapter is not None and len(ffns) != len(attns)):
        raise NotImplementedError(
            f"apply_unipelt: found {len(attns)} attention and {len(ffns)} FFN blocks for "
            f"{dims['n_layers']} layers in this {dims['model_type']} model; supported: BERT, "
            "RoBERTa, GPT-2 and LLaMA-family models"
        )
    dtype, device = _model_dtype_device(model)
    T = len(cfg.tasks)

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
        for attn in attns:
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
                )
                _tag(w, snap, _unipelt_root=root)
                setattr(parent, attr, w)
                new_modules.append(w.units)

    # 3. adapters after the FFN outputs
    if cfg.adapter is not None:
        ac = cfg.adapter
        r = ac.bottleneck or max(1, dims["hidden"] // 16)
        for parent, attr in ffns:
            adapters = nn.ModuleList(
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
            w = AdapterWrapper(getattr(parent, attr), adapters)
            _tag(w, snap, _unipelt_root=root)
            setattr(parent, attr, w)
            new_modules.append(adapters)

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
        for i, attn in enumerate(attns):
            _tag(attn, snap, _unipelt_root=root, _unipelt_layer=i)
            if legacy:
                _tag(attn, snap, forward=types.MethodType(_legacy_bert_forward, attn))
            if root.prefix_gates is not None:
                snap.handles.append(
                    attn.register_forward_pre_hook(_attn_pre_hook, with_kwargs=True)
                )
        if not legacy:
            model.config._attn_implementation = ATTN_NAME

    for m in new_modules:
        m.to(device=device, dtype=dtype)
        for p in m.parameters():
            p.requires_grad_(True)
    model.unipelt = root
    snap.handles.append(model.register_forward_pre_hook(_model_pre_hook, with_kwargs=True))
    root._handles = snap.handles
    # Reentrant gradient checkpointing only backpropagates into a checkpointed block when its
    # input requires grad; with a frozen embedding it would not (and the PELT gradients would
    # silently be lost), so make the embedding output require grad (what peft does too).
    if hasattr(model, "enable_input_require_grads") and device.type != "meta":
        model.enable_input_require_grads()
        snap.handles.append(getattr(model, "_require_grads_hook", None) or _NoHandle())


class _NoHandle:
    def remove(self) -> None:
        pass


def _attn_pre_hook(module: nn.Module, args, kwargs):
    """Compute this layer's prefix gate G_P from the attention module's input."""
    root = module.__dict__["_unipelt_root"]
    h = kwargs.get("hidden_states", args[0] if args else None)
    if h is None or root.prefix_gates is None:
        return None
    gates = root.prefix_gates[module.__dict__["_unipelt_layer"]]
    mask = root.mask_for(h)
    dt = gates[0].proj.weight.dtype

    def one(t: int, idx: torch.Tensor | None) -> torch.Tensor:
        return gates[t](select(h, idx).to(dt), select(mask, idx))

    module.__dict__["_unipelt_gate"] = run_per_task(
        one, root.task_ids_for(h.shape[0]), root.default_task
    )
    return None


_SIGS: dict[type, list[str]] = {}


def _positional_names(model: nn.Module) -> list[str]:
    cls = type(model)
    if cls not in _SIGS:
        params = inspect.signature(model.forward).parameters.values()
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        _SIGS[cls] = [p.name for p in params if p.kind in kinds]
    return _SIGS[cls]


def _model_pre_hook(model: nn.Module, args, kwargs):
    """Capture task ids and the 2-D mask; prepend the soft prompt."""
    root: UniPELTRoot = model.unipelt
    if args:
        kwargs = {**dict(zip(_positional_names(model), args, strict=False)), **kwargs}
        args = ()
    task_ids = kwargs.pop("task_ids", None)
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if task_ids is not None:
        task_ids = torch.as_tensor(task_ids, dtype=torch.long, device=ref.device).reshape(-1)
        if ref is not None and task_ids.shape[0] != ref.shape[0]:
            raise ValueError(
                f"task_ids has {task_ids.shape[0]} entries for {ref.shape[0]} examples"
            )
        n = len(root.cfg.tasks)
        if bool(((task_ids < 0) | (task_ids >= n)).any()):
            raise ValueError(f"task_ids must be in [0, {n})")
    root.task_ids = task_ids
    mask = kwargs.get("attention_mask")
    if root.prompt is not None and ref is not None:
        kwargs, mask = _prepend_prompt(model, root, kwargs, task_ids, mask)
    root.mask2d = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    return args, kwargs


def _prepend_prompt(model, root, kwargs, task_ids, mask):
    past = kwargs.get("past_key_values")
    if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
        raise NotImplementedError("unipelt: the soft prompt does not support KV-cache decoding")
    if kwargs.get("position_ids") is not None:
        raise NotImplementedError("unipelt: the soft prompt does not take position_ids")
    ids = kwargs.pop("input_ids", None)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)
    B, L = embeds.shape[:2]
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.long, device=embeds.device)
    P = root.prompt.length
    prompt = root.prompt(embeds, mask.bool(), task_ids, root.default_task)
    kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype), embeds], dim=1)
    mask = torch.cat([mask.new_ones(B, P), mask], dim=1)
    kwargs["attention_mask"] = mask
    tt = kwargs.get("token_type_ids")
    if tt is not None:
        kwargs["token_type_ids"] = torch.cat([tt.new_zeros(B, P), tt], dim=1)
    labels = kwargs.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] == L:
        kwargs["labels"] = torch.cat([labels.new_full((B, P), -100), labels], dim=1)
    return kwargs, mask


# --------------------------------------------------------------------------------------------
# tasks, eject, report
# --------------------------------------------------------------------------------------------


def set_active_task(model: nn.Module, task: str | int) -> None:
    """The task used by forwards that pass no ``task_ids`` (e.g. inside ``generate()``)."""
    root = _root(model)
    tasks = root.cfg.tasks
    idx = tasks.index(task) if isinstance(task, str) else int(task)
    if not 0 <= idx < len(tasks):
        raise ValueError(f"unknown task {task!r}; tasks are {tasks}")
    root.default_task = idx


def eject(model: nn.Module) -> nn.Module:
    """Replace the prefix MLP by its fixed per-layer K/V (for inference). Outputs are
    unchanged. Returns the model."""
    root = _root(model)
    if root.prefix is not None and not root.prefix.is_ejected:
        root.prefix.eject()
    return model


def _method_of_params(model: nn.Module) -> dict[int, str]:
    owner: dict[int, str] = {}
    root = _root(model)
    inner = getattr(model, "module", model)
    for m in inner.modules():
        what = None
        if isinstance(m, AdapterWrapper):
            what, ps = "adapter", m.adapters.parameters()
        elif isinstance(m, GatedLoRA):
            what, ps = "lora", m.units.parameters()
        if what is not None:
            for p in ps:
                owner[id(p)] = what
    for name, sub in (("prefix", root.prefix), ("prefix", root.prefix_gates)):
        if sub is not None:
            for p in sub.parameters():
                owner[id(p)] = name
    if root.prompt is not None:
        for p in root.prompt.parameters():
            owner[id(p)] = "prompt"
    return owner


def trainable_report(model: nn.Module) -> str:
    """Trainable / total parameters and %, per method, plus what an inference copy adds."""
    root = _root(model)
    owner = _method_of_params(model)
    inner = getattr(model, "module", model)
    heads = root.cfg.modules_to_save
    heads = _DEFAULT_HEADS if heads is None else heads
    seen: set[int] = set()
    total = 0
    per: dict[str, int] = {}
    for name, p in inner.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if not p.requires_grad:
            continue
        what = owner.get(id(p))
        if what is None:
            in_head = any(part in heads for part in name.split("."))
            what = "bitfit" if name.endswith("bias") and not in_head else "head"
        per[what] = per.get(what, 0) + p.numel()
    trainable = sum(per.values())
    base = total - sum(n for w, n in per.items() if w in ("adapter", "lora", "prefix", "prompt"))
    lines = [
        f"UniPELT ({root.dims['model_type']}, tasks={list(root.cfg.tasks)}, "
        f"gate_mode={root.cfg.gate_mode!r}, backend={root.backend!r})",
        f"trainable: {trainable:,} of {total:,} parameters "
        f"({100 * trainable / max(total, 1):.3f}%)",
    ]
    for what in ("bitfit", "adapter", "prefix", "lora", "prompt", "head"):
        if what in per:
            lines.append(f"  {what:<8} {per[what]:>12,}  ({100 * per[what] / max(total, 1):.3f}%)")
    if root.prefix is not None and root.prefix.reparam:
        d = root.dims
        kv = len(root.cfg.tasks) * root.prefix.prefix_len * d["n_layers"] * 2
        kv *= d["n_kv_heads"] * d["head_dim"]
        mlp = sum(p.numel() for p in root.prefix.parameters())
        added = trainable - mlp + kv - per.get("head", 0)
        lines.append(
            f"after eject(): the prefix MLP ({mlp:,}) becomes {kv:,} fixed K/V values; "
            f"tuned parameters excluding heads: {added:,} ({100 * added / max(base, 1):.3f}% "
            "of the base model)"
        )
    return "\n".join(lines)
