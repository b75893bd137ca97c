"""peft checkpoints (``adapter_config.json`` + ``adapter_model.safetensors`` / ``.bin``).

What maps, exactly (peft 0.17-0.21 formats):

* PREFIX_TUNING -> a flat, ungated prefix with ``positions="after_prefix"`` (peft counts the
  prefix as P virtual tokens). peft stores ``prompt_embeddings`` (P, layers*2*Hkv*D), the MLP's
  output when ``prefix_projection=True``; its layout (layer, key/value, head, dim) is the
  flat layout of :class:`~unipelt_fast.modules.PrefixEncoder`.
* PROMPT_TUNING -> an ungated soft prompt (``prompt_embeddings`` (P, hidden)).
* LORA -> ungated LoRA on the modules ``target_modules`` names (a list, a regex or
  "all-linear"; peft's matching rules, hf/targets.py), ``lora_alpha / r`` (or ``/ sqrt(r)``
  with ``use_rslora``), ``layers_to_transform`` / ``layers_pattern`` -> ``LoRAConfig.layers``
  / ``layers_pattern``. DoRA, per-module ranks and the other variants are refused.
* Heads in ``modules_to_save`` load where their names are the model's own head parameters.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch
import torch.nn as nn

from .. import _atomic, distributed
from ..config import LoRAConfig, PrefixConfig, PromptConfig, UniPELTConfig
from ..hf import model_dims, root_of
from ..hf.targets import _conv1d_type, in_heads, name_matches
from ..hf.targets import resolve as resolve_targets
from ..lora import GatedLoRA
from ._common import InteropError, apply_and_copy, head_pairs, lora_ab, need, read_json

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model"
_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if name.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    return None


def _split_heads(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def from_peft(model: nn.Module, path: str, *, backend: str = "auto") -> nn.Module:
    """Load the peft checkpoint directory ``path`` onto ``model`` (its plain base model), in
    place: the methods are applied with the equivalent :class:`UniPELTConfig` and the tensors
    copied. Raises :class:`~unipelt_fast.interop.InteropError` (the model untouched) on
    anything that does not map exactly. Returns the model."""
    from ._common import read_weights

    who = "from_peft"
    pc = read_json(os.path.join(path, CONFIG), who)
    tensors = read_weights(path, (WEIGHTS,), who)
    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    need(config is not None and hasattr(config, "model_type"), who, "expects an HF model")
    dims = model_dims(config)
    ptype = pc.get("peft_type")
    # peft lists the usual heads for a task type (e.g. classifier and score) and wraps the
    # ones that exist; so do we
    names = {n.rsplit(".", 1)[-1] for n, _ in inner.named_modules()}
    heads_to_save = tuple(n for n in dict.fromkeys(pc.get("modules_to_save") or ()) if n in names)
    kv = dims["n_kv_heads"] * dims["head_dim"]
    if ptype in ("PREFIX_TUNING", "PROMPT_TUNING"):
        need(
            pc.get("num_transformer_submodules", 1) == 1,
            who,
            "encoder-decoder prompts (num_transformer_submodules=2) are not supported",
        )
        P = pc.get("num_virtual_tokens")
        need(isinstance(P, int) and P >= 1, who, f"bad num_virtual_tokens {P!r}")
        emb = tensors.get("prompt_embeddings")
        need(emb is not None, who, "the weights hold no prompt_embeddings")
        heads = _split_heads(tensors, "base_model.")
        extra = set(tensors) - {"prompt_embeddings"} - {"base_model." + k for k in heads}
        need(not extra, who, f"unexpected tensors {sorted(extra)[:5]}")
        if ptype == "PREFIX_TUNING":
            need(
                pc.get("num_layers") == dims["n_layers"] and pc.get("token_dim") == kv,
                who,
                f"the prefix is for {pc.get('num_layers')} layers of width {pc.get('token_dim')}"
                f", this model has {dims['n_layers']} of width {kv}",
            )
            need(
                tuple(emb.shape) == (P, dims["n_layers"] * 2 * kv),
                who,
                f"prompt_embeddings has shape {tuple(emb.shape)}",
            )
            cfg = UniPELTConfig(
                bitfit=False,
                adapter=None,
                prefix=PrefixConfig(length=P, reparam=False, gate=False, positions="after_prefix"),
                modules_to_save=heads_to_save,
            )

            def targets(m: nn.Module) -> list:
                return [(root_of(m).prefix.prefix, emb[None])] + head_pairs(m, heads, who)
        else:
            need(
                tuple(emb.shape) == (P, dims["hidden"]),
                who,
                f"prompt_embeddings has shape {tuple(emb.shape)}, expected {(P, dims['hidden'])}",
            )
            cfg = UniPELTConfig(
                bitfit=False,
                adapter=None,
                prefix=None,
                prompt=PromptConfig(length=P, gate=False),
                modules_to_save=heads_to_save,
            )

            def targets(m: nn.Module) -> list:
                return [(root_of(m).prompt.embeddings, emb[None])] + head_pairs(m, heads, who)

        return apply_and_copy(model, cfg, backend, targets, who)
    if ptype == "LORA":
        cfg, targets = _lora_plan(pc, tensors, heads_to_save, who)
        try:  # the names must fit this model before anything changes
            resolve_targets(inner, cfg.lora, heads_to_save)
        except (ValueError, NotImplementedError) as e:
            raise InteropError(f"{who}: the checkpoint's LoRA targets do not fit: {e}") from e
        return apply_and_copy(model, cfg, backend, targets, who)
    raise InteropError(
        f"{who}: peft_type {ptype!r} is not supported (PREFIX_TUNING, PROMPT_TUNING, LORA)"
    )


def _lora_plan(pc, tensors, heads_to_save, who):
    for key, ok in (
        ("use_dora", False),
        ("lora_bias", False),
        ("bias", "none"),
        ("rank_pattern", {}),
        ("alpha_pattern", {}),
        ("layer_replication", None),
        ("target_parameters", None),
        ("trainable_token_indices", None),
        ("alora_invocation_tokens", None),
        ("exclude_modules", None),
        ("use_qalora", False),
        ("use_bdlora", None),
        ("arrow_config", None),
        ("monteclora_config", None),
        ("kasa_config", None),
        ("velora_config", None),
    ):
        v = pc.get(key, ok)
        need(v == ok or not v, who, f"{key}={v!r} has no equivalent here")
    r, alpha = pc.get("r"), pc.get("lora_alpha")
    need(isinstance(r, int) and r >= 1, who, f"bad r {r!r}")
    need(isinstance(alpha, (int, float)), who, f"bad lora_alpha {alpha!r}")
    if pc.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # alpha / sqrt(r) == (alpha * sqrt(r)) / r
    tm = pc.get("target_modules")
    need(
        (isinstance(tm, list) and tm and all(isinstance(t, str) and t for t in tm))
        or (isinstance(tm, str) and tm),
        who,
        f"target_modules must be a list of names or a regex string, got {tm!r}",
    )
    tm = tuple(dict.fromkeys(tm)) if isinstance(tm, list) else tm
    # peft's check_target_module_exists filters by layer only the suffix matches of a list
    layers, pattern = pc.get("layers_to_transform"), pc.get("layers_pattern")
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(tm, str) or not layers:
        layers = pattern = None
    if isinstance(pattern, str):
        pattern = [pattern]
    pattern = pattern or None  # peft: an empty pattern means the default one
    lora_t = {k: v for k, v in tensors.items() if ".lora_" in k}
    heads = _split_heads({k: v for k, v in tensors.items() if k not in lora_t}, "base_model.model.")
    extra = set(tensors) - set(lora_t) - {"base_model.model." + k for k in heads}
    need(not extra, who, f"unexpected tensors {sorted(extra)[:5]}")
    ab: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in lora_t.items():
        m = _LORA_KEY.match(k)
        need(m is not None, who, f"unexpected LoRA tensor {k}")
        ab.setdefault(m.group(1), {})[m.group(2)] = v
    cfg = UniPELTConfig(
        bitfit=False,
        adapter=None,
        prefix=None,
        lora=LoRAConfig(
            r=r,
            alpha=float(alpha),
            target_modules=tm,
            gate=False,
            layers=layers,
            layers_pattern=pattern,
        ),
        modules_to_save=heads_to_save,
    )

    def targets(model: nn.Module) -> list:
        wrappers = {n: mod for n, mod in model.named_modules() if isinstance(mod, GatedLoRA)}
        only_ckpt, only_here = sorted(set(ab) - set(wrappers)), sorted(set(wrappers) - set(ab))
        need(
            not only_ckpt and not only_here,
            who,
            f"the LoRA targets of target_modules={tm!r} differ from the checkpoint's LoRA "
            f"tensors: only in the checkpoint {only_ckpt[:4]}, only in this model "
            f"{only_here[:4]}",
        )
        out = []
        for n, w in wrappers.items():
            need(set(ab[n]) == {"A", "B"}, who, f"{n} lacks lora_A or lora_B")
            A, B = lora_ab(w)
            out += [(A, ab[n]["A"]), (B, ab[n]["B"])]
        return out + head_pairs(model, heads, who)

    return cfg, targets


def save_peft(model: nn.Module, path: str) -> None:
    """Write ``model``'s UniPELT methods as a peft checkpoint directory ``path`` that
    ``peft.PeftModel.from_pretrained(base, path)`` loads. peft holds one method per directory:
    an ungated prefix (written flat) with ``positions="after_prefix"``, an ungated soft prompt,
    or ungated LoRA; plus the trained heads. Anything else raises InteropError naming it.
    Crash-safe: the two files are swapped in as a unit where the system allows it (see
    :func:`unipelt_fast._atomic.write_files` and docs/reliability.md). On a model sharded
    with FSDP2, call it on every rank: rank 0 writes the full tensors."""
    who = "save_peft"
    inner = getattr(model, "module", model)
    root = root_of(inner)
    cfg = root.cfg
    dims = root.dims

    def cannot(part: str) -> None:
        raise InteropError(f"{who}: peft cannot hold {part}")

    if cfg.bitfit:
        cannot("BitFit biases (bitfit=True)")
    if cfg.adapter is not None:
        cannot("bottleneck adapters")
    if len(cfg.tasks) != 1:
        cannot(f"several tasks {list(cfg.tasks)} in one directory")
    methods = [n for n in ("prefix", "prompt", "lora") if getattr(cfg, n) is not None]
    if len(methods) != 1:
        cannot(f"{' + '.join(methods) or 'no method'}: a peft directory holds exactly one")
    for n in methods:
        if getattr(cfg, n).gate:
            cannot(f"the {n} gate")
    state: dict[str, torch.Tensor] = {}
    task = _task_type(inner)
    common = {"task_type": task, "inference_mode": True, "base_model_name_or_path": None}
    trained = {n: p for n, p in inner.named_parameters() if p.requires_grad}
    full: dict[int, torch.Tensor] = {}  # sharded (FSDP2): the full values, on rank 0
    if distributed.is_sharded(inner):
        fqn = {id(p): distributed.canonical_name(n) for n, p in trained.items()}
        gathered = distributed.full_state(inner, list(fqn.values()))
        full = {i: gathered[n] for i, n in fqn.items() if n in gathered}

    def value(t: torch.Tensor) -> torch.Tensor:
        return full.get(id(t), t)

    if methods == ["lora"]:
        lc = cfg.lora
        wrappers = {n: mod for n, mod in inner.named_modules() if isinstance(mod, GatedLoRA)}
        if any(isinstance(w.base, GatedLoRA) for w in wrappers.values()):
            cannot("a LoRA per role of a fused projection (LoRAConfig(split_fused=True))")
        for n, w in wrappers.items():
            if w.out_slices is not None and sum(b - a for a, b in w.out_slices) != w.d_out:
                cannot(
                    f"LoRA on some output slices of {n} only (targets {list(lc.targets)}; "
                    "peft's LoRA covers the whole projection)"
                )
            A, B = lora_ab(w)
            key = f"base_model.model.{distributed.canonical_name(n)}"
            state[f"{key}.lora_A.weight"] = value(A)
            state[f"{key}.lora_B.weight"] = value(B)
        lora_params = {id(p) for w in wrappers.values() for p in w.units.parameters()}
        head_prefix = "base_model.model."
        heads = {n: p for n, p in trained.items() if id(p) not in lora_params}
        tm, layers, pattern = _peft_targets(inner, wrappers, heads, lc)
        conv1d = _conv1d_type() or ()  # GPT-2's layers: peft needs fan_in_fan_out
        meta = {
            "peft_type": "LORA",
            "r": lc.r,
            "lora_alpha": lc.alpha,
            "target_modules": tm,
            "layers_to_transform": layers,
            "layers_pattern": pattern,
            "fan_in_fan_out": any(isinstance(w.base, conv1d) for w in wrappers.values()),
            "bias": "none",
            "lora_dropout": 0.0,
            "use_rslora": False,
        }
        own = lora_params
    else:
        P = cfg.prefix.length if methods == ["prefix"] else cfg.prompt.length
        meta = {
            "num_virtual_tokens": P,
            "num_transformer_submodules": 1,
            "num_attention_heads": dims["n_heads"],
            "num_layers": dims["n_layers"],
        }
        if methods == ["prefix"]:
            pc = cfg.prefix
            if pc.positions != "after_prefix":
                cannot(
                    "a prefix with positions='tokens_only' (peft counts the prefix as P "
                    "positions; use PrefixConfig(positions='after_prefix'))"
                )
            if pc.layers is not None:
                cannot(f"a prefix on some layers only ({list(pc.layers)})")
            kv = dims["n_kv_heads"] * dims["head_dim"]
            meta.update(
                peft_type="PREFIX_TUNING",
                token_dim=kv,
                num_attention_heads=dims["n_kv_heads"],
                encoder_hidden_size=dims["hidden"],
                prefix_projection=False,
            )
            with torch.no_grad(), distributed.unsharded(inner, root.prefix):
                state["prompt_embeddings"] = root.prefix._flat()[0].clone()
            own = {id(p) for p in root.prefix.parameters()}
        else:
            meta.update(peft_type="PROMPT_TUNING", token_dim=dims["hidden"])
            meta["prompt_tuning_init"] = "RANDOM"
            state["prompt_embeddings"] = value(root.prompt.embeddings)[0]
            own = {id(root.prompt.embeddings)}
        head_prefix = "base_model."
    heads = {n: p for n, p in trained.items() if id(p) not in own}
    if heads:
        meta["modules_to_save"] = sorted({n.split(".")[0] for n in heads})
        for n, p in heads.items():
            state[head_prefix + distributed.canonical_name(n)] = value(p)
    meta.update(common)
    distributed.write_on_rank0(inner, lambda: _write_peft(state, meta, path))


def _peft_targets(inner: nn.Module, wrappers: dict, heads: dict, lc: LoRAConfig):
    """(target_modules, layers_to_transform, layers_pattern) under which peft's matching
    (targets.py) picks exactly the modules that hold LoRA here: the short names with this
    config's layers when they pick exactly those, else the full names (exact matches)."""
    canon = distributed.canonical_name
    want = {canon(n) for n in wrappers}
    inside = tuple(n + "." for n in wrappers) + ("unipelt.",)
    plain = [canon(n) for n, _ in inner.named_modules() if n and not n.startswith(inside)]
    plain = [n for n in plain if n != "unipelt"]
    head_names = sorted({n.split(".")[0] for n in heads})
    short = sorted({n.rsplit(".", 1)[-1] for n in want})
    layers = None if lc.layers is None or isinstance(lc.target_modules, str) else list(lc.layers)
    pattern = None if lc.layers_pattern is None or layers is None else list(lc.layers_pattern)
    picked = {
        n for n in plain if not in_heads(n, head_names) and name_matches(short, n, layers, pattern)
    }
    if picked == want:
        return short, layers, pattern
    return sorted(want), None, None


def _write_peft(state: dict[str, torch.Tensor], meta: dict, path: str) -> None:
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in state.items()})
    text = json.dumps(meta, indent=1, sort_keys=True) + "\n"
    # peft fixes both names, so the pair is swapped in as one directory where possible (see
    # _atomic.write_files); weights before config in the per-file fallback
    _atomic.write_files(
        path,
        {WEIGHTS + ".safetensors": blob, CONFIG: text.encode()},
        owned={CONFIG, WEIGHTS + ".safetensors", WEIGHTS + ".bin"},
    )
