"""HF Trainer on a UniPELT model (CPU, a few steps) and the end-to-end example script."""

import importlib.util
import os

import pytest
import torch

import unipelt_fast as up
from tests.hf_tiny import ADAPTER, batch, tiny_model


def test_hf_trainer_steps(tmp_path):
    pytest.importorskip("accelerate")  # Trainer needs it
    from transformers import Trainer, TrainingArguments

    m = up.apply_unipelt(
        tiny_model("bert"), up.UniPELTConfig(lora=True, adapter=ADAPTER), backend="eager"
    )
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    tuned = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    b = batch("bert", n=8)
    data = [{k: v[i] for k, v in b.items()} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=m, args=args, train_dataset=data)
    out = trainer.train()
    assert out.global_step == 3 and out.training_loss > 0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    moved = [n for n, p in m.named_parameters() if n in tuned and not torch.equal(p, tuned[n])]
    assert any("prefix" in n for n in moved) and any("adapters" in n for n in moved)


def test_example_script_loss_goes_down(tmp_path, capsys):
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "finetune_tiny.py")
    spec = importlib.util.spec_from_file_location("finetune_tiny", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    png = tmp_path / "gates.png"
    argv = ["--steps", "25", "--family", "llama", "--backend", "eager", "--gates-png", str(png)]
    assert mod.main(argv) < 0
    out = capsys.readouterr().out
    assert "task 'copy'" in out and "task 'count'" in out  # the gate report
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
