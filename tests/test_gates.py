"""gate_report / plot_gates: the reported gate values equal the gate modules' own values,
computed here independently (sigmoid(Linear(h)) from inputs captured by the test's own
hooks, aggregated over real tokens by hand)."""

from __future__ import annotations

import re
import sys

import pytest
import torch

import unipelt_fast as up
from tests.hf_tiny import ADAPTER, batch, perturb, tiny_model
from unipelt_fast.hf.placements import ADAPTER_HOSTS
from unipelt_fast.lora import GatedLoRA


def _model(kind: str, gate_mode: str):
    m = tiny_model(kind)
    cfg = up.UniPELTConfig(
        adapter=ADAPTER, lora=True, prompt=True, tasks=("a", "b"), gate_mode=gate_mode
    )
    up.apply_unipelt(m, cfg, backend="eager")
    perturb(m)  # gates off their init, different per task
    return m


def _layer(name: str) -> int:
    return int(re.search(r"\.(\d+)\.", "." + name + ".").group(1))


def _expected(m, b, task_ids):
    """(task index, layer or None, method) -> the list of gate values, from the test's own
    hooks: each gate's input is captured and its value recomputed from the weights."""
    got: dict = {}
    mode = m.unipelt.cfg.gate_mode
    handles = []

    def add(key, v):
        got.setdefault(key, []).append(v.reshape(-1))

    def summarise(h, w, bias, mask, per_token):
        s = torch.sigmoid(h.float() @ w.float().T + bias.float())[..., 0]  # (B, L)
        if per_token:
            return s[mask] if mask is not None else s.reshape(-1)
        if mask is None or mode == "mean":
            return s.mean(1)
        mf = mask.float()
        return (s * mf).sum(1) / mf.sum(1).clamp_min(1)

    def gate_hook(key, per_token, prefix=False):
        def hook(mod, args, kwargs):
            h = args[0]
            mask = args[1] if len(args) > 1 else kwargs.get("mask")
            if prefix:
                v = summarise(h, mod.proj.weight, mod.proj.bias, mask, False)
                add((*key, "prefix_key"), v)
                add((*key, "prefix_value"), v)
            else:
                add((*key, "lora" if key[1] is not None else "prompt"),
                    summarise(h, mod.proj.weight, mod.proj.bias, mask, per_token))  # fmt: skip

        return hook

    def adapter_hook(key):
        def hook(mod, args, kwargs):
            x, mask = args[0], kwargs.get("mask")
            per_token = mod.gate_mode == "token"
            add((*key, "adapter"), summarise(x, mod.gate.weight, mod.gate.bias, mask, per_token))

        return hook

    root = m.unipelt

    def lora_hook(key, units):
        def hook(mod, args, kwargs):  # the LoRA's gate runs inside the fused op
            x = args[0]
            g = units[key[0]].gate
            add((*key, "lora"), summarise(x, g.proj.weight, g.proj.bias, root.mask_for(x),
                                          mode == "token"))  # fmt: skip

        return hook

    # Each task's examples alone, with no task ids: the per-task modules run themselves, so
    # their pre-hooks see every gate's input.
    for t in range(len(root.cfg.tasks)):
        idx = (task_ids == t).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        for layer, per_task in enumerate(root.prefix_gates):
            g = per_task[t]
            handles.append(
                g.register_forward_pre_hook(gate_hook((t, layer), False, True), with_kwargs=True)
            )
        g = root.prompt.gates[t]
        handles.append(g.register_forward_pre_hook(gate_hook((t, None), False), with_kwargs=True))
        for name, mod in m.named_modules():
            if isinstance(mod, ADAPTER_HOSTS):
                hook = adapter_hook((t, _layer(name)))
                handles.append(mod.adapters[t].register_forward_pre_hook(hook, with_kwargs=True))
            if isinstance(mod, GatedLoRA):
                hook = lora_hook((t, _layer(name)), mod.units)
                handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        up.set_active_task(m, t)
        try:
            with torch.no_grad():
                m(**{k: v[idx] for k, v in b.items()})
        finally:
            up.set_active_task(m, 0)
            for h in handles:
                h.remove()
            handles.clear()
    return {k: torch.cat(v) for k, v in got.items()}


@pytest.mark.parametrize("kind,gate_mode", [("gpt2", "token"), ("bert", "masked_mean")])
def test_gate_report_equals_the_gates_values(kind, gate_mode):
    m = _model(kind, gate_mode)
    b = batch(kind)
    tid = torch.tensor([1, 0, 1])
    want = _expected(m, b, tid)
    report = up.gate_report(m, **b, task_ids=tid)
    assert report.tasks == ("a", "b") and report.n_layers == 2
    assert len(want) == len(report.stats) == 2 * (2 * 4 + 1)  # tasks x (layers x 4 + prompt)
    for (t, layer, method), v in want.items():
        s = report.get(("a", "b")[t], layer, method)
        assert s is not None, (t, layer, method)
        assert s.n == v.numel()
        assert s.mean == pytest.approx(float(v.mean()), abs=1e-6)
        assert s.std == pytest.approx(float(v.std(correction=0)), abs=1e-6)
        assert (s.min, s.max) == pytest.approx((float(v.min()), float(v.max())), abs=1e-6)
    if gate_mode == "token":  # per real token: example 1 has 5 of 8 tokens (+ the prompt)
        P = m.unipelt.cfg.prompt.length
        assert report.get("a", 0, "adapter").n == 5 + P
        assert report.get("b", 0, "lora").n == 2 * (8 + P)
    # the two tasks' gates really differ, and a single-task batch reports that task only
    assert report.get("a", 1, "adapter").mean != report.get("b", 1, "adapter").mean
    only_b = up.gate_report(m, **{k: v[[0, 2]] for k, v in b.items()}, task_ids=["b", "b"])
    assert only_b.tasks == ("b",)
    assert only_b.get("b", 1, "adapter").mean == pytest.approx(
        report.get("b", 1, "adapter").mean, abs=1e-6
    )


def test_gate_report_restores_mode_and_leaves_no_hooks():
    m = _model("gpt2", "mean")
    m.train()
    n_hooks = sum(len(x._forward_hooks) for x in m.modules())
    rep = up.gate_report(m, **batch("gpt2"))
    assert m.training and sum(len(x._forward_hooks) for x in m.modules()) == n_hooks
    assert rep.tasks == ("a",)  # no task_ids: the active task
    text = str(rep)
    assert "task 'a'" in text and "prefix_key" in text and "input" in text
    d = rep.to_dict()
    assert {s["method"] for s in d["stats"]} == {
        "prefix_key",
        "prefix_value",
        "adapter",
        "lora",
        "prompt",
    }


def test_plot_gates(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    m = _model("bert", "masked_mean")
    rep = up.gate_report(m, **batch("bert"), task_ids=torch.tensor([0, 1, 1]))
    path = up.plot_gates(rep, str(tmp_path / "g.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TypeError, match="report must be a GateReport"):
        up.plot_gates({"a": 1}, str(tmp_path / "x.png"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'unipelt-fast\[bench\]'"):
        up.plot_gates(rep, str(tmp_path / "y.png"))


def test_gate_report_needs_an_applied_model():
    with pytest.raises(ValueError, match="apply_unipelt"):
        up.gate_report(tiny_model("gpt2"), **batch("gpt2"))
