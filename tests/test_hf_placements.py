"""Adapter placements, gated-LoRA scaling and per-layer selection on tiny HF models, each
against an independent formulation written here: the plain base model with hooks that apply
the placement's formula (AdapterHub's SeqBn / ParBn / DoubleSeqBn) in plain torch."""

import pytest
import torch

import unipelt_fast as up
from tests.hf_tiny import (
    batch,
    formula_adapter,
    formula_lora,
    perturb,
    perturb_params,
    reference_run,
    tiny_model,
)

KINDS = ("bert", "roberta", "gpt2", "llama")
PLACEMENTS = ("block_output", "ffn_output", "ffn_parallel", "attn_and_ffn_output")


def _reference_hooks(base, kind, placement, adapters, layers):
    """Hooks on the untouched ``base`` that compute the placement by its formula; ``adapters``
    is the applied model's list of GatedAdapter in module order (attention site first)."""
    it = iter(adapters)
    handles = []
    if kind in ("bert", "roberta"):
        blocks = base.base_model.encoder.layer
    elif kind == "gpt2":
        blocks = base.transformer.h
    else:
        blocks = base.model.layers
    for i, blk in enumerate(blocks):
        if i not in layers:
            continue
        if kind in ("bert", "roberta"):
            ffn_out, attn_out = blk.output, blk.attention.output
            ln_ffn = ffn_out.LayerNorm
        elif kind == "gpt2":
            ffn_out, attn_out, ln_ffn = blk.mlp, blk.attn, blk.ln_2
        else:
            ffn_out, attn_out, ln_ffn = blk.mlp, blk.self_attn, blk.post_attention_layernorm
        if placement == "attn_and_ffn_output":
            a_attn = next(it)
            if kind in ("bert", "roberta"):  # LN(h + a(h) + x) inside the SelfOutput
                handles.append(
                    attn_out.dense.register_forward_hook(
                        lambda m, a, out, ad=a_attn: out + formula_adapter(out, ad)
                    )
                )
            else:  # the attention block returns (o, ...); the layer adds x
                handles.append(
                    attn_out.register_forward_hook(
                        lambda m, a, out, ad=a_attn: (
                            out[0] + formula_adapter(out[0], ad),
                            *out[1:],
                        )
                    )
                )
        ad = next(it)
        post_ln = kind in ("bert", "roberta")
        if placement in ("ffn_output", "attn_and_ffn_output"):
            tgt = ffn_out.dense if post_ln else ffn_out
            handles.append(
                tgt.register_forward_hook(lambda m, a, out, ad=ad: out + formula_adapter(out, ad))
            )
        elif post_ln:  # rewrite *Output: h = dense(hs); N(h + x + a(N(h + x) or x))

            def fwd(m, args, out, ad=ad, ln=ln_ffn):
                hs, x = args
                h = m.dense(hs)
                a_in = ln(h + x) if placement == "block_output" else x
                return ln(h + x + formula_adapter(a_in, ad))

            handles.append(ffn_out.register_forward_hook(fwd))
        elif placement == "block_output":  # pre-LN: out = x + h; then out + a(out)
            handles.append(
                blk.register_forward_hook(
                    lambda m, a, out, ad=ad: (
                        out + formula_adapter(out, ad)
                        if torch.is_tensor(out)
                        else (out[0] + formula_adapter(out[0], ad), *out[1:])
                    )
                )
            )
        else:  # pre-LN parallel: x + h + a(x), x = the pre-FFN norm's input
            seen = {}
            handles.append(
                ln_ffn.register_forward_pre_hook(lambda m, a, seen=seen: seen.update(x=a[0]))
            )
            handles.append(
                ffn_out.register_forward_hook(
                    lambda m, a, out, ad=ad, seen=seen: out + formula_adapter(seen["x"], ad)
                )
            )
    assert next(it, None) is None, "the applied model has more adapters than the reference"
    return handles


def _loss(model, b):
    kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    logits = model(**kw).logits
    return logits, (logits * torch.linspace(-1, 1, logits.shape[-1])).sum()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_placement_matches_formula(kind, placement):
    gate = placement != "ffn_parallel"  # ungated once per family
    layers = (0, 1) if placement != "ffn_output" else (1,)
    cfg = up.UniPELTConfig(
        bitfit=False,
        prefix=False,
        gate_mode="mean",
        adapter=up.AdapterConfig(bottleneck=8, placement=placement, gate=gate, layers=layers),
    )
    m = up.apply_unipelt(tiny_model(kind), cfg, backend="eager")
    adapters = [mod for mod in m.modules() if isinstance(mod, up.GatedAdapter)]
    n_sites = 2 if placement == "attn_and_ffn_output" else 1
    assert len(adapters) == n_sites * len(layers)
    params = [p for ad in adapters for p in ad.parameters()]
    perturb_params(params)
    b = batch(kind)

    base = tiny_model(kind)
    handles = _reference_hooks(base, kind, placement, adapters, layers)
    want, want_g = reference_run(lambda mod: _loss(mod, b), base, handles, params)
    got, loss = _loss(m, b)
    loss.backward()
    real = b["attention_mask"].bool()
    sel = real if got.dim() == 3 else slice(None)
    assert (got[sel] - want[sel]).norm() <= 1e-5 * want[sel].norm()
    for p, g in zip(params, want_g, strict=True):
        assert (p.grad - g).norm() <= 1e-5 * g.norm() + 1e-12
    with torch.no_grad():  # the adapters matter
        assert (got - base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits)[
            sel
        ].abs().max() > 1e-3


@pytest.mark.interpreter
@pytest.mark.parametrize("placement", ("block_output", "ffn_parallel"))
def test_placement_triton_equals_eager(placement):
    cfg = up.UniPELTConfig(
        bitfit=False,
        prefix=False,
        gate_mode="masked_mean",
        adapter=up.AdapterConfig(bottleneck=16, placement=placement),
    )
    outs = []
    for backend in ("eager", "triton"):
        m = up.apply_unipelt(tiny_model("llama"), cfg, backend=backend)
        perturb(m)
        b = batch("llama")
        logits, loss = _loss(m, b)
        loss.backward()
        grads = [
            p.grad
            for mod in m.modules()
            if isinstance(mod, up.GatedAdapter)
            for p in mod.parameters()
        ]
        outs.append((logits.detach(), grads))
    (le, ge), (lt, gt) = outs
    assert (lt - le).norm() <= 2e-4 * le.norm()
    for a, c in zip(ge, gt, strict=True):
        assert (c - a).norm() <= 2e-4 * a.norm() + 1e-12


@pytest.mark.parametrize("kind", ("bert", "gpt2", "llama"))
@pytest.mark.parametrize("replace", (False, True))
def test_gated_lora_scaling_convention(kind, replace):
    """delta = g * B(A(x)) with gate_replaces_scaling (adapters), g * alpha/r * B(A(x)) without."""
    cfg = up.UniPELTConfig(
        bitfit=False,
        adapter=False,
        prefix=False,
        gate_mode="mean",
        lora=up.LoRAConfig(r=4, alpha=12.0, targets=("query",), gate_replaces_scaling=replace),
    )
    m = up.apply_unipelt(tiny_model(kind), cfg, backend="eager")
    loras = [mod for mod in m.modules() if isinstance(mod, up.GatedLoRA)]
    perturb_params([p for lo in loras for p in lo.units.parameters()])
    base = tiny_model(kind)
    if kind == "bert":
        projs = [blk.attention.self.query for blk in base.bert.encoder.layer]
    elif kind == "gpt2":
        projs = [blk.attn.c_attn for blk in base.transformer.h]
    else:
        projs = [blk.self_attn.q_proj for blk in base.model.layers]
    scale = 1.0 if replace else 12.0 / 4
    handles = []
    for proj, lo in zip(projs, loras, strict=True):
        u = lo.units[0]

        def hook(mod, args, out, u=u):
            d = formula_lora(args[0], u, scale)
            if kind == "gpt2":  # query = the first third of c_attn's output
                d = torch.cat([d, torch.zeros_like(out[..., d.shape[-1] :])], -1)
            return out + d

        handles.append(proj.register_forward_hook(hook))
    b = batch(kind)
    with torch.no_grad():
        want = _loss(base, b)[0]
        got = _loss(m, b)[0]
    assert (got - want).norm() <= 1e-5 * want.norm()


def test_gpt2_split_fused_lora_is_one_lora_per_role():
    """split_fused: GPT-2's c_attn gets, per role, its own A, B and gate on that role's third
    of the columns (the adapters library's LoRAMergedLinear); the key third stays the base's."""
    cfg = up.UniPELTConfig(
        bitfit=False,
        adapter=False,
        prefix=False,
        gate_mode="mean",
        lora=up.LoRAConfig(r=4, alpha=12.0, targets=("query", "value"), split_fused=True),
    )
    m = up.apply_unipelt(tiny_model("gpt2"), cfg, backend="eager")
    loras = [mod for mod in m.modules() if isinstance(mod, up.GatedLoRA)]
    assert len(loras) == 4  # 2 layers x (query, value)
    perturb_params([p for lo in loras for p in lo.units.parameters()])
    base = tiny_model("gpt2")
    handles = []
    for i, blk in enumerate(base.transformer.h):
        c_attn = m.transformer.h[i].attn.c_attn
        uq, uv = c_attn.base.units[0], c_attn.units[0]  # the inner wrapper is the query's

        def hook(mod, args, out, uq=uq, uv=uv):
            dq, dv = formula_lora(args[0], uq, 3.0), formula_lora(args[0], uv, 3.0)
            return out + torch.cat([dq, torch.zeros_like(dq), dv], -1)

        handles.append(blk.attn.c_attn.register_forward_hook(hook))
    b = batch("gpt2")
    with torch.no_grad():
        want = _loss(base, b)[0]
        got = _loss(m, b)[0]
    assert (got - want).norm() <= 1e-5 * want.norm()


def test_layers_out_of_range_and_prefix_layers():
    with pytest.raises(ValueError, match="layers"):
        up.apply_unipelt(
            tiny_model("llama"), up.UniPELTConfig(adapter=up.AdapterConfig(layers=(2,)))
        )
    with pytest.raises(ValueError, match="layers"):
        up.UniPELTConfig(lora=up.LoRAConfig(layers=()))
    with pytest.raises(TypeError, match="layers"):
        up.UniPELTConfig(prefix=up.PrefixConfig(layers=3))
    with pytest.raises(ValueError, match="placement"):
        up.UniPELTConfig(adapter=up.AdapterConfig(placement="pfeiffer"))
    with pytest.raises(ValueError, match="positions"):
        up.UniPELTConfig(prefix=up.PrefixConfig(positions="peft"))
    # a prefix on layer 1 only: layer 0's output is the base model's
    cfg = up.UniPELTConfig(bitfit=False, adapter=False, prefix=up.PrefixConfig(layers=[1]))
    m = up.apply_unipelt(tiny_model("llama"), cfg, backend="eager")
    perturb_params(list(m.unipelt.parameters()))
    assert m.unipelt.prefix.n_layers == 1
    base = tiny_model("llama")
    b = batch("llama")
    kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    with torch.no_grad():
        hs = m(**kw, output_hidden_states=True).hidden_states
        hb = base(**kw, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hs[1], hb[1])
    assert (hs[2] - hb[2]).abs().max() > 1e-3
