"""Fine-tune a tiny model with UniPELT, end to end on CPU, in well under a minute.

No downloads: the model is built from a config and the data is synthetic. Two tasks share
one model: task "copy" classifies a sequence by its first token's parity, task "count" by
whether token 7 occurs in it. Each batch mixes both tasks (``task_ids``).

At the end it prints what the gates chose (``gate_report``) and, with matplotlib installed,
saves the heatmap (``plot_gates``) to ``--gates-png``.

    python examples/finetune_tiny.py [--steps 40] [--family bert|gpt2|llama] [--gates-png P]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import transformers as tf

import unipelt_fast as up


def build(family: str) -> torch.nn.Module:
    common = dict(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if family == "bert":
        cfg = tf.BertConfig(**common, intermediate_size=128, num_labels=2)
        return tf.BertForSequenceClassification(cfg)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=32, n_embd=64, n_layer=2, n_head=4, num_labels=2)
        cfg.pad_token_id = 0
        return tf.GPT2ForSequenceClassification(cfg)
    cfg = tf.LlamaConfig(
        **common, intermediate_size=128, num_key_value_heads=2, num_labels=2, pad_token_id=0
    )
    return tf.LlamaForSequenceClassification(cfg)


def make_batch(n: int, length: int, gen: torch.Generator) -> dict:
    ids = torch.randint(1, 32, (n, length), generator=gen)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0, right padding
    task = torch.randint(0, 2, (n,), generator=gen)
    parity = ids[:, 0] % 2
    has7 = ((ids == 7) & mask.bool()).any(1).long()
    labels = torch.where(task == 0, parity, has7)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_ids": task}


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--family", default="bert", choices=["bert", "gpt2", "llama"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--gates-png", default="gates.png", help="where plot_gates writes")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    model = build(args.family)
    cfg = up.UniPELTConfig(
        bitfit=True,
        adapter=True,
        prefix=True,
        lora=True,
        gate_mode="masked_mean",
        tasks=("copy", "count"),
    )
    up.apply_unipelt(model, cfg, backend=args.backend)
    print(up.trainable_report(model))

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    t0, first, avg = time.time(), None, None
    for step in range(1, args.steps + 1):
        loss = model(**make_batch(16, 10, gen)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        avg = loss.item() if avg is None else 0.9 * avg + 0.1 * loss.item()
        first = avg if first is None else first
        if step % 10 == 0 or step == 1:
            print(f"step {step:4d}  loss {avg:.4f}  ({time.time() - t0:.1f}s)")

    model.eval()
    report = up.gate_report(model, **make_batch(32, 10, gen))  # one no-grad forward
    print(report)
    try:
        print(f"wrote {up.plot_gates(report, args.gates_png)}")
    except ImportError as e:
        print(e)
    up.eject(model)  # inference: the prefix MLP becomes fixed K/V
    with tempfile.TemporaryDirectory() as d:
        up.save_unipelt(model, d)
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(f"saved UniPELT checkpoint: {size / 1024:.1f} KiB")
    print(f"loss {first:.4f} -> {avg:.4f}")
    return avg - first


if __name__ == "__main__":
    main()
