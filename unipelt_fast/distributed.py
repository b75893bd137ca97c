"""Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): gathering the tuned
tensors for a save, loading a checkpoint into the shards, and code that needs the full values.

The gathers and loads go through ``torch.distributed.checkpoint.state_dict``'s full-state API
(no sharding code of our own). Every function here is a collective on a sharded model: call it
on every rank. On an unsharded model (one process, DDP) nothing here communicates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

# torch's activation-checkpoint wrapper inserts this into parameter names; the canonical
# names (state_dict's, checkpoint files') leave it out, as torch.distributed.checkpoint does.
_CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."


def canonical_name(name: str) -> str:
    """``name`` without torch's activation-checkpoint wrapper prefix."""
    return name.replace(_CHECKPOINT_PREFIX, "")


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2 / tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def full_state(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The full (unsharded) CPU values of the state entries ``names`` (canonical names).

    Sharded: gathered with ``get_model_state_dict(full_state_dict=True, cpu_offload=True,
    ignore_frozen_params=True)``; rank 0 gets them, the other ranks an empty dict.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=opts)
    if _rank() != 0:
        return {}
    missing = [n for n in names if n not in state]
    if missing:
        raise RuntimeError(f"unipelt: the gathered state of the sharded model lacks {missing[:5]}")
    return {n: state[n].detach().contiguous() for n in names}


def load_full_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy full values (canonical names, every rank holding them) into a sharded model's
    parameters: each rank keeps its own shard (``set_model_state_dict(full_state_dict=True)``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=False)
    result = set_model_state_dict(model, dict(tensors), options=opts)
    if result.unexpected_keys:
        raise RuntimeError(
            f"unipelt: the sharded model has no {sorted(result.unexpected_keys)[:5]}"
        )


def write_on_rank0(model: nn.Module, write: Callable[[], None]) -> None:
    """Run ``write`` on rank 0 of a sharded model while the other ranks wait; every rank
    raises when it failed. Unsharded: run ``write`` here (the caller picks the rank)."""
    if not is_sharded(model):
        write()
        return
    import torch.distributed as dist

    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            write()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others hear of it
            failure = e
    outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(outcome, src=0)  # the other ranks wait here for rank 0
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise RuntimeError(f"unipelt: rank 0 failed to write the checkpoint ({outcome[0]})")


def _fsdp_owners(model: nn.Module, module: nn.Module) -> list[nn.Module]:
    """The FSDP modules whose parameter groups hold parameters of ``module``."""
    wanted = {id(p) for p in module.parameters()}
    owners = []
    for f in model.modules():
        if not _is_fsdp(f):
            continue
        nested = {id(p) for g in f.modules() if g is not f and _is_fsdp(g) for p in g.parameters()}
        if any(id(p) in wanted and id(p) not in nested for p in f.parameters()):
            owners.append(f)
    return owners


@contextlib.contextmanager
def unsharded(model: nn.Module, module: nn.Module) -> Iterator[None]:
    """Inside, ``module``'s parameters are the full tensors (FSDP2 ``unshard()`` of the groups
    that hold them, ``reshard()`` after). A no-op for an unsharded model."""
    owners = _fsdp_owners(model, module) if is_sharded(model) else []
    for f in owners:
        f.unshard()
    try:
        yield
    finally:
        for f in owners:
            f.reshard()
