"""Mixed-task routing in the HF wrappers: one fused call per wrapped module whatever the
tasks in the batch, and no host reads (``.item()``, ``bool``, ``.tolist()``, ``nonzero``,
``unique``) in the routing code after the model's entry."""

import os
import sys

import pytest
import torch

import unipelt_fast as up
from tests import convention_backend
from tests.hf_tiny import ADAPTER, batch, pelt
from unipelt_fast import _tasks
from unipelt_fast._args import GatedAdapterArgs
from unipelt_fast.hf.placements import ADAPTER_HOSTS
from unipelt_fast.lora import GatedLoRA

ops = convention_backend.op_module("gated_adapter")

TASKS = ("a", "b", "c", "d")
N = 4  # examples


def _cfg(gate_mode="token"):
    return up.UniPELTConfig(
        bitfit=False, lora=True, prompt=True, adapter=ADAPTER, gate_mode=gate_mode, tasks=TASKS
    )


def _logits(m, b, tid):
    return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], task_ids=tid).logits


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_one_fused_call_per_wrapped_module_whatever_the_tasks(kind, monkeypatch):
    convention_backend.install(monkeypatch)  # the custom-op path, with reference kernels
    m = pelt(kind, _cfg(), backend="triton")
    wrapped = sum(isinstance(x, (*ADAPTER_HOSTS, GatedLoRA)) for x in m.modules())
    assert wrapped > 0
    target = ops._gated_adapter_op
    calls = []

    def spy(*args):
        calls.append(GatedAdapterArgs(*args[:-1]).adapter_index)  # the fields, then backend
        return target(*args)

    monkeypatch.setattr(ops, "_gated_adapter_op", spy)
    b = batch(kind, n=N)
    for tid in ([2, 2, 2, 2], [0, 3, 0, 3], [3, 1, 0, 2]):  # 1, 2 and 4 tasks present
        calls.clear()
        _logits(m, b, torch.tensor(tid)).sum().backward()
        assert len(calls) == wrapped, (tid, len(calls), wrapped)
        assert all(c is not None and c.tolist() == tid for c in calls)
    calls.clear()
    _logits(m, b, None).sum().backward()  # one task for the batch: the unstacked weights
    assert len(calls) == wrapped and all(c is None for c in calls)


_ROUTING = tuple(
    os.path.join(os.path.dirname(up.__file__), f)
    for f in (
        "_tasks.py",
        "lora.py",
        "prompt.py",
        "hf/wrappers.py",
        "hf/placements.py",
        "hf/hooks.py",
        "hf/root.py",
    )
)


class HostReads:
    """Counts host reads issued directly by the routing code (the model-entry hook, which
    validates the task ids once, excepted)."""

    def __init__(self, monkeypatch):
        self.reads: list[str] = []
        for owner, name in [
            (torch.Tensor, "item"),
            (torch.Tensor, "__bool__"),
            (torch.Tensor, "__int__"),
            (torch.Tensor, "tolist"),
            (torch.Tensor, "nonzero"),
            (torch, "nonzero"),
            (torch, "unique"),
        ]:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name))

    def _wrap(self, fn, name):
        def counted(*args, **kwargs):
            caller = sys._getframe(1)
            path = caller.f_code.co_filename
            if path.startswith(_ROUTING) and caller.f_code.co_name != "model_pre_hook":
                self.reads.append(f"{name} in {os.path.basename(path)}:{caller.f_lineno}")
            return fn(*args, **kwargs)

        return counted


def test_no_host_reads_in_routing_llama_two_tasks(monkeypatch):
    cfg = up.UniPELTConfig(
        lora=True, prefix=True, prompt=True, adapter=ADAPTER, gate_mode="masked_mean",
        tasks=("a", "b"),
    )  # fmt: skip
    m = pelt("llama", cfg)
    b = batch("llama")
    tid = torch.tensor([1, 0, 1])
    counter = HostReads(monkeypatch)
    out = _logits(m, b, tid)
    out.float().pow(2).sum().backward()
    assert counter.reads == [], counter.reads
    # The counter does see the old per-task loop's reads (unique + tolist + nonzero per task).
    x = torch.randn(3, 2)
    _tasks.run_per_task(lambda t, idx: _tasks.select(x, idx), tid)
    assert len(counter.reads) >= 3, counter.reads
