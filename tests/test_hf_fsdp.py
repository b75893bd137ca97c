"""FSDP2 (``fully_shard``): 2 gloo ranks on CPU against one process.

One spawn per scenario group (process start-up dominates the cost): the entry points
(save/load/eject/save_peft/gate_report/trainable_report) and training parity (fp32 with
activation checkpointing and mixed-task batches, bf16 MixedPrecisionPolicy, the triton backend
under the interpreter). The workers write files; the parent builds the same models in one
process and compares.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import unipelt_fast as up
from tests.hf_tiny import ADAPTER, batch, perturb, tiny_model

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

TASKS = ("a", "b")
TASK_IDS = torch.tensor([0, 1, 1, 0])  # each rank's half (rows r::2) holds both tasks
STEPS, LR = 3, 1e-2


def _full_cfg(**kw) -> up.UniPELTConfig:
    """Every method, gated, two tasks."""
    base = dict(lora=True, adapter=ADAPTER, prompt=up.PromptConfig(length=2), tasks=TASKS)
    return up.UniPELTConfig(**{**base, **kw})


def _model(kind: str, cfg: up.UniPELTConfig, backend: str = "eager", seed: int = 2):
    m = up.apply_unipelt(tiny_model(kind), cfg, backend=backend)
    perturb(m, seed=seed)
    return m


def _data(kind: str) -> dict:
    # no padding: every example has L tokens, so the mean of the ranks' mean losses is the
    # full batch's mean loss (what one process computes)
    return {**batch(kind, n=4, pad=False), "task_ids": TASK_IDS}


def _shard(model, *, checkpoint: bool = False, mp_policy=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mp_policy": mp_policy or MixedPrecisionPolicy()}
    layers = model.model.layers
    if checkpoint:  # a KV cache would grow again in the recompute (HF's own GC turns it off)
        model.config.use_cache = False
    for i, layer in enumerate(layers):
        if checkpoint:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                checkpoint_wrapper,
            )

            layer = checkpoint_wrapper(layer)
            layers[i] = layer
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _train(model, data: dict, rank: int | None, world: int = 2, steps: int = STEPS) -> list[float]:
    """STEPS AdamW steps; with ``rank``, on this rank's rows; returns the full-batch losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)  # no decay: an unused param stays
    part = data if rank is None else {k: v[rank::world] for k, v in data.items()}
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**part).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        seen = loss.detach().float().clone()
        if rank is not None:
            dist.all_reduce(seen)
            seen /= world
        losses.append(float(seen))
    return losses


def _entry_points(out: str) -> None:
    rank = dist.get_rank()
    data = _data("llama")
    m = _shard(_model("llama", _full_cfg()))
    up.save_unipelt(m, os.path.join(out, "saved"))
    report = up.trainable_report(m)
    gates = up.gate_report(m, **data)
    if rank == 0:
        with open(os.path.join(out, "reports.json"), "w") as f:
            json.dump(
                {"trainable": report, "gates": {str(k): v.mean for k, v in gates.stats.items()}}, f
            )
    # load into a sharded model (other tuned values), and into a plain one before sharding
    after = _shard(_model("llama", _full_cfg(), seed=7))
    up.load_unipelt(after, os.path.join(out, "saved"))
    up.save_unipelt(after, os.path.join(out, "loaded_after"))
    before = up.load_unipelt(tiny_model("llama"), os.path.join(out, "saved"), backend="eager")
    up.save_unipelt(_shard(before), os.path.join(out, "loaded_before"))
    up.eject(m)
    up.save_unipelt(m, os.path.join(out, "ejected"))
    for method, cfg in _peft_cfgs().items():
        up.save_peft(_shard(_model("llama", cfg)), os.path.join(out, f"peft_{method}"))


def _peft_cfgs() -> dict[str, up.UniPELTConfig]:
    ungated = dict(bitfit=False, adapter=None, prefix=None)
    return {
        "lora": up.UniPELTConfig(**ungated, lora=up.LoRAConfig(gate=False)),
        "prefix": up.UniPELTConfig(
            **{**ungated, "prefix": up.PrefixConfig(length=3, gate=False, positions="after_prefix")}
        ),
    }


def _scenarios() -> dict[str, dict]:
    return {
        # qwen2: LLaMA with q/k/v biases, so BitFit trains too; layers under checkpoint_wrapper
        "fp32_ac_tasks": dict(kind="qwen2", cfg=_full_cfg(), checkpoint=True),
        "bf16_mp": dict(kind="llama", cfg=_full_cfg(tasks=("default",)), mp=True),
        # the triton kernels under the interpreter are slow: 2 steps, and the parent's
        # one-process reference is eager (the kernels' own tests hold them to eager)
        "triton": dict(kind="llama", cfg=_full_cfg(), backend="triton", steps=2),
    }


def _training(out: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    for name, sc in _scenarios().items():
        policy = None
        if sc.get("mp"):
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        m = _model(sc["kind"], sc["cfg"], sc.get("backend", "eager"))
        m = _shard(m, checkpoint=sc.get("checkpoint", False), mp_policy=policy)
        data = _data(sc["kind"])
        if len(sc["cfg"].tasks) == 1:
            data.pop("task_ids")
        losses = _train(m, data, dist.get_rank(), steps=sc.get("steps", STEPS))
        up.save_unipelt(m, os.path.join(out, name))
        if dist.get_rank() == 0:
            with open(os.path.join(out, name, "losses.json"), "w") as f:
                json.dump(losses, f)


def _worker(rank: int, world: int, port: int, group: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        {"entry_points": _entry_points, "training": _training}[group](out)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as in test_hf_ddp.py: skip interpreter teardown; the results are on disk


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(group: str, out, limit: float = 240) -> None:
    ctx = mp.start_processes(
        _worker, args=(2, _free_port(), group, str(out)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + limit
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"FSDP workers ({group}) did not finish in {limit:.0f} s")


def _same_checkpoint(a, b) -> None:
    """Byte-equal tensor files (so the same names, dtypes, shapes and values)."""
    fa, fb = (Path(up.checkpoint.weights_file(str(p))) for p in (a, b))
    assert fa.read_bytes() == fb.read_bytes(), (a, b)
    ma, mb = (json.loads((p / up.checkpoint.META).read_text()) for p in (a, b))
    assert ma == mb


def test_fsdp2_entry_points(tmp_path):
    _spawn("entry_points", tmp_path)
    data = _data("llama")
    single = _model("llama", _full_cfg())
    up.save_unipelt(single, tmp_path / "single")
    _same_checkpoint(tmp_path / "saved", tmp_path / "single")
    _same_checkpoint(tmp_path / "loaded_after", tmp_path / "single")
    _same_checkpoint(tmp_path / "loaded_before", tmp_path / "single")
    reports = json.loads((tmp_path / "reports.json").read_text())
    assert reports["trainable"] == up.trainable_report(single)
    gates = {str(k): v.mean for k, v in up.gate_report(single, **data).stats.items()}
    assert reports["gates"].keys() == gates.keys() and gates
    for k in gates:
        assert reports["gates"][k] == pytest.approx(gates[k], rel=1e-5, abs=1e-6), k
    up.eject(single)
    up.save_unipelt(single, tmp_path / "single_ejected")
    _same_checkpoint(tmp_path / "ejected", tmp_path / "single_ejected")
    from safetensors.torch import load_file

    for method, cfg in _peft_cfgs().items():
        up.save_peft(_model("llama", cfg), tmp_path / f"single_peft_{method}")
        got = load_file(tmp_path / f"peft_{method}" / "adapter_model.safetensors")
        want = load_file(tmp_path / f"single_peft_{method}" / "adapter_model.safetensors")
        assert got.keys() == want.keys() and want, method
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)


def _tuned(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(up.checkpoint.weights_file(str(path)))


def test_fsdp2_training_matches_one_process(tmp_path):
    _spawn("training", tmp_path)
    for name, sc in _scenarios().items():
        m = _model(sc["kind"], sc["cfg"])  # eager: the reference for every backend
        start = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        data = _data(sc["kind"])
        if len(sc["cfg"].tasks) == 1:
            data.pop("task_ids")
        if sc.get("checkpoint"):
            m.gradient_checkpointing_enable({"use_reentrant": False})
        losses = _train(m, data, None, steps=sc.get("steps", STEPS))
        up.save_unipelt(m, tmp_path / f"{name}_single")
        got_losses = json.loads((tmp_path / name / "losses.json").read_text())
        got, want = _tuned(tmp_path / name), _tuned(tmp_path / f"{name}_single")
        assert got.keys() == want.keys(), name
        if sc.get("mp"):
            # bf16 compute (fp32 master weights, fp32 gradient reduction) against fp32: the
            # losses agree to bf16 precision, the updates (tuned - start) to 10% by norm (3 Adam
            # steps: bf16 rounding flips the sign of some tiny gradients; measured 5.4%)
            assert got_losses == pytest.approx(losses, rel=2e-2), name
            num = sum(((got[k] - want[k]).double() ** 2).sum() for k in want)
            den = sum(((want[k] - start[k]).double() ** 2).sum() for k in want)
            assert (num / den).sqrt() < 0.1, (name, float((num / den).sqrt()))
        else:
            assert got_losses == pytest.approx(losses, rel=1e-5), name
            # eager: as one process to rounding. triton against the eager reference: Adam
            # divides by sqrt(v), so a near-zero gradient turns the kernels' rounding into up
            # to ~1% of a step (lr 1e-2); measured 3e-5
            atol = 1e-4 if sc.get("backend") == "triton" else 2e-6
            for k in want:
                torch.testing.assert_close(
                    got[k],
                    want[k],
                    rtol=1e-4,
                    atol=atol,
                    msg=lambda e, k=f"{name} {k}": f"{k}: {e}",
                )
        moved = [k for k in want if not torch.equal(want[k], start[k])]
        assert len(moved) == len(want), (name, sorted(set(want) - set(moved))[:5])
