"""A copied model is the same model (issue 28): ``copy.deepcopy`` of an applied model, of
every family and placement, gives identical outputs and gradients (with gradient
checkpointing too), training the copy leaves the original untouched, and whole-model
pickling (``torch.save(model)``) round-trips, also into a process that never applied."""

import copy
import functools
import io
import pickle
import types

import pytest
import torch

import unipelt_fast as up
from tests.hf_tiny import bart_batch, batch, perturb, tiny_bart, tiny_model
from unipelt_fast.hf import attention as hf_attention
from unipelt_fast.hf.root import Site

ENCDEC = ("bart", "mbart", "t5")


def _adapter(placement: str) -> up.AdapterConfig:
    return up.AdapterConfig(bottleneck=8, placement=placement)


# (kind, UniPELTConfig fields): every family, every wrapper and hook kind, prefix (gated),
# LoRA, the soft prompt, BitFit, two tasks (the batches mix them)
CASES = {
    "llama-block_output-prompt": ("llama", dict(prompt=True, adapter=_adapter("block_output"))),
    "gpt2-ffn_parallel": ("gpt2", dict(adapter=_adapter("ffn_parallel"))),
    "bert-block_output-prompt": ("bert", dict(prompt=True, adapter=_adapter("block_output"))),
    "roberta-attn_and_ffn_output": ("roberta", dict(adapter=_adapter("attn_and_ffn_output"))),
    "bart-ffn_parallel": ("bart", dict(adapter=_adapter("ffn_parallel"))),  # post-LN
    "mbart-ffn_parallel": ("mbart", dict(adapter=_adapter("ffn_parallel"))),  # pre-LN hook
    "t5-block_output": ("t5", dict(adapter=_adapter("block_output"))),  # position bias
}


def _model(case: str):
    kind, fields = CASES[case]
    cfg = up.UniPELTConfig(lora=True, gate_mode="masked_mean", tasks=("a", "b"), **fields)
    base = tiny_bart(0, kind) if kind in ENCDEC else tiny_model(kind)
    m = up.apply_unipelt(base, cfg, backend="eager")
    perturb(m)
    return m


def _batch(case: str) -> dict:
    kind = CASES[case][0]
    return bart_batch() if kind in ENCDEC else batch(kind)


def _run(model, b: dict, tid: torch.Tensor):
    """Logits and the trainable parameters' gradients of one forward/backward."""
    model.zero_grad(set_to_none=True)
    out = model(**b, task_ids=tid)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def _same(got, want, exact: bool = True) -> None:
    (lg, gg), (lw, gw) = got, want
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lg, lw, **tol)
    assert gg.keys() == gw.keys()
    for n in gw:
        torch.testing.assert_close(gg[n], gw[n], **tol, msg=n)


def _n_hooks(model) -> int:
    return sum(len(x._forward_pre_hooks) + len(x._forward_hooks) for x in model.modules())


def _referenced(obj, depth: int = 0):
    """The objects a hook, forward override or Site reaches (partials, bound methods,
    closures), so a test can name one that points into another model."""
    if depth > 4:
        return
    yield obj
    if isinstance(obj, functools.partial):
        for o in (obj.func, *obj.args, *obj.keywords.values()):
            yield from _referenced(o, depth + 1)
    elif isinstance(obj, types.MethodType):
        yield from _referenced(obj.__self__, depth + 1)
    elif isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            yield from _referenced(cell.cell_contents, depth + 1)
    elif isinstance(obj, Site):
        yield obj.root


def _assert_no_link(copy_model, original) -> None:
    """No hook, Site or forward override of the copy reaches a module of the original."""
    theirs = {id(m) for m in original.modules()}
    for name, mod in copy_model.named_modules():
        held = [*mod._forward_pre_hooks.values(), *mod._forward_hooks.values()]
        held += [v for v in vars(mod).values() if callable(v) or isinstance(v, Site)]
        for h in held:
            bad = [o for o in _referenced(h) if id(o) in theirs]
            assert not bad, f"{name or 'model'}: {h!r} reaches the original's {bad[0]!r}"[:400]
    assert all(s.root is copy_model.unipelt for s in copy_model.unipelt.sites)


@pytest.mark.parametrize("case", list(CASES))
def test_deepcopy_is_the_same_model(case):
    m = _model(case)
    b = _batch(case)
    tid = torch.tensor([1, 0, 1])
    c = copy.deepcopy(m)
    _assert_no_link(c, m)
    want = _run(m, b, tid)
    with torch.no_grad():  # leaves other per-forward state on the original
        m(**b, task_ids=1 - tid)
    _same(_run(c, b, tid), want)

    # gradient checkpointing enabled on the copy, and a copy of a checkpointing model
    c.train()
    reentrant = case.startswith(("gpt2", "bart", "bert"))
    c.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    _same(_run(c, b, tid), want, exact=False)
    c2 = copy.deepcopy(c)
    _assert_no_link(c2, c)
    _same(_run(c2, b, tid), want, exact=False)

    # training the copy leaves the original as it was
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in c.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        c(**b, task_ids=tid).loss.backward()
        opt.step()
    now = dict(m.named_parameters())
    assert all(torch.equal(now[n], t) for n, t in before.items())
    assert any(not torch.equal(p, before[n]) for n, p in c.named_parameters() if p.requires_grad)
    m.eval()
    _same(_run(m, b, tid), want)

    # the copy's hook handles are its own: removing them leaves the original's
    before = _n_hooks(m)
    c.unipelt.remove_hooks()
    assert _n_hooks(m) == before > 0


@pytest.mark.parametrize(
    "case", ["llama-block_output-prompt", "bert-block_output-prompt", "t5-block_output"]
)
def test_whole_model_pickle_round_trips(case, monkeypatch):
    from transformers.modeling_utils import AttentionInterface

    m = _model(case)
    b = _batch(case)
    tid = torch.tensor([0, 1, 1])
    want = _run(m, b, tid)  # leaves per-forward state behind: not pickled
    buf = io.BytesIO()
    torch.save(m, buf)
    pickle.loads(pickle.dumps(m))
    # as in a fresh process: the "unipelt" attention function is not registered yet
    monkeypatch.delitem(AttentionInterface._global_mapping, hf_attention.ATTN_NAME)
    monkeypatch.setattr(hf_attention, "_registered", False)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert hf_attention.ATTN_NAME in AttentionInterface._global_mapping
    _assert_no_link(loaded, m)
    _same(_run(loaded, b, tid), want)
