"""Fine-tune with UniPELT on a model sharded with FSDP2 (``fully_shard``), launched by torchrun.

    torchrun --nproc_per_node 2 examples/finetune_fsdp.py [--steps 20] [--out ckpt]

One process per GPU (NCCL, bf16 compute with fp32 gradient reduction), or, without GPUs, per
CPU process (gloo, fp32): the CPU run is what tests/test_hf_fsdp.py checks against one
process. No downloads: a tiny LLaMA built from a config and a synthetic two-task
classification task; swap ``build()`` for ``from_pretrained`` on a real model.

The order matters: ``apply_unipelt`` (and ``load_unipelt`` to resume) on the plain model,
then ``fully_shard`` each decoder layer and the root. ``save_unipelt`` is called on every
rank: the tuned tensors are gathered, rank 0 writes the same files as a one-process save.
Multi-node: the same script with torchrun's ``--nnodes/--node_rank/--rdzv_endpoint``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import transformers as tf
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import unipelt_fast as up


def build() -> torch.nn.Module:
    cfg = tf.LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        num_labels=2,
        pad_token_id=0,
    )
    return tf.LlamaForSequenceClassification(cfg)


def make_batch(n: int, gen: torch.Generator) -> dict:
    """Task "copy": the first token's parity; task "count": whether token 7 occurs."""
    ids = torch.randint(1, 32, (n, 12), generator=gen)
    task = torch.randint(0, 2, (n,), generator=gen)
    labels = torch.where(task == 0, ids[:, 0] % 2, (ids == 7).any(1).long())
    return {"input_ids": ids, "labels": labels, "task_ids": task}


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16, help="global batch, split over the ranks")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default="unipelt_fsdp_ckpt")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if cuda else "cpu")
    try:
        torch.manual_seed(0)  # the same base and the same UniPELT init on every rank
        cfg = up.UniPELTConfig(lora=True, tasks=("copy", "count"), modules_to_save=("score",))
        model = up.apply_unipelt(build(), cfg, backend=args.backend).to(device)
        if rank == 0:
            print(up.trainable_report(model))

        # bf16 compute, fp32 master weights and gradient reduction (GPU); fp32 on CPU
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kw = {"mp_policy": mp} if cuda else {}
        for layer in model.model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)

        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        gen = torch.Generator().manual_seed(1)  # the same global batches on every rank
        model.train()
        for step in range(args.steps):
            b = make_batch(args.batch, gen)
            mine = {k: v[rank::world].to(device) for k, v in b.items()}  # this rank's rows
            loss = model(**mine).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            seen = loss.detach().float()
            dist.all_reduce(seen)
            if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
                print(f"step {step:3d}  loss {float(seen) / world:.4f}")

        up.save_unipelt(model, args.out)  # every rank: gathered, rank 0 writes
        if rank == 0:
            print(f"saved the tuned tensors to {args.out}/")
        return float(seen) / world
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
