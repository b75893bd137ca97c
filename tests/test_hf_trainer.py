"""HF Trainer on a UniPELT model (CPU, a few steps) and the end-to-end example script."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import unipelt_fast as up
from tests.hf_tiny import ADAPTER, batch, tiny_model


def test_hf_trainer_steps(tmp_path):
    pytest.importorskip("accelerate")  # Trainer needs it
    m = up.apply_unipelt(
        tiny_model("bert"), up.UniPELTConfig(lora=True, adapter=ADAPTER), backend="eager"
    )
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    tuned = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    trainer = _trainer(
        m, tmp_path, batch("bert", n=8), max_steps=3, logging_steps=1, save_strategy="no"
    )
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


def _trainer(model, out, b: dict, **kw):
    """A CPU Trainer on the 8 examples of ``b``, 4 a step at lr 1e-2; ``kw`` (the run's
    length, logging, saving) goes to TrainingArguments."""
    from transformers import Trainer, TrainingArguments

    data = [{k: v[i] for k, v in b.items()} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        **kw,
    )
    return Trainer(model=model, args=args, train_dataset=data)


def _resumable_trainer(model, out):
    """4 steps on unpadded llama rows, a checkpoint every 2, a fixed seed."""
    b = batch("llama", n=8, pad=False)
    kw = dict(max_steps=4, weight_decay=0.0, save_strategy="steps", save_steps=2, seed=3)
    return _trainer(model, out, b, **kw)


def _applied():
    cfg = up.UniPELTConfig(lora=True, adapter=ADAPTER, prompt=up.PromptConfig(length=2))
    return up.apply_unipelt(tiny_model("llama"), cfg, backend="eager")


def test_trainer_checkpoints_hold_tuned_tensors_and_resume_exactly(tmp_path):
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    base_bytes = sum(p.numel() * p.element_size() for p in tiny_model("llama").parameters())
    m = _applied()
    tuned_names = {n for n, p in m.named_parameters() if p.requires_grad}
    _resumable_trainer(m, tmp_path / "run").train()
    final = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}

    ckpt = tmp_path / "run" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    weights = Path(up.checkpoint.weights_file(str(ckpt)))
    assert {weights.name, "unipelt.json", "model.safetensors"} <= files, files
    assert "config.json" not in files  # from_pretrained(ckpt) must not build a random base
    assert load_file(ckpt / "model.safetensors").keys() == tuned_names
    assert (ckpt / "model.safetensors").stat().st_size < base_bytes / 2
    assert (ckpt / "model.safetensors").read_bytes() == weights.read_bytes()

    # a new process's view: a fresh model, resumed from step 2, ends where the run ended
    fresh = _applied()
    _resumable_trainer(fresh, tmp_path / "resumed").train(resume_from_checkpoint=str(ckpt))
    for n, p in fresh.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, final[n]), n
    # the step-2 checkpoint loads with load_unipelt too (it is a UniPELT checkpoint)
    step2 = up.load_unipelt(tiny_model("llama"), str(ckpt), backend="eager")
    moved = [
        n for n, p in step2.named_parameters() if p.requires_grad and not torch.equal(p, final[n])
    ]
    assert moved  # step 2's values, not the end of the run


def test_save_pretrained_writes_the_unipelt_files(tmp_path):
    m = _applied()
    m.save_pretrained(str(tmp_path / "hf"))
    up.save_unipelt(m, str(tmp_path / "up"))
    weights = Path(up.checkpoint.weights_file(str(tmp_path / "up"))).name
    for name in (weights, "unipelt.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "up" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == sorted(
        ["model.safetensors", "unipelt.json", weights]
    )


def test_save_pretrained_from_a_given_state_dict(tmp_path):
    """Trainer under FSDP's FULL_STATE_DICT passes the gathered full state on rank 0."""
    m = _applied()
    up.save_unipelt(m, str(tmp_path / "up"))
    full = {k: v.clone() for k, v in m.state_dict().items()}
    m.save_pretrained(str(tmp_path / "given"), state_dict=full)
    weights = Path(up.checkpoint.weights_file(str(tmp_path / "up"))).name
    for name in (weights, "unipelt.json"):
        assert (tmp_path / "given" / name).read_bytes() == (tmp_path / "up" / name).read_bytes()
    m.save_pretrained(str(tmp_path / "not_main"), state_dict=full, is_main_process=False)
    assert not (tmp_path / "not_main").exists()
    lora = next(k for k in full if ".A." in k)
    with pytest.raises(ValueError, match="lacks the tuned tensors"):
        m.save_pretrained(
            str(tmp_path / "bad"), state_dict={k: v for k, v in full.items() if k != lora}
        )
