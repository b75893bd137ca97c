"""Adapters on MoE blocks (Mixtral, Qwen3-MoE, gpt-oss) and on the other pre-LN decoders of
tests/hf_families.py, against the placement formulas written out here on the untouched
base model. gpt-oss's MLP returns (hidden, router scores): the adapter acts on the hidden
states and the router output passes through. (gpt-oss's prefix, with its attention sinks,
is tested in tests/test_attention_contract.py; here prefix=False.)"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unipelt_fast as up
from tests.hf_families import tiny, tiny_batch
from tests.hf_tiny import checkpointing_grads, reference_run
from tests.hf_tiny import formula_adapter as _adapter
from tests.hf_tiny import perturb_params as _perturb
from unipelt_fast.hf.wrappers import AdapterWrapper


def _with(out, fn):
    """Apply fn to a block output's hidden states, keeping a tuple's other elements."""
    return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _x_in(args, kwargs):
    return kwargs.get("hidden_states", args[0] if args else None)


def _ln(norm, z):
    """``norm(z)`` by its formula (a hook cannot call the module it hooks)."""
    return F.layer_norm(z, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


# Per family, from its modeling code: the layers, and in each the attention module, the FFN
# output module, the pre-FFN norm (None: a parallel block, whose FFN reads the block input
# x like its attention) and the block style.
def _parts(base, kind):
    if kind == "gpt_neox":
        par = base.config.use_parallel_residual
        return [
            (b, b.attention, b.mlp, None if par else b.post_attention_layernorm, "pre_ln")
            for b in base.gpt_neox.layers
        ]
    if kind == "falcon":
        par = base.config.parallel_attn
        return [
            (b, b.self_attention, b.mlp, None if par else b.post_attention_layernorm, "pre_ln")
            for b in base.transformer.h
        ]
    if kind == "gptj":
        return [(b, b.attn, b.mlp, None, "pre_ln") for b in base.transformer.h]
    if kind == "cohere":
        return [(b, b.self_attn, b.mlp, None, "pre_ln") for b in base.model.layers]
    if kind == "opt":  # the FFN runs on (B*L, d) rows
        style = "pre_ln_rows" if base.config.do_layer_norm_before else "post_ln_rows"
        return [
            (b, b.self_attn, b.fc2, b.final_layer_norm, style) for b in base.model.decoder.layers
        ]
    if kind == "distilbert":  # output_layer_norm(x + ffn(x)); x is the FFN's input
        return [
            (b, b.attention, b.ffn.lin2, b.ffn, "post_ln_norm")
            for b in base.distilbert.transformer.layer
        ]
    if kind == "deberta_v2":  # BERT's *Output: LayerNorm(dense(.) + x)
        return [
            (b, b.attention, b.output, None, "post_ln_output") for b in base.deberta.encoder.layer
        ]
    if kind == "modernbert":
        return [(b, b.attn, b.mlp, b.mlp_norm, "pre_ln") for b in base.model.layers]
    return [
        (b, b.self_attn, b.mlp, b.post_attention_layernorm, "pre_ln") for b in base.model.layers
    ]


def _reference_hooks(base, kind, placement, adapters, b):
    """The placement's formula on the base model's layers (x: the FFN block's input on the
    residual stream, h: the FFN's output, s: the block's output): block_output s + a(s)
    (post-LN: N(s + a(N(s))), N the post-FFN norm), ffn_output h + a(h), ffn_parallel
    s + a(x); attn_and_ffn_output also o + a(o) on the attention output o. A parallel block
    (GPT-J, Cohere, GPT-NeoX, Falcon) returns s = x + o + h, x its input."""
    B, L = b["input_ids"].shape
    it = iter(adapters)
    handles = []
    for blk, attn, ffn, norm, style in _parts(base, kind):
        rows = style.endswith("_rows")  # OPT: (B*L, d) rows in the FFN

        def tok(z, rows=rows):
            return z.view(B, L, -1) if rows else z

        def plus(z, ad, a_in=None, rows=rows):
            a_in = z if a_in is None else a_in
            return z + (_adapter(tok(a_in), ad).view(z.shape) if rows else _adapter(a_in, ad))

        if placement == "attn_and_ffn_output":
            ad = next(it)
            if style == "post_ln_output":  # inside the SelfOutput, before its LayerNorm
                handles.append(
                    attn.output.dense.register_forward_hook(lambda m, a, o, ad=ad: plus(o, ad))
                )
            else:
                handles.append(
                    attn.register_forward_hook(
                        lambda m, a, out, ad=ad: _with(out, lambda o: plus(o, ad))
                    )
                )
        ad = next(it)
        seen = {}
        if placement in ("ffn_output", "attn_and_ffn_output"):
            if style == "post_ln_output":
                handles.append(ffn.dense.register_forward_hook(lambda m, a, h, ad=ad: plus(h, ad)))
            else:
                handles.append(
                    ffn.register_forward_hook(
                        lambda m, a, out, ad=ad: _with(out, lambda h: plus(h, ad))
                    )
                )
        elif style == "post_ln_output":  # BERT-like *Output(h_in, x): LN(dense(h_in) + x)

            def output(m, a, out, ad=ad):
                s = m.dense(a[0]) + a[1]
                a_in = _ln(m.LayerNorm, s) if placement == "block_output" else a[1]
                return _ln(m.LayerNorm, plus(s, ad, a_in))

            handles.append(blk.output.register_forward_hook(output))
        elif style in ("post_ln_norm", "post_ln_rows"):  # N(s) with s = x + h
            post = blk.output_layer_norm if style == "post_ln_norm" else blk.final_layer_norm
            src = norm if style == "post_ln_norm" else blk.fc1  # its input is x
            handles.append(
                src.register_forward_pre_hook(lambda m, a, seen=seen: seen.update(x=a[0]))
            )

            def post_norm(m, a, out, ad=ad, seen=seen):
                a_in = out if placement == "block_output" else seen["x"]
                return _ln(m, plus(a[0], ad, a_in))

            handles.append(post.register_forward_hook(post_norm))
        elif placement == "block_output":
            handles.append(
                blk.register_forward_hook(
                    lambda m, a, out, ad=ad: _with(out, lambda s: plus(s, ad))
                )
            )
        else:  # ffn_parallel: s + a(x), x the pre-FFN norm's input or a parallel block's
            if norm is None:
                handles.append(
                    blk.register_forward_pre_hook(
                        lambda m, a, k, seen=seen: seen.update(x=_x_in(a, k)), with_kwargs=True
                    )
                )
            else:
                handles.append(
                    norm.register_forward_pre_hook(lambda m, a, seen=seen: seen.update(x=a[0]))
                )
            handles.append(
                blk.register_forward_hook(
                    lambda m, a, out, ad=ad, seen=seen: _with(
                        out, lambda s: s + _adapter(tok(seen["x"]).view(s.shape), ad)
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
    # fused q/k/v and the parallel blocks (s = x + attn(x) + ffn(x)), OPT's (B*L, d) FFN rows,
    # the encoders
    ("phi3", "block_output"),
    ("gpt_neox", "block_output"),
    ("falcon", "attn_and_ffn_output"),
    ("falcon", "ffn_parallel"),
    ("falcon_sequential", "ffn_parallel"),
    ("cohere", "block_output"),
    ("gptj", "attn_and_ffn_output"),
    ("opt", "ffn_output"),
    ("opt", "block_output"),
    ("opt", "ffn_parallel"),
    ("opt_post_ln", "block_output"),
    ("opt_post_ln", "ffn_parallel"),
    ("distilbert", "block_output"),
    ("deberta_v2", "attn_and_ffn_output"),
    ("modernbert", "ffn_parallel"),
]
# variants of a family: (family, config overrides)
VARIANTS = {
    "falcon_sequential": ("falcon", {"parallel_attn": False}),
    "opt_post_ln": ("opt", {"do_layer_norm_before": False}),  # OPT-350m
}


@pytest.mark.parametrize("kind,placement", CASES)
def test_adapter_on_block_matches_formula(kind, placement):
    cfg = up.UniPELTConfig(
        bitfit=False,
        prefix=False,
        gate_mode="mean",
        adapter=up.AdapterConfig(bottleneck=8, placement=placement, gate=True),
        modules_to_save=(),  # the encoders' heads stay the base model's
    )
    family, config = VARIANTS.get(kind, (kind, {}))
    m = up.apply_unipelt(tiny(family, **config), cfg, backend="eager")
    adapters = [mod for mod in m.modules() if isinstance(mod, up.GatedAdapter)]
    params = [p for ad in adapters for p in ad.parameters()]
    _perturb(params)
    b = tiny_batch(family)

    base = tiny(family, **config)
    handles = _reference_hooks(base, family, placement, adapters, b)
    want, want_g = reference_run(lambda mod: _loss(mod, b), base, handles, params)

    got, loss = _loss(m, b)
    loss.backward()
    real = b["attention_mask"].bool() if got.dim() == 3 else slice(None)
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


def test_opt_checkpointing_token_rows_and_reentrant_refusal():
    """OPT with gradient checkpointing: the FFN-output adapter on its (B*L, d) rows gives the
    same gradients (TokenRows takes B from the model's entry, not from a hook the recompute
    skips); "ffn_parallel", whose x is recorded inside the layer and read by a hook outside
    it, is refused under reentrant checkpointing (whose first forward runs without
    gradients) instead of losing x's gradient."""
    b = tiny_batch("opt")
    b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)

    def make(placement):
        cfg = up.UniPELTConfig(
            lora=True, prefix=False, adapter=up.AdapterConfig(bottleneck=8, placement=placement)
        )
        m = up.apply_unipelt(tiny("opt"), cfg, backend="eager")
        _perturb([p for p in m.parameters() if p.requires_grad])
        return m

    plain, ckpt = checkpointing_grads(lambda: make("ffn_output"), b, reentrant=True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)
    m = make("ffn_parallel")
    m.train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(NotImplementedError, match="use_reentrant': False"):
        m(**b).loss.backward()
