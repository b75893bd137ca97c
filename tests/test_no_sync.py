"""No host synchronisation on the hot path.

A host read of a CUDA tensor (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``,
``nonzero``) waits for the GPU, so the CPU cannot run ahead, and it breaks CUDA-graph
capture. Two checks without a GPU:

- every op, forward and backward with every optional input, under torch's FakeTensorMode,
  where any data-dependent host read raises;
- the package's own host reads during one forward+backward of a tiny UniPELT model,
  counted by wrapping the reading methods of torch.Tensor.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import unipelt_fast as uf
from tests.hf_tiny import ADAPTER, batch, perturb, tiny_model
from tests.parity import (
    bias_only_linear_case,
    gated_adapter_case,
    prefix_attention_case,
)
from unipelt_fast import _validation

BACKENDS = ["eager", pytest.param("triton", marks=pytest.mark.interpreter)]


def _fwd_bwd(fn, case, backend) -> None:
    c = case.cast(torch.float32)
    out = c.call(fn, backend=backend)
    out.float().sum().backward()
    for name in c.diff:
        assert c.tensors([name])[0].grad is not None, name


CASES = {
    "prefix_attention": lambda: (
        uf.prefix_attention,
        prefix_attention_case(
            layout="indexed", gate="b2", mask=True, causal=True, noncontiguous=True
        ),
    ),
    "gated_adapter_mean": lambda: (
        uf.gated_adapter,
        gated_adapter_case(gate_mode="mean", masked=True, residual=True),
    ),
    "gated_adapter_token": lambda: (uf.gated_adapter, gated_adapter_case(gate_mode="token")),
    "bias_only_linear": lambda: (uf.bias_only_linear, bias_only_linear_case(activation="gelu")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [*CASES, "bias_only_layer_norm"])
def test_ops_under_fake_tensor_mode(name, backend):
    with FakeTensorMode():
        if name == "bias_only_layer_norm":
            x = torch.randn(2, 7, 24, requires_grad=True)
            w, b = torch.randn(24), torch.randn(24, requires_grad=True)
            uf.bias_only_layer_norm(x, w, b, eps=1e-5, backend=backend).sum().backward()
            assert x.grad is not None and b.grad is not None
            return
        fn, case = CASES[name]()
        _fwd_bwd(fn, case, backend)


def test_fake_tensor_mode_catches_a_host_read():
    """The check above can fail: the range check on real CPU tensors reads the host."""
    with FakeTensorMode():
        idx = torch.zeros(3, dtype=torch.long)
        with pytest.raises(Exception, match="(?i)data.dependent|local_scalar_dense|dynamic"):
            int(idx.max())


def test_index_range_is_checked_on_cpu_only_without_sync():
    """CPU (free to read): ValueError. Elsewhere the kernels clamp (see test_launch.py);
    UNIPELT_CHECK_INDEX=1 asks for the check anyway."""
    case = prefix_attention_case(layout="indexed", T=2, B=2)
    case.kwargs["prefix_index"] = torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"prefix_index values must lie in \[0, 2\)"):
        case.call(uf.prefix_attention)
    idx = torch.tensor([0, 2])
    assert _validation._range_readable(idx)
    with FakeTensorMode() as mode:
        assert not _validation._range_readable(mode.from_tensor(idx))


# ---- counting the package's own host reads ---------------------------------------------------

PKG = os.path.dirname(uf.__file__)
KERNELS = list(importlib.import_module("unipelt_fast.kernels").__path__)[0]  # a folder, no __init__
READS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__", "numpy")


class _Counter:
    def __init__(self, exclude: tuple[str, ...]):
        self.hits: list[str] = []
        self.exclude = exclude

    def wrap(self, name, orig):
        def reader(*args, **kwargs):
            f = sys._getframe(1)
            fn = f.f_code.co_filename
            ours = fn.startswith(PKG) or fn.startswith(KERNELS)
            if ours and not fn.endswith(self.exclude):
                self.hits.append(f"{os.path.relpath(fn, PKG)}:{f.f_lineno} {name}")
            return orig(*args, **kwargs)

        return reader


def _count_reads(monkeypatch, exclude, run) -> list[str]:
    c = _Counter(exclude)
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, c.wrap(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "nonzero", c.wrap("torch.nonzero", torch.nonzero))
    run()
    monkeypatch.undo()
    return c.hits


@pytest.mark.interpreter
@pytest.mark.parametrize("task_ids", [False, True], ids=["no_task_ids", "task_ids"])
def test_hf_forward_backward_reads_the_host_at_most_once(task_ids, monkeypatch):
    """One forward+backward of a tiny UniPELT LLaMA (prefix + adapter + gates + BitFit + LoRA,
    padded batch) on the triton backend. On CPU the prefix_index range check reads the
    index (free there); it is switched off to stand in for CUDA tensors, where it is skipped.
    With task_ids the batch holds a single task and _tasks.py (task routing, its own issue)
    is excluded: the one read allowed is the task_ids validation at the model's entry."""
    cfg = uf.UniPELTConfig(lora=True, adapter=ADAPTER, gate_mode="masked_mean", tasks=("a", "b"))
    m = uf.apply_unipelt(tiny_model("llama"), cfg, backend="triton")
    perturb(m)
    m.train()
    b = batch("llama")
    tid = torch.ones(b["input_ids"].shape[0], dtype=torch.long) if task_ids else None
    monkeypatch.setattr(_validation, "_range_readable", lambda t: False)

    def run():
        out = m(**b, task_ids=tid)
        out.loss.backward()

    hits = _count_reads(monkeypatch, ("_tasks.py",) if task_ids else (), run)
    assert len(hits) <= 1, hits
    assert m.unipelt.prefix.embedding.weight.grad is not None  # the backward ran


def test_read_counter_counts_package_reads(monkeypatch):
    """The counter sees a read made from the package (it is not blind)."""
    idx = torch.tensor([0, 1])
    hits = _count_reads(monkeypatch, (), lambda: _validation._check_index(idx, "i", "op", 2, 2))
    assert len(hits) == 2, hits  # int(min), int(max): CPU, readable


# ---- CUDA graphs ------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_graph_training_step_matches_eager():
    """A tiny UniPELT LLaMA's forward+backward captured in a CUDA graph: replaying it on
    new inputs (copied into the static batch) gives eager's loss and gradients. Any host
    sync inside the step would make the capture fail."""
    from unipelt_fast.testing import assert_close

    dev = torch.device("cuda")
    cfg = uf.UniPELTConfig(lora=True, adapter=ADAPTER, gate_mode="masked_mean")
    m = uf.apply_unipelt(tiny_model("llama"), cfg, backend="triton").to(dev)
    perturb(m)
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    batches = [{k: v.to(dev) for k, v in batch("llama", seed=s).items()} for s in (1, 2)]
    static = {k: v.clone() for k, v in batches[0].items()}

    def step(b):
        out = m(**b, use_cache=False)
        out.loss.backward()
        return out.loss

    def eager(b):
        m.zero_grad(set_to_none=True)
        loss = step(b).detach().clone()
        return loss, [None if p.grad is None else p.grad.clone() for p in params]

    expected = [eager(b) for b in batches]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: kernel compiles and allocator pools
        for _ in range(2):
            m.zero_grad(set_to_none=True)
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    m.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step(static)
    for b, (ref_loss, ref_grads) in zip(batches, expected, strict=True):
        for k in static:
            static[k].copy_(b[k])
        graph.replay()
        torch.cuda.synchronize()
        assert_close(loss, ref_loss, torch.float32, "loss")
        for p, g in zip(params, ref_grads, strict=True):
            assert_close(p.grad, g, torch.float32, "grad")


# ---- HF mask conversion: once per forward -----------------------------------------------------


class _Root:
    def __init__(self, mask2d):
        self.mask2d, self.mask_cache = mask2d, {}


def test_layer_masks_from_the_2d_mask_without_inspecting_the_4d(monkeypatch):
    from unipelt_fast.hf import masks

    calls = []
    monkeypatch.setattr(masks, "convert_mask", lambda *a: calls.append(a) or None)
    B, H, L, D = 2, 2, 5, 8
    q = torch.randn(B, H, L, D)
    m2 = torch.ones(B, L, dtype=torch.bool)
    m2[1, 3:] = False
    root = _Root(m2)
    four_d = torch.zeros(B, 1, L, L)  # never looked at
    for _ in range(3):  # three layers
        kpm, causal, k, _ = masks.layer_masks(root, four_d, True, q, q, q)
        assert torch.equal(kpm, m2) and causal and k is q
    assert not calls
    # beams: the batch is a multiple of the mask's
    q4 = torch.randn(2 * B, H, L, D)
    kpm, *_ = masks.layer_masks(root, None, True, q4, q4, q4)
    assert torch.equal(kpm, m2.repeat_interleave(2, 0))


def test_layer_masks_inspect_a_4d_mask_once_per_forward(monkeypatch):
    from unipelt_fast.hf import masks

    calls = []
    real = masks.convert_mask
    monkeypatch.setattr(masks, "convert_mask", lambda *a: calls.append(1) or real(*a))
    B, H, L, D = 2, 2, 5, 8
    q = torch.randn(B, H, L, D)
    vis = torch.ones(L, L, dtype=torch.bool).tril().expand(B, 1, L, L).clone()
    vis[1, :, :, 3:] = False
    # no 2-D mask / one that does not cover the keys (a sliding-window cache's dropped keys)
    for root in (_Root(None), _Root(torch.ones(B, L + 2, dtype=torch.bool))):
        calls.clear()
        for _ in range(3):  # three layers of one forward
            kpm, causal, _, _ = masks.layer_masks(root, vis, True, q, q, q)
        assert len(calls) == 1
        assert causal and torch.equal(kpm, vis[:, 0, -1])
        root.mask_cache = {}  # the next forward (the model pre-hook resets it)
        masks.layer_masks(root, vis, True, q, q, q)
        assert len(calls) == 2
