"""The saving side of tests/test_atomic_save.py's kill test, imported once by the forkserver
(torch, transformers and the model are built before any fork, so each killed child costs a
fork, not an import).

States A and B: one tiny LLaMA (GQA) with LoRA, a prefix MLP 512 wide and adapters, whose
tuned tensors are filled with a constant (1.0 for A, 2.0 for B): a mix of A's and B's files
would show up as a tensor of the wrong constant.
"""

from __future__ import annotations

import os

import torch

torch.set_num_threads(1)  # forked children: no OpenMP pool to inherit

import transformers as tf  # noqa: E402

import unipelt_fast as up  # noqa: E402

CFG = up.UniPELTConfig(
    lora=True,
    tasks=("a", "b"),
    adapter=up.AdapterConfig(bottleneck=8),
    prefix=up.PrefixConfig(mlp_hidden=512),
)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    return up.apply_unipelt(tf.LlamaForCausalLM(cfg).eval(), CFG, backend="eager")


def fill(m: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.fill_(value)


MODEL = model()


def save_forever(path: str, started) -> None:  # noqa: ANN001 - a multiprocessing Event
    """Save A, B, A, B, ... into ``path`` until killed."""
    a = True
    while True:
        fill(MODEL, 1.0 if a else 2.0)
        up.save_unipelt(MODEL, path)
        started.set()
        a = not a


def save_peft_forever(path: str, started) -> None:  # noqa: ANN001
    """Same for save_peft: LoRA r=4 (A, all ones) and r=8 (B, all twos), so the two
    adapter_config.json differ and a mixed pair would not even load."""
    from unipelt_fast.interop import save_peft

    models = []
    for r, v in ((4, 1.0), (8, 2.0)):
        torch.manual_seed(0)
        base = tf.LlamaForCausalLM(MODEL.config)
        m = up.apply_unipelt(
            base,
            up.UniPELTConfig(
                lora=up.LoRAConfig(r=r, gate=False), prefix=None, adapter=None, bitfit=False
            ),
            backend="eager",
        )
        fill(m, v)
        models.append(m)
    i = 0
    while True:
        save_peft(models[i % 2], path)
        started.set()
        i += 1


if __name__ == "__main__":  # manual use: python -m tests.atomic_child DIR
    import multiprocessing as mp
    import sys

    save_forever(sys.argv[1], mp.Event())
    os._exit(0)
