"""adapters (AdapterHub) checkpoints: a ``model.save_adapter(dir, name)`` directory
(``adapter_config.json`` + ``pytorch_adapter.bin`` or ``adapter.safetensors``, optionally
``pytorch_model_head.bin`` / ``model_head.safetensors``).

What maps, exactly (adapters 1.x): UniPELT (a "union" of the three below), prefix tuning
(with its MLP, or flat / ejected; shared gate), bottleneck adapters SeqBn (either
``original_ln_before``), DoubleSeqBn and ParBn with a float scaling, LoRA on the self-attention
q/k/v (BERT-like and LLaMA-family, and GPT-2's merged c_attn with one LoRA and gate per matrix;
gated LoRA drops alpha/r, as adapters does), each gated or not, and ``leave_out`` as the
per-layer selection. Gates average over the whole sequence (gate_mode "mean"), as adapters
does. Tokens keep positions 0..L-1 (adapters inserts the
prefix inside attention, like the UniPELT reference).
"""

from __future__ import annotations

import os
import re
import warnings

import torch
import torch.nn as nn

from ..config import AdapterConfig, LoRAConfig, PrefixConfig, UniPELTConfig
from ..hf import model_dims, root_of
from ..hf.families import DEFAULT_HEADS, model_family
from ..lora import GatedLoRA
from ..modules import GatedAdapter
from ._common import apply_and_copy, head_pairs, lora_ab, need, read_json, read_weights

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter", "pytorch_adapter")  # adapter.safetensors / pytorch_adapter.bin
HEAD_WEIGHTS = ("model_head", "pytorch_model_head")
_ACT = {
    "relu": "relu",
    "swish": "silu",
    "silu": "silu",
    "tanh": "tanh",
    "gelu": "gelu",
    "gelu_orig": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "linear": "identity",
}
_LAYER = re.compile(r"\.(?:layer|h|layers)\.(\d+)\.")
_MATRIX = {"q": "query", "k": "key", "v": "value"}


def _layers(n_layers: int, leave_out) -> tuple[int, ...] | None:
    if not leave_out:
        return None
    return tuple(i for i in range(n_layers) if i not in set(leave_out))


def _bn_config(c: dict, dims: dict, who: str) -> AdapterConfig:
    for key, ok in (
        ("ln_before", False),
        ("ln_after", False),
        ("phm_layer", False),
        ("adapter_residual_before_ln", False),
        ("residual_before_ln", True),
        ("original_ln_after", True),
        ("inv_adapter", None),
        ("cross_adapter", False),
        ("stochastic_depth", 0.0),
    ):
        need(
            c.get(key, ok) == ok, who, f"bottleneck adapter {key}={c.get(key)!r} has no equivalent"
        )
    need(
        isinstance(c.get("scaling", 1.0), (int, float)),
        who,
        f"adapter scaling {c.get('scaling')!r} (learned scalings) has no equivalent",
    )
    act = _ACT.get(str(c.get("non_linearity", "relu")).lower())
    need(act is not None, who, f"adapter non_linearity {c.get('non_linearity')!r} is not supported")
    rf = c.get("reduction_factor")
    need(isinstance(rf, (int, float)) and rf > 0, who, f"per-layer reduction_factor {rf!r}")
    mh, out = bool(c.get("mh_adapter")), bool(c.get("output_adapter"))
    if c.get("is_parallel"):
        need(out and not mh, who, "a parallel adapter maps only after the FFN")
        placement = "ffn_parallel"
    elif mh:
        need(
            out and not c.get("original_ln_before"),
            who,
            "attention-output adapters map only as DoubleSeqBn (both, original_ln_before=False)",
        )
        placement = "attn_and_ffn_output"
    else:
        need(out, who, "the bottleneck adapter sits nowhere (output_adapter=False)")
        placement = "block_output" if c.get("original_ln_before") else "ffn_output"
    return AdapterConfig(
        bottleneck=max(1, int(dims["hidden"] // rf)),
        activation=act,
        scaling=float(c.get("scaling", 1.0)),
        gate=bool(c.get("use_gating")),
        placement=placement,
        layers=_layers(dims["n_layers"], c.get("leave_out")),
    )


def _prefix_config(c: dict, dims: dict, who: str) -> PrefixConfig:
    need(str(c.get("non_linearity", "tanh")).lower() == "tanh", who, "prefix MLP must use tanh")
    need(c.get("shared_gating", True), who, "separate key/value prefix gates are not supported")
    P = c.get("prefix_length")
    need(isinstance(P, int) and P >= 1, who, f"bad prefix_length {P!r}")
    return PrefixConfig(
        length=P,
        reparam=not c.get("flat", False),
        mlp_hidden=int(c.get("bottleneck_size", 512)),
        embed_dim=dims["hidden"],
        gate=bool(c.get("use_gating")),
        positions="tokens_only",
        layers=_layers(dims["n_layers"], c.get("leave_out")),
    )


def _lora_config(c: dict, dims: dict, family: str, who: str) -> LoRAConfig:
    for key, ok in (
        ("intermediate_lora", False),
        ("output_lora", False),
        ("use_dora", False),
        ("composition_mode", "add"),
        ("vera_d", None),
        ("vera_b", None),
    ):
        need(c.get(key, ok) == ok, who, f"LoRA {key}={c.get(key)!r} has no equivalent")
    need(c.get("selfattn_lora", True), who, "LoRA off the self-attention does not map")
    mats = c.get("attn_matrices", ["q", "v"])
    need(set(mats) <= set(_MATRIX) and mats, who, f"LoRA attn_matrices {mats!r}")
    return LoRAConfig(
        r=int(c["r"]),
        alpha=float(c.get("alpha", 8)),
        targets=tuple(_MATRIX[m] for m in ("q", "k", "v") if m in mats),
        gate=bool(c.get("use_gating")),
        gate_replaces_scaling=True,
        layers=_layers(dims["n_layers"], c.get("leave_out")),
        # a merged projection (GPT-2's c_attn, LoRAMergedLinear) holds a LoRA per matrix
        split_fused=True,
    )


def _methods(c: dict, dims: dict, family: str, who: str) -> dict:
    """adapters' config dict (one method or a "union") -> the adapter/prefix/lora sub-configs."""
    parts = c.get("configs") if c.get("architecture") == "union" else [c]
    sub: dict = {"adapter": None, "prefix": None, "lora": None}
    for part in parts:
        arch = part.get("architecture")
        key = {"prefix_tuning": "prefix", "lora": "lora", None: "adapter"}.get(arch)
        need(key is not None, who, f"adapter architecture {arch!r} is not supported")
        need(sub[key] is None, who, f"two {key} components in one adapter")
        if key == "adapter":
            sub[key] = _bn_config(part, dims, who)
        elif key == "prefix":
            sub[key] = _prefix_config(part, dims, who)
        else:
            sub[key] = _lora_config(part, dims, family, who)
    return sub


def adapters_config(config: dict, model: nn.Module) -> UniPELTConfig:
    """The :class:`UniPELTConfig` equal to the adapters library's config ``config`` (its
    ``to_dict()``, e.g. of ``adapters.UniPELTConfig()``) on ``model``'s architecture: bitfit
    off, gate_mode "mean", as :func:`from_adapters` builds it. Raises InteropError where a
    part has no equivalent."""
    who = "adapters_config"
    inner = getattr(model, "module", model)
    need(
        not getattr(inner.config, "is_encoder_decoder", False),
        who,
        "adapters' encoder-decoder layout (which sites get prefixes, LoRA and adapters) is not "
        "mapped",
    )
    dims = model_dims(inner.config)
    sub = _methods(config, dims, model_family(dims["model_type"]), who)
    return UniPELTConfig(bitfit=False, gate_mode="mean", prompt=False, **sub)


def from_adapters(model: nn.Module, path: str, *, backend: str = "auto") -> nn.Module:
    """Load the adapters ``save_adapter`` directory ``path`` onto ``model`` (its plain HF base
    model), in place, with the equivalent :class:`UniPELTConfig` (bitfit off, gate_mode
    "mean"). A head file loads only where its tensors are the model's own head parameters
    (otherwise a warning says it was skipped). Raises InteropError, the model untouched, on
    anything that does not map exactly. Returns the model."""
    who = "from_adapters"
    meta = read_json(os.path.join(path, CONFIG), who)
    tensors = read_weights(path, WEIGHTS, who)
    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    need(config is not None and hasattr(config, "model_type"), who, "expects an HF model")
    dims = model_dims(config)
    family = model_family(dims["model_type"])
    need(
        meta.get("model_type") in (None, dims["model_type"]),
        who,
        f"the adapter is for a {meta.get('model_type')!r} model, this one is "
        f"{dims['model_type']!r}",
    )
    need(
        meta.get("hidden_size") in (None, dims["hidden"]),
        who,
        f"the adapter is for hidden size {meta.get('hidden_size')}, this model has "
        f"{dims['hidden']}",
    )
    name = meta.get("name")
    c = meta.get("config")
    need(
        isinstance(c, dict) and isinstance(name, str), who, "adapter_config.json lacks config/name"
    )
    sub = _methods(c, dims, family, who)
    heads: dict[str, torch.Tensor] = {}
    if any(
        os.path.isfile(os.path.join(path, s + e))
        for s in HEAD_WEIGHTS
        for e in (".bin", ".safetensors")
    ):
        heads = read_weights(path, HEAD_WEIGHTS, who)
        # only task heads train in full here; an LM head (often tied to the embeddings) stays
        # the base model's
        names = {n for n, _ in inner.named_children()}
        skipped = sorted(
            n for n in heads if n.split(".")[0] not in DEFAULT_HEADS or n.split(".")[0] not in names
        )
        if skipped:
            warnings.warn(f"{who}: skipped head tensors {skipped} (not a task head)", stacklevel=2)
        heads = {n: t for n, t in heads.items() if n not in skipped}
    cfg = UniPELTConfig(
        bitfit=False,
        gate_mode="mean",
        modules_to_save=tuple(sorted({n.split(".")[0] for n in heads})),
        **sub,
    )
    tag = f".{name}."

    def layer_of(key: str) -> int:
        m = _LAYER.search(key)
        need(m is not None, who, f"no layer index in {key}")
        return int(m.group(1))

    def targets(m: nn.Module) -> list:
        pairs: list = []
        used: set[str] = set()

        def take(key: str, dst: torch.Tensor, reshape=None) -> None:
            need(key in tensors, who, f"missing tensor {key}")
            src = tensors[key]
            pairs.append((dst, src if reshape is None else src.reshape(reshape)))
            used.add(key)

        def take_rows(key: str, dst: torch.Tensor, j: int, n: int) -> None:
            """Rows j*k:(j+1)*k of a tensor that stacks n blocks of dst's k rows."""
            need(key in tensors, who, f"missing tensor {key}")
            src, k = tensors[key], dst.shape[0]
            need(
                src.dim() == dst.dim() and src.shape[0] == n * k,
                who,
                f"{key} of shape {tuple(src.shape)} is not {n} blocks of {tuple(dst.shape)}",
            )
            pairs.append((dst, src[j * k : (j + 1) * k]))
            used.add(key)

        root = root_of(m)
        if cfg.prefix is not None:
            enc = root.prefix
            pool = [k for k in tensors if ".prefix_tuning.prefix_tunings" + tag in k]
            pool = [k for k in pool if not _LAYER.search(k)]
            base = {k.rsplit(tag, 1)[1].split(".", 1)[1]: k for k in pool}
            if enc.reparam:
                take(base.get("wte.weight", "wte.weight"), enc.embedding.weight)
                for i in (0, 2):
                    take(base.get(f"control_trans.{i}.weight", "?"), enc.mlp[i].weight)
                    take(base.get(f"control_trans.{i}.bias", "?"), enc.mlp[i].bias)
            else:
                take(
                    base.get("control_trans", "control_trans"), enc.prefix, tuple(enc.prefix.shape)
                )
            # the per-layer copies of the pool are the same tensors
            used.update(k for k in tensors if ".prefix_tuning.pool.prefix_tunings" + tag in k)
            if root.prefix_gates is not None:
                gkeys = sorted((k for k in tensors if ".prefix_gates" + tag in k), key=layer_of)
                gkeys_w = [k for k in gkeys if k.endswith(".weight")]
                need(len(gkeys_w) == enc.n_layers, who, "prefix gates do not match the layers")
                for slot, kw in enumerate(gkeys_w):
                    g = root.prefix_gates[slot][0].proj
                    take(kw, g.weight)
                    take(kw[: -len("weight")] + "bias", g.bias)
        if cfg.adapter is not None:
            sites = []
            for n, mod in m.named_modules():
                if isinstance(mod, GatedAdapter):
                    attn = any(s in n for s in ("attention.", "attn.", "self_attn."))
                    sites.append((layer_of(n + "."), "attn" if attn else "ffn", mod))
            for layer, site, mod in sites:
                keys = [
                    k
                    for k in tensors
                    if ".adapters" + tag in k
                    and layer_of(k) == layer
                    and (("attention" in k.split(".adapters" + tag)[0]) == (site == "attn"))
                ]
                pre = {k.split(".adapters" + tag)[1]: k for k in keys}
                take(pre.get("adapter_down.0.weight", "?"), mod.down.weight)
                take(pre.get("adapter_down.0.bias", "?"), mod.down.bias)
                take(pre.get("adapter_up.weight", "?"), mod.up.weight)
                take(pre.get("adapter_up.bias", "?"), mod.up.bias)
                if mod.gate is not None:
                    take(pre.get("gate.weight", "?"), mod.gate.weight)
                    take(pre.get("gate.bias", "?"), mod.gate.bias)
        if cfg.lora is not None:
            # name -> its wrappers; a merged projection's (split_fused) are nested, one per
            # matrix: "c_attn", "c_attn.base", ...
            projections: dict[str, list[GatedLoRA]] = {}
            for n, w in m.named_modules():
                if isinstance(w, GatedLoRA):
                    projections.setdefault(re.sub(r"(\.base)+$", "", n), []).append(w)
            for n, ws in projections.items():
                # LoRAMergedLinear: matrix j (of the chosen q/k/v, in that order) holds
                # rows j*r:(j+1)*r of lora_A, its slice's rows of lora_B, row j of the gate
                ws = sorted(ws, key=lambda w: (w.out_slices or [(0, 0)])[0][0])
                for j, w in enumerate(ws):
                    A, B = lora_ab(w)
                    g = w.units[0].gate
                    got = [("lora_A", A), ("lora_B", B)]
                    if g is not None:
                        got += [("gate.weight", g.proj.weight), ("gate.bias", g.proj.bias)]
                    for key, dst in got:
                        if len(ws) == 1:
                            take(f"{n}.loras{tag}{key}", dst)
                        else:
                            take_rows(f"{n}.loras{tag}{key}", dst, j, len(ws))
        extra = sorted(set(tensors) - used)
        need(not extra, who, f"tensors that map nowhere here: {extra[:5]}")
        return pairs + head_pairs(m, heads, who)

    return apply_and_copy(model, cfg, backend, targets, who)
