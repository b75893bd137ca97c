"""UniPELT checkpoints: the tuned tensors (safetensors) + the config and model fingerprint (JSON).

``save_unipelt(model, path)`` writes ``path/unipelt.safetensors`` and ``path/unipelt.json``.
``load_unipelt(model, path)`` validates everything (file integrity via SHA-256, model type,
sizes, config, tensor names/shapes/dtypes) before changing anything; on any mismatch it raises
:class:`UniPELTCheckpointError` and leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.nn as nn

from . import distributed
from .config import UniPELTConfig
from .hf import UniPELTRoot, _dims, _root, _Snapshot, apply_unipelt, eject

FORMAT = "unipelt-fast/1"
WEIGHTS, META = "unipelt.safetensors", "unipelt.json"


class UniPELTCheckpointError(ValueError):
    """A checkpoint that does not fit the model, or is corrupt."""


def tuned_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a UniPELT checkpoint holds: every trainable parameter, plus the ejected
    prefix buffer when there is one. Names are the state_dict's (no activation-checkpoint
    wrapper prefix); on a sharded model (FSDP2) the values are the local shards."""
    inner = getattr(model, "module", model)
    root = _root(inner)
    state = {
        distributed.canonical_name(n): p for n, p in inner.named_parameters() if p.requires_grad
    }
    if root.prefix is not None and root.prefix.is_ejected:
        state["unipelt.prefix.ejected"] = root.prefix.ejected
    return state


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_unipelt(model: nn.Module, path: str) -> None:
    """Write the tuned parameters + config to the directory ``path`` (created if needed).

    On a model sharded with FSDP2 (``fully_shard``) call it on every rank: the full tuned
    tensors are gathered, rank 0 writes the same files as an unsharded save, the others wait.
    """
    inner = getattr(model, "module", model)
    root = _root(inner)
    if distributed.is_sharded(inner):
        state = distributed.full_state(inner, list(tuned_state(inner)))  # {} off rank 0
    else:
        state = {n: t.detach().contiguous().cpu() for n, t in tuned_state(inner).items()}
    distributed.write_on_rank0(inner, lambda: _write(root, state, path))


def _write(root: UniPELTRoot, state: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    wpath = os.path.join(path, WEIGHTS)
    save_file(state, wpath)
    meta = {
        "format": FORMAT,
        "model_type": root.dims["model_type"],
        "dims": root.dims,
        "config": root.cfg.to_dict(),
        "ejected": bool(root.prefix is not None and root.prefix.is_ejected),
        "tensors": {n: [list(t.shape), str(t.dtype)] for n, t in state.items()},
        "sha256": _sha256(wpath),
    }
    with open(os.path.join(path, META), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


def _read(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    wpath, mpath = os.path.join(path, WEIGHTS), os.path.join(path, META)
    for p in (wpath, mpath):
        if not os.path.isfile(p):
            raise UniPELTCheckpointError(f"UniPELT checkpoint: missing {p}")
    try:
        with open(mpath) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UniPELTCheckpointError(f"UniPELT checkpoint: {mpath} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UniPELTCheckpointError(f"UniPELT checkpoint: {mpath} is not a {FORMAT} file")
    if _sha256(wpath) != meta.get("sha256"):
        raise UniPELTCheckpointError(
            f"UniPELT checkpoint: {wpath} is corrupt (its SHA-256 does not match {META})"
        )
    try:
        tensors = load_file(wpath)
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
        raise UniPELTCheckpointError(f"UniPELT checkpoint: cannot read {wpath} ({e})") from e
    listed = meta.get("tensors", {})
    if set(listed) != set(tensors) or any(list(tensors[n].shape) != listed[n][0] for n in tensors):
        raise UniPELTCheckpointError(f"UniPELT checkpoint: {wpath} does not match {META}")
    return meta, tensors


def _check_fit(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    state = tuned_state(model)
    missing, extra = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    if missing or extra:
        raise UniPELTCheckpointError(
            f"UniPELT checkpoint does not fit this model: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    for n, t in state.items():
        if tuple(tensors[n].shape) != tuple(t.shape):
            raise UniPELTCheckpointError(
                f"UniPELT checkpoint: {n} has shape {tuple(tensors[n].shape)}, the model "
                f"{tuple(t.shape)}"
            )
        if not tensors[n].is_floating_point() or not t.is_floating_point():
            raise UniPELTCheckpointError(f"UniPELT checkpoint: {n} is not floating point")


def load_unipelt(model: nn.Module, path: str, *, backend: str = "auto") -> nn.Module:
    """Load a checkpoint written by :func:`save_unipelt` into ``model``, in place.

    ``model`` is either a base model with ``apply_unipelt`` already run (its config must
    equal the saved one) or a plain base model (the saved config is applied first, on
    ``backend``). Raises :class:`UniPELTCheckpointError` and leaves the model untouched on a
    corrupt file or any mismatch. Returns the model.

    A model sharded with FSDP2 must have UniPELT applied before ``fully_shard``; call this on
    every rank (each reads ``path``): every rank keeps its shard of the loaded tensors.
    """
    inner = getattr(model, "module", model)
    meta, tensors = _read(path)
    sharded = distributed.is_sharded(inner)
    if sharded and not isinstance(getattr(inner, "unipelt", None), UniPELTRoot):
        raise UniPELTCheckpointError(
            "load_unipelt: this model is sharded (fully_shard) without UniPELT; load the "
            "checkpoint into the plain model, then shard it"
        )
    config = getattr(inner, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise UniPELTCheckpointError("load_unipelt: expects a transformers PreTrainedModel")
    dims = _dims(config)
    if meta.get("model_type") != dims["model_type"]:
        raise UniPELTCheckpointError(
            f"UniPELT checkpoint is for a {meta.get('model_type')!r} model, this one is "
            f"{dims['model_type']!r}"
        )
    if meta.get("dims") != dims:
        raise UniPELTCheckpointError(
            f"UniPELT checkpoint sizes {meta.get('dims')} do not match this model's {dims}"
        )
    try:
        cfg = UniPELTConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise UniPELTCheckpointError(f"UniPELT checkpoint: bad config ({e})") from e

    root = getattr(inner, "unipelt", None)
    snap = None
    if isinstance(root, UniPELTRoot):
        if root.cfg.to_dict() != cfg.to_dict():
            raise UniPELTCheckpointError(
                "UniPELT checkpoint config differs from the model's: "
                f"saved {cfg.to_dict()}, model {root.cfg.to_dict()}"
            )
        if bool(meta.get("ejected")) != bool(root.prefix is not None and root.prefix.is_ejected):
            raise UniPELTCheckpointError(
                "UniPELT checkpoint and model differ in eject() state; eject() both or neither"
            )
        _check_fit(inner, meta, tensors)
    else:
        snap = _Snapshot(inner)
        try:
            apply_unipelt(inner, cfg, backend=backend)
            if meta.get("ejected"):
                eject(inner)
            _check_fit(inner, meta, tensors)
        except BaseException:
            if isinstance(getattr(inner, "unipelt", None), UniPELTRoot):
                for h in inner.unipelt._handles:
                    h.remove()
            snap.restore()
            raise
    state = tuned_state(inner)
    if sharded:  # the parameters are shards: each rank takes its part of the full values
        params = {
            n: tensors[n].to(t.dtype) for n, t in state.items() if isinstance(t, nn.Parameter)
        }
        distributed.load_full_state(inner, params)
        state = {n: t for n, t in state.items() if n not in params}
    with torch.no_grad():
        for n, t in state.items():
            src = tensors[n]
            if n == "unipelt.prefix.ejected":
                _root(inner).prefix.ejected = src.to(device=t.device, dtype=t.dtype)
            else:
                t.copy_(src.to(device=t.device, dtype=t.dtype))
    return model


# The file Trainer.resume_from_checkpoint loads with ``model.load_state_dict(strict=False)``.
HF_WEIGHTS = "model.safetensors"


def save_pretrained(
    model: nn.Module,
    save_directory: str,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    **kwargs,
) -> None:
    """``model.save_pretrained`` of a model with UniPELT applied (``apply_unipelt`` installs
    it on the model): the tuned tensors only, never the base model.

    Writes :func:`save_unipelt`'s files plus ``model.safetensors``: the same tensors under
    the same (state_dict) names, a hard link to ``unipelt.safetensors`` where the filesystem
    allows (else a copy). ``Trainer`` checkpoints go through here, and its
    ``resume_from_checkpoint`` loads ``model.safetensors`` with ``load_state_dict(strict=
    False)``: the tuned tensors come back, the frozen base stays as loaded. No
    ``config.json`` is written, so ``from_pretrained`` on the directory fails rather than
    building a model with untrained base weights; load with :func:`load_unipelt`.

    ``state_dict`` (what Trainer passes under FSDP's FULL_STATE_DICT): the full values to
    take the tuned tensors from, written by the main process with no communication.
    Without it, a model sharded with FSDP2 is gathered (every rank must call this).
    """
    if kwargs.get("push_to_hub"):
        raise NotImplementedError("save_pretrained(push_to_hub=True) of a UniPELT model")
    inner = getattr(model, "module", model)
    root = _root(inner)
    path = os.fspath(save_directory)
    names = list(tuned_state(inner))
    if state_dict is not None:
        missing = [n for n in names if n not in state_dict]
        if missing:
            raise ValueError(f"save_pretrained: state_dict lacks the tuned tensors {missing[:5]}")
        if is_main_process:
            state = {n: state_dict[n].detach().contiguous().cpu() for n in names}
            _write(root, state, path)
            _link_hf_weights(path)
        return
    if distributed.is_sharded(inner):
        save_unipelt(inner, path)
        distributed.write_on_rank0(inner, lambda: _link_hf_weights(path))
    elif is_main_process:
        save_unipelt(inner, path)
        _link_hf_weights(path)


def _link_hf_weights(path: str) -> None:
    src, dst = os.path.join(path, WEIGHTS), os.path.join(path, HF_WEIGHTS)
    if os.path.lexists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (some network filesystems): a copy
        import shutil

        shutil.copyfile(src, dst)
