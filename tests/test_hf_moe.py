"""Adapters on MoE blocks (Mixtral, Qwen3-MoE, gpt-oss) and on the other pre-LN decoders of
tests/hf_families.py, against the placement formulas written out here on the untouched
base model. gpt-oss's MLP returns (hidden, router scores): the adapter acts on the hidden
states and the router output passes through. (gpt-oss's prefix, with its attention sinks,
is tested in tests/test_attention_contract.py; here prefix=False.)"""

import pytest
import torch
import torch.nn as nn

import unipelt_fast as up
from tests.hf_families import tiny, tiny_batch
from tests.hf_tiny import formula_adapter as _adapter
from tests.hf_tiny import perturb_params as _perturb
from tests.hf_tiny import reference_run
from unipelt_fast.hf.wrappers import AdapterWrapper


def _with(out, fn):
    """Apply fn to a block output's hidden states, keeping a tuple's other elements."""
    return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _reference_hooks(base, placement, adapters):
    """The placement's formula on the base model's pre-LN layers (x: the FFN block's input on
    the residual stream, h: the MLP's hidden output): block_output x + h + a(x + h),
    ffn_output x + h + a(h), ffn_parallel x + h + a(x); attn_and_ffn_output also o + a(o)
    on the attention output o."""
    it = iter(adapters)
    handles = []
    for blk in base.model.layers:
        if placement == "attn_and_ffn_output":
            ad = next(it)
            handles.append(
                blk.self_attn.register_forward_hook(
                    lambda m, a, out, ad=ad: _with(out, lambda o: o + _adapter(o, ad))
                )
            )
        ad = next(it)
        if placement in ("ffn_output", "attn_and_ffn_output"):
            handles.append(
                blk.mlp.register_forward_hook(
                    lambda m, a, out, ad=ad: _with(out, lambda h: h + _adapter(h, ad))
                )
            )
        elif placement == "block_output":
            handles.append(
                blk.register_forward_hook(
                    lambda m, a, out, ad=ad: _with(out, lambda s: s + _adapter(s, ad))
                )
            )
        else:  # ffn_parallel: x is the pre-FFN norm's input
            seen = {}
            handles.append(
                blk.post_attention_layernorm.register_forward_pre_hook(
                    lambda m, a, seen=seen: seen.update(x=a[0])
                )
            )
            handles.append(
                blk.mlp.register_forward_hook(
                    lambda m, a, out, ad=ad, seen=seen: _with(
                        out, lambda h: h + _adapter(seen["x"], ad)
                    )
                )
            )
    assert next(it, None) is None, "the applied model has more adapters than the reference"
    return handles


def _loss(model, b):
    logits = model(**b).logits
    return logits, (logits * torch.linspace(-1, 1, logits.shape[-1])).sum()


CASES = [
    ("gpt_oss", "block_output"),
    ("gpt_oss", "ffn_output"),
    ("gpt_oss", "attn_and_ffn_output"),
    ("mixtral", "block_output"),
    ("qwen3_moe", "ffn_parallel"),
    ("qwen3_moe", "attn_and_ffn_output"),
    ("gemma2", "ffn_output"),
    ("olmo2", "attn_and_ffn_output"),
    ("gemma3_text", "ffn_output"),
    ("qwen3", "block_output"),
    # the other pre-LN decoders, one placement each (support table: tests/support_matrix.py)
    ("mistral", "ffn_parallel"),
    ("qwen2", "block_output"),
    ("gemma", "block_output"),
    ("olmo", "ffn_parallel"),
    ("granite", "block_output"),  # residual_multiplier 1.0 (other values: refused below)
    ("stablelm", "block_output"),
    ("smollm3", "ffn_parallel"),
]


@pytest.mark.parametrize("kind,placement", CASES)
def test_adapter_on_block_matches_formula(kind, placement):
    cfg = up.UniPELTConfig(
        bitfit=False,
        prefix=False,
        gate_mode="mean",
        adapter=up.AdapterConfig(bottleneck=8, placement=placement, gate=True),
    )
    m = up.apply_unipelt(tiny(kind), cfg, backend="eager")
    adapters = [mod for mod in m.modules() if isinstance(mod, up.GatedAdapter)]
    params = [p for ad in adapters for p in ad.parameters()]
    _perturb(params)
    b = tiny_batch(kind)

    base = tiny(kind)
    handles = _reference_hooks(base, placement, adapters)
    want, want_g = reference_run(lambda mod: _loss(mod, b), base, handles, params)

    got, loss = _loss(m, b)
    loss.backward()
    real = b["attention_mask"].bool()
    assert (got[real] - want[real]).norm() <= 1e-5 * want[real].norm()
    for p, g in zip(params, want_g, strict=True):
        assert (p.grad - g).norm() <= 1e-5 * g.norm() + 1e-12
    with torch.no_grad():  # the adapters matter
        assert (got - base(**b).logits)[real].abs().max() > 1e-3


def test_wrapped_tuple_keeps_its_other_elements():
    """AdapterWrapper on a block returning (hidden, extra): same extra object back."""
    extra = torch.randn(3)

    class Block(nn.Module):
        def forward(self, x):
            return x * 2, extra

    ad = up.GatedAdapter(8, 4, gate=False, gate_mode="mean", backend="eager")
    _perturb(list(ad.parameters()))
    w = AdapterWrapper(Block(), nn.ModuleList([ad]))
    x = torch.randn(2, 5, 8)
    out = w(x)
    assert isinstance(out, tuple) and len(out) == 2 and out[1] is extra
    torch.testing.assert_close(out[0], 2 * x + _adapter(2 * x, ad))


@pytest.mark.parametrize(
    "kind,config,what",
    [
        ("gemma2", {}, "post_feedforward_layernorm"),
        ("gemma3_text", {}, "post_feedforward_layernorm"),
        ("olmo2", {}, "post_feedforward_layernorm"),
        ("granite", {"residual_multiplier": 0.25}, "residual_multiplier=0.25"),
    ],
)
@pytest.mark.parametrize("placement", ("block_output", "ffn_parallel"))
def test_placements_refused_where_the_block_changes_the_ffn_output(kind, config, what, placement):
    """Sandwich/post norms and residual multipliers: the block does not add the FFN's output
    itself to the residual stream, so these placements are refused (model left as it was)."""
    model = tiny(kind, **config)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    cfg = up.UniPELTConfig(prefix=False, adapter=up.AdapterConfig(placement=placement))
    with pytest.raises(NotImplementedError, match=f"{what}.*placement='ffn_output'"):
        up.apply_unipelt(model, cfg, backend="eager")
    assert not hasattr(model, "unipelt")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
