"""UniPELT checkpoints: the tuned tensors (safetensors) + the config and model fingerprint (JSON).

``save_unipelt(model, path)`` writes ``path/unipelt-<sha256[:16]>.safetensors`` and then
``path/unipelt.json``, which names that weights file and holds its full SHA-256. Both writes
are crash-safe (:mod:`unipelt_fast._atomic`), and the JSON is replaced last, in one rename:
a save killed at any moment leaves the directory loading as the checkpoint that was there
before or as the new one, never an error and never a mix. Weights files no JSON names any
more are removed after the switch. Checkpoints of the previous format (``unipelt-fast/1``:
a fixed ``unipelt.safetensors``) still load.
``load_unipelt(model, path)`` validates everything (file integrity via SHA-256, model type,
sizes, config, tensor names/shapes/dtypes) before changing anything; on any mismatch it raises
:class:`UniPELTCheckpointError` and leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import torch
import torch.nn as nn

from . import _atomic, distributed
from .config import UniPELTConfig
from .hf import Snapshot, UniPELTRoot, apply_unipelt, eject, model_dims, root_of

FORMAT = "unipelt-fast/2"
READS = ("unipelt-fast/1", FORMAT)  # formats load_unipelt reads
META = "unipelt.json"
LEGACY_WEIGHTS = "unipelt.safetensors"  # unipelt-fast/1's fixed weights name
_WEIGHTS_NAME = re.compile(r"^unipelt-[0-9a-f]{16}\.safetensors$")


def weights_name(sha256: str) -> str:
    """The weights file name for content with this SHA-256 (hex)."""
    return f"unipelt-{sha256[:16]}.safetensors"


class UniPELTCheckpointError(ValueError):
    """A checkpoint that does not fit the model, or is corrupt."""


def tuned_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a UniPELT checkpoint holds: every trainable parameter, plus the ejected
    prefix buffer when there is one. Names are the state_dict's (no activation-checkpoint
    wrapper prefix); on a sharded model (FSDP2) the values are the local shards."""
    inner = getattr(model, "module", model)
    root = root_of(inner)
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


def checkpoint_contents(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """What :func:`save_unipelt` writes: the tuned tensors (full, contiguous, on the CPU) and
    the JSON metadata without the weights file's name and hash. On a model sharded with FSDP2
    the full tensors are gathered (every rank must call this; ranks other than 0 get none).
    ``state_dict``: full values to take the tuned tensors from instead (no communication)."""
    inner = getattr(model, "module", model)
    root = root_of(inner)
    names = list(tuned_state(inner))
    if state_dict is not None:
        missing = [n for n in names if n not in state_dict]
        if missing:
            raise ValueError(f"save_pretrained: state_dict lacks the tuned tensors {missing[:5]}")
        state = {n: state_dict[n].detach().contiguous().cpu() for n in names}
    elif distributed.is_sharded(inner):
        state = distributed.full_state(inner, names)  # {} off rank 0
    else:
        state = {n: t.detach().contiguous().cpu() for n, t in tuned_state(inner).items()}
    meta = {
        "format": FORMAT,
        "model_type": root.dims["model_type"],
        "dims": root.dims,
        "config": root.cfg.to_dict(),
        "ejected": bool(root.prefix is not None and root.prefix.is_ejected),
        "tensors": {n: [list(t.shape), str(t.dtype)] for n, t in state.items()},
    }
    return state, meta


def write_checkpoint(path: str, state: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a checkpoint directory crash-safely (see the module docstring for the order).
    Only one writer per directory at a time."""
    from safetensors.torch import save

    os.makedirs(path, exist_ok=True)
    blob = save(state)
    sha = hashlib.sha256(blob).hexdigest()
    name = weights_name(sha)
    # 1. the weights, under their content's name: the current JSON names another file (or
    #    this same content), so what loads now is untouched
    _atomic.write_bytes(os.path.join(path, name), blob)
    # 2. the switch: one rename makes the new pair the checkpoint
    text = json.dumps({**meta, "weights": name, "sha256": sha}, indent=1, sort_keys=True)
    _atomic.write_text(os.path.join(path, META), text + "\n")
    # 3. weights no JSON names any more, and temp files of killed saves
    for other in os.listdir(path):
        if other != name and (other == LEGACY_WEIGHTS or _WEIGHTS_NAME.match(other)):
            os.remove(os.path.join(path, other))
    _atomic.remove_stale_temps(path, "unipelt")


def save_unipelt(model: nn.Module, path: str) -> None:
    """Write the tuned parameters + config to the directory ``path`` (created if needed).
    Crash-safe: killed at any moment, ``path`` still loads as the old or the new checkpoint.

    On a model sharded with FSDP2 (``fully_shard``) call it on every rank: the full tuned
    tensors are gathered, rank 0 writes the same files as an unsharded save, the others wait.
    """
    inner = getattr(model, "module", model)
    state, meta = checkpoint_contents(inner)
    distributed.write_on_rank0(inner, lambda: write_checkpoint(path, state, meta))


def weights_path(path: str, meta: dict) -> str:
    """The weights file the checkpoint JSON ``meta`` (in directory ``path``) belongs with."""
    if meta.get("format") == "unipelt-fast/1":
        return os.path.join(path, LEGACY_WEIGHTS)
    name = meta.get("weights")
    if not isinstance(name, str) or not _WEIGHTS_NAME.match(name):
        raise UniPELTCheckpointError(
            f"UniPELT checkpoint: {os.path.join(path, META)} names no valid weights file "
            f"({name!r})"
        )
    return os.path.join(path, name)


def weights_file(path: str) -> str:
    """The weights file of the checkpoint directory ``path``: the one its JSON names."""
    with open(os.path.join(path, META)) as f:
        return weights_path(path, json.load(f))


def _read(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    mpath = os.path.join(path, META)
    if not os.path.isfile(mpath):
        raise UniPELTCheckpointError(f"UniPELT checkpoint: missing {mpath}")
    try:
        with open(mpath) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UniPELTCheckpointError(f"UniPELT checkpoint: {mpath} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") not in READS:
        raise UniPELTCheckpointError(
            f"UniPELT checkpoint: {mpath} is not a {' or '.join(READS)} file"
        )
    wpath = weights_path(path, meta)
    if not os.path.isfile(wpath):
        raise UniPELTCheckpointError(f"UniPELT checkpoint: missing {wpath}")
    sha = _sha256(wpath)
    if sha != meta.get("sha256") or (meta["format"] == FORMAT and wpath != os.path.join(
        path, weights_name(sha)
    )):
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
    dims = model_dims(config)
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
        snap = Snapshot(inner)
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
                root_of(inner).prefix.ejected = src.to(device=t.device, dtype=t.dtype)
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
    the same (state_dict) names, a hard link to the weights file ``unipelt.json`` names where
    the filesystem allows (else a copy). ``Trainer`` checkpoints go through here, and its
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
    path = os.fspath(save_directory)
    if state_dict is not None:  # full values given: the main process writes, no gathering
        if is_main_process:
            write_checkpoint(path, *checkpoint_contents(inner, state_dict))
            _link_hf_weights(path)
        return
    if distributed.is_sharded(inner):
        save_unipelt(inner, path)
        distributed.write_on_rank0(inner, lambda: _link_hf_weights(path))
    elif is_main_process:
        save_unipelt(inner, path)
        _link_hf_weights(path)


def _link_hf_weights(path: str) -> None:
    """``model.safetensors``: a hard link to the weights the checkpoint JSON names (a copy
    where the filesystem has no hard links), put in place by one rename (crash-safe)."""
    src = weights_file(path)
    dst = os.path.join(path, HF_WEIGHTS)
    tmp = _atomic.temp_name(dst)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (some network filesystems): a copy
        with open(src, "rb") as f:
            _atomic.write_bytes(dst, f.read())
        return
    os.replace(tmp, dst)
    _atomic.fsync_dir(path)
