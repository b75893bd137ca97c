"""Encoder-decoder models (tiny BART from a BartConfig): a gated prefix in encoder
self-attention, decoder self-attention and decoder cross-attention (Li & Liang's BART
setup), adapters after both stacks' FFNs, LoRA on self/cross q/v, BitFit.

Prefix semantics are checked per attention site against an independent formulation
(explicit [prefix ; tokens] concatenation + SDPA with an explicit boolean mask)."""

import pytest
import torch
import torch.nn.functional as F

import unipelt_fast as up
from tests.hf_tiny import (
    ADAPTER,
    BOS,
    LS,
    LT,
    VOCAB,
    B,
    bart_batch,
    checkpointing_grads,
    formula_adapter,
    perturb,
    perturb_params,
    reference_run,
    tiny_bart,
    trainable_grads,
)

KINDS = ("bart", "t5")
EVERY_KIND = ("bart", "marian", "mbart", "pegasus", "t5", "mt5")  # each family member


def pelt_bart(cfg=None, backend="eager", seed=0, kind="bart"):
    cfg = cfg or up.UniPELTConfig(lora=True, gate_mode="masked_mean", adapter=ADAPTER)
    m = up.apply_unipelt(tiny_bart(seed, kind), cfg, backend=backend)
    perturb(m)
    return m


# ---- prefix semantics per attention site ------------------------------------------------------


def _explicit_prefix_attention(attn, h, kv_src, pk, pv, gate, allowed):
    """out_proj(SDPA(q, [g_k pk ; k], [g_v pv ; v])) with ``allowed`` (B, Lq, P + Lk)."""
    Bq, Lq, _ = h.shape
    H, D = attn.num_heads, attn.head_dim

    def heads(t):
        return t.view(t.shape[0], t.shape[1], H, D).transpose(1, 2)

    q, k, v = heads(attn.q_proj(h)), heads(attn.k_proj(kv_src)), heads(attn.v_proj(kv_src))
    gk = gate[:, 0].view(-1, 1, 1, 1) if gate is not None else 1.0
    gv = gate[:, 1].view(-1, 1, 1, 1) if gate is not None else 1.0
    keys = torch.cat([gk * pk.expand(Bq, -1, -1, -1), k], dim=2)
    vals = torch.cat([gv * pv.expand(Bq, -1, -1, -1), v], dim=2)
    o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=allowed[:, None], scale=D**-0.5)
    return attn.out_proj(o.transpose(1, 2).reshape(Bq, Lq, H * D))


def _site_io(m, attn, b: dict, site: str):
    """One no-grad forward of ``m`` on ``b`` (labels dropped), recording ``attn``'s input
    hidden states, its key/value source (the encoder output at "dec-cross") and its output."""
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["h"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["kv"] = kwargs.get("key_value_states")
        seen["out"] = out[0]

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        m(**{k: v for k, v in b.items() if k != "labels"})
    handle.remove()
    h = seen["h"]
    return h, (h if site != "dec-cross" else seen["kv"]), seen["out"]


@pytest.mark.parametrize(
    "site, lt",
    [("enc-self", LT), ("dec-self", LT), ("dec-cross", LT), ("dec-self", LS), ("dec-cross", LS)],
)
def test_prefix_semantics_match_explicit_concat(site, lt):
    """lt == LS too: the decoder's keys must never take the encoder's mask by length."""
    cfg = up.UniPELTConfig(adapter=ADAPTER, gate_mode="masked_mean")
    m = pelt_bart(cfg)
    b = bart_batch(LT=lt)
    layer_enc, layer_dec = m.model.encoder.layers[0], m.model.decoder.layers[0]
    attn, index = {
        "enc-self": (layer_enc.self_attn, 0),
        "dec-self": (layer_dec.self_attn, 1),
        "dec-cross": (layer_dec.encoder_attn, 2),
    }[site]
    h, kv_src, got = _site_io(m, attn, b, site)
    Lq, Lk = h.shape[1], kv_src.shape[1]
    root = m.unipelt
    P = cfg.prefix.length
    with torch.no_grad():
        pk, pv = (t[0][None] for t in root.layer_prefix(index))  # the site's own prefix
        qmask = (b["attention_mask"] if site == "enc-self" else b["decoder_attention_mask"]).bool()
        gate = root.prefix_gates[index][0](h, qmask).reshape(B, -1).expand(B, 2)
        tok = torch.ones(B, Lq, Lk, dtype=torch.bool)
        if site == "enc-self":
            tok &= b["attention_mask"].bool()[:, None, :]
        elif site == "dec-self":
            tok &= torch.ones(Lq, Lk, dtype=torch.bool).tril()[None]
            tok &= b["decoder_attention_mask"].bool()[:, None, :]
        else:  # cross: the encoder padding mask, no causal mask
            tok &= b["attention_mask"].bool()[:, None, :]
        allowed = torch.cat([torch.ones(B, Lq, P, dtype=torch.bool), tok], dim=-1)
        want = _explicit_prefix_attention(attn, h, kv_src, pk, pv, gate, allowed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # each site has its own prefix: another site's would give something else
    with torch.no_grad():
        opk, opv = (t[0][None] for t in root.layer_prefix((index + 1) % 3))
        other = _explicit_prefix_attention(attn, h, kv_src, opk, opv, gate, allowed)
    assert (other - want).abs().max() > 1e-3


@pytest.mark.parametrize("site", ["enc-self", "dec-self", "dec-cross"])
def test_t5_prefix_semantics_with_relative_position_bias(site):
    """T5: unscaled logits; token keys keep HF's relative position bias (block 0 computes
    it, block 1 reuses it), prefix keys get none; same masks as BART."""
    cfg = up.UniPELTConfig(adapter=ADAPTER, gate_mode="masked_mean")
    m = pelt_bart(cfg, kind="t5")
    b = bart_batch()
    enc, dec = m.encoder.block, m.decoder.block
    attn, index, bias_src = {
        "enc-self": (enc[1].layer[0].SelfAttention, 1, enc[0].layer[0].SelfAttention),
        "dec-self": (dec[0].layer[0].SelfAttention, 2, dec[0].layer[0].SelfAttention),
        "dec-cross": (dec[1].layer[1].EncDecAttention, 5, None),
    }[site]
    h, kv_src, got = _site_io(m, attn, b, site)
    Lq, Lk = h.shape[1], kv_src.shape[1]
    H, D, P = attn.n_heads, attn.key_value_proj_dim, cfg.prefix.length
    root = m.unipelt
    with torch.no_grad():
        pk, pv = (t[0][None] for t in root.layer_prefix(index))
        qmask = (b["attention_mask"] if site == "enc-self" else b["decoder_attention_mask"]).bool()
        g = root.prefix_gates[index][0](h, qmask).reshape(B, -1).expand(B, 2)
        tok_bias = torch.zeros(1, H, Lq, Lk)
        if bias_src is not None:
            tok_bias = bias_src.compute_bias(Lq, Lk)
        tok = torch.ones(B, Lq, Lk, dtype=torch.bool)
        if site == "dec-self":
            tok &= torch.ones(Lq, Lk, dtype=torch.bool).tril()[None]
            tok &= b["decoder_attention_mask"].bool()[:, None, :]
        else:
            tok &= b["attention_mask"].bool()[:, None, :]
        allowed = torch.cat([torch.ones(B, Lq, P, dtype=torch.bool), tok], dim=-1)
        bias = torch.cat([torch.zeros(1, H, Lq, P), tok_bias], dim=-1)
        mask = bias.masked_fill(~allowed[:, None], float("-inf"))

        def heads(t):
            return t.view(B, t.shape[1], H, D).transpose(1, 2)

        q, k, v = heads(attn.q(h)), heads(attn.k(kv_src)), heads(attn.v(kv_src))
        keys = torch.cat([g[:, 0].view(B, 1, 1, 1) * pk.expand(B, -1, -1, -1), k], dim=2)
        vals = torch.cat([g[:, 1].view(B, 1, 1, 1) * pv.expand(B, -1, -1, -1), v], dim=2)
        o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=1.0)
        want = attn.o(o.transpose(1, 2).reshape(B, Lq, H * D))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if bias_src is not None:  # the position bias matters here
        no_bias = torch.zeros_like(mask).masked_fill(~allowed[:, None], float("-inf"))
        o2 = F.scaled_dot_product_attention(q, keys, vals, attn_mask=no_bias, scale=1.0)
        assert (attn.o(o2.transpose(1, 2).reshape(B, Lq, H * D)) - want).abs().max() > 1e-4


def test_t5_bitfit_trains_nothing():
    m = pelt_bart(up.UniPELTConfig(bitfit=True, adapter=ADAPTER), kind="t5")
    report = up.trainable_report(m)
    assert "  bitfit " not in report and "  prefix " in report, report
    assert not any(
        "bias" in n and "unipelt" not in n and "adapters" not in n and "lora" not in n
        for n, p in m.named_parameters()
        if p.requires_grad
    )


def test_prefix_sites_and_trainable_report():
    m = pelt_bart()
    root = m.unipelt
    assert root.prefix.n_layers == 3  # 1 encoder self + 1 decoder self + 1 cross
    assert len(root.prefix_gates) == 3
    report = up.trainable_report(m)
    for what in ("bitfit", "adapter", "prefix", "lora"):
        assert f"  {what} " in report, report
    # adapters after the FFN of both stacks; LoRA on q/v of self and cross attention
    # (block_output on post-LN BART: the post-FFN LayerNorm is wrapped)
    for layer in (m.model.encoder.layers[0], m.model.decoder.layers[0]):
        assert isinstance(layer.final_layer_norm, up.hf.placements.PostLNNormWrapper)
    for a in (m.model.decoder.layers[0].self_attn, m.model.decoder.layers[0].encoder_attn):
        assert isinstance(a.q_proj, up.GatedLoRA) and isinstance(a.v_proj, up.GatedLoRA)
        assert not isinstance(a.k_proj, up.GatedLoRA)


def test_lora_attention_types_selects_self_or_cross():
    cfg = up.UniPELTConfig(lora=up.LoRAConfig(attention_types=("cross",)), prefix=False)
    m = up.apply_unipelt(tiny_bart(), cfg, backend="eager")
    dec = m.model.decoder.layers[0]
    assert isinstance(dec.encoder_attn.q_proj, up.GatedLoRA)
    assert not isinstance(dec.self_attn.q_proj, up.GatedLoRA)
    assert not isinstance(m.model.encoder.layers[0].self_attn.q_proj, up.GatedLoRA)
    with pytest.raises(ValueError, match="attention_types"):
        up.UniPELTConfig(lora=up.LoRAConfig(attention_types=("encoder",)))


# ---- backends, generate, checkpoints -----------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", KINDS)
def test_eager_and_triton_match_logits_and_grads(kind):
    b = bart_batch()
    res = []
    for backend in ("eager", "triton"):
        m = pelt_bart(backend=backend, kind=kind)
        out = m(**b)
        out.loss.backward()
        res.append((out.logits.detach(), trainable_grads(m)))
    (le, ge), (lt, gt) = res
    torch.testing.assert_close(lt, le, rtol=2e-4, atol=2e-5)
    assert ge.keys() == gt.keys()
    for n in ge:
        torch.testing.assert_close(gt[n], ge[n], rtol=2e-3, atol=2e-5, msg=n)
    assert any("prefix" in n and ge[n].abs().sum() > 0 for n in ge)


def _generate(m, b, **kw):
    with torch.no_grad():
        return m.generate(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=5,
            do_sample=False, num_beams=1, **kw,
        )  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_cache_matches_no_cache_and_cache_holds_no_prefix(kind):
    """Gate mode "token" and no prefix gate: the gates then see the same tokens with and
    without the cache (a mean gate over the step's tokens differs by design)."""
    cfg = up.UniPELTConfig(
        lora=True, gate_mode="token", prefix=up.PrefixConfig(gate=False), adapter=ADAPTER
    )
    m = pelt_bart(cfg, kind=kind)
    b = bart_batch()
    cached, plain = _generate(m, b, use_cache=True), _generate(m, b, use_cache=False)
    assert cached.shape[1] > 2
    torch.testing.assert_close(cached, plain)
    with torch.no_grad():
        out = m(**{k: v for k, v in b.items() if k != "labels"}, use_cache=True)
    cache = out.past_key_values
    assert cache.self_attention_cache.get_seq_length() == LT  # no prefix rows
    assert cache.cross_attention_cache.get_seq_length() == LS


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", KINDS)
def test_generate_triton_matches_eager(kind):
    b = bart_batch()
    toks = [
        _generate(pelt_bart(backend=be, kind=kind), b, use_cache=True) for be in ("eager", "triton")
    ]
    torch.testing.assert_close(toks[1], toks[0])


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path):
    cfg = dict(lora=True, tasks=("a", "b"), adapter=ADAPTER)
    m = pelt_bart(up.UniPELTConfig(**cfg), kind=kind)
    b = bart_batch()
    tid = torch.tensor([0, 1, 1])
    with torch.no_grad():
        want = m(**b, task_ids=tid).logits
    up.save_unipelt(m, str(tmp_path))
    fresh = up.apply_unipelt(tiny_bart(kind=kind), up.UniPELTConfig(**cfg), backend="eager")
    up.load_unipelt(fresh, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(fresh(**b, task_ids=tid).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_same_grads(kind, reentrant):
    grads = checkpointing_grads(lambda: pelt_bart(kind=kind), bart_batch(), reentrant)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", EVERY_KIND)
def test_mixed_task_batch_equals_per_task(kind):
    cfg = up.UniPELTConfig(lora=True, gate_mode="masked_mean", tasks=("a", "b"), adapter=ADAPTER)
    m = pelt_bart(cfg, kind=kind)
    b = bart_batch()
    tid = torch.tensor([1, 0, 1])
    with torch.no_grad():
        mixed = m(**b, task_ids=tid).logits
        per = torch.cat(
            [
                m(**{k: v[i : i + 1] for k, v in b.items()}, task_ids=tid[i : i + 1]).logits
                for i in range(B)
            ]
        )
        other = m(**b, task_ids=1 - tid).logits
    torch.testing.assert_close(mixed, per, rtol=1e-5, atol=1e-6)
    assert (mixed - other).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_a_few_steps_lower_the_loss_and_eject_keeps_outputs(kind):
    m = pelt_bart(kind=kind)
    m.train()
    b = bart_batch()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = m(**b).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    m.eval()
    with torch.no_grad():
        before = m(**b).logits
        up.eject(m)
        torch.testing.assert_close(m(**b).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", EVERY_KIND)
def test_every_family_member_trains_every_method(kind):
    m = pelt_bart(kind=kind)
    b = bart_batch()
    m(**b).loss.backward()
    n_sites = 6 if kind in ("t5", "mt5") else 3  # enc self + dec self + dec cross per layer
    assert m.unipelt.prefix.n_layers == n_sites
    report = up.trainable_report(m)
    for what in ("adapter", "prefix", "lora"):
        assert f"  {what} " in report, report
    tuned = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in tuned if ".B." not in n)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_encoder_pass_uses_its_own_mask_and_the_active_task(kind):
    """generate() runs the encoder outside the model's forward: a previous forward's task
    ids and mask must not leak into it."""
    cfg = up.UniPELTConfig(tasks=("a", "b"), gate_mode="masked_mean", adapter=ADAPTER)
    m = pelt_bart(cfg, kind=kind)
    b = bart_batch()
    up.set_active_task(m, "b")
    fresh = _generate(m, b, use_cache=True)
    ids, dec = b["input_ids"][:1].repeat(4, 1), b["decoder_input_ids"][:1].repeat(4, 1)
    with torch.no_grad():  # leaves task ids [0, 0, 0, 0] and no mask behind
        m(input_ids=ids, decoder_input_ids=dec, task_ids=torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(_generate(m, b, use_cache=True), fresh)
    # the direct encoder call equals the encoder inside a forward with task "b" and the mask
    seen = {}
    h = m.get_encoder().register_forward_hook(lambda mod, a, out: seen.update(out=out[0]))
    with torch.no_grad():
        m(**b, task_ids=torch.ones(B, dtype=torch.long))
        inside = seen["out"]
        direct = m.get_encoder()(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    h.remove()
    torch.testing.assert_close(direct.last_hidden_state, inside)


@pytest.mark.parametrize("kind", KINDS)
def test_soft_prompt_on_the_encoder_input(kind):
    """Lester et al.: the prompt is prepended to the encoder input only; the decoder-side
    labels stay as they are."""
    m = pelt_bart(
        up.UniPELTConfig(prompt=True, prefix=False, adapter=False, bitfit=False), kind=kind
    )
    b = bart_batch()
    seen = {}
    h = m.get_encoder().register_forward_hook(lambda mod, a, out: seen.update(out=out[0]))
    out = m(**b)
    h.remove()
    assert seen["out"].shape[1] == LS + m.unipelt.prompt.length
    assert out.logits.shape == (B, LT, VOCAB)
    out.loss.backward()
    assert m.unipelt.prompt.embeddings.grad.abs().sum() > 0
    # the encoder called alone prepends the prompt too; its outputs then go with the
    # caller's source mask (the prompt's ones are added), as in generate()'s decoder steps
    am = b["attention_mask"]
    dec = {k: b[k] for k in ("decoder_input_ids", "decoder_attention_mask")}
    with torch.no_grad():
        enc = m.get_encoder()(input_ids=b["input_ids"], attention_mask=am)
        assert enc.last_hidden_state.shape[1] == LS + m.unipelt.prompt.length
        again = m(encoder_outputs=enc, attention_mask=am, **dec).logits
        torch.testing.assert_close(again, out.logits.detach(), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="encoder outputs"):
            m(encoder_outputs=enc, attention_mask=am[:, 1:], **dec)


def _greedy(step_logits, n: int = 4):
    """Greedy decoding without a cache from the decoder start token: ``step_logits(dec)``
    gives the last position's logits. Returns the sequences and the (B, n, V) logits."""
    dec, steps = torch.full((B, 1), BOS), []
    with torch.no_grad():
        for _ in range(n):
            logits = step_logits(dec)
            steps.append(logits)
            dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], 1)
    return dec, torch.stack(steps, 1)


def _generate_logits(m, b, n: int = 4, **kw):
    """generate() (greedy, KV cache; EOS off so that every example runs n steps): the
    sequences and the (B, n, V) raw step logits."""
    with torch.no_grad():
        out = m.generate(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=n,
            do_sample=False, num_beams=1, eos_token_id=None, output_logits=True,
            return_dict_in_generate=True, **kw,
        )  # fmt: skip
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_soft_prompt(kind):
    """generate() with the soft prompt runs it on the encoder input, as peft's
    PeftModelForSeq2SeqLM.generate does: (1) a prompt alone equals decoding without a cache
    through the untouched base model given [prompt ; embed(source)] and the mask with ones
    in front; (2) a gated prompt with LoRA and adapters equals decoding without a cache
    through the model's forward (source padded; step logits and tokens)."""
    cfg = up.UniPELTConfig(
        prompt=up.PromptConfig(length=3, gate=False), prefix=False, adapter=False, bitfit=False
    )
    m, base, b = pelt_bart(cfg, kind=kind), tiny_bart(0, kind), bart_batch()
    prompt = m.unipelt.prompt.embeddings[0].detach().expand(B, -1, -1)
    src = torch.cat([prompt, base.get_input_embeddings()(b["input_ids"])], 1)
    am = torch.cat([torch.ones(B, 3, dtype=torch.long), b["attention_mask"]], 1)
    want_seq, want = _greedy(
        lambda d: base(inputs_embeds=src, attention_mask=am, decoder_input_ids=d).logits[:, -1]
    )
    got_seq, got = _generate_logits(m, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_seq, want_seq)
    cfg = up.UniPELTConfig(lora=True, gate_mode="token", prefix=False, adapter=ADAPTER, prompt=True)
    m = pelt_bart(cfg, kind=kind)
    want_seq, want = _greedy(
        lambda d: m(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=d
        ).logits[:, -1]
    )
    got_seq, got = _generate_logits(m, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_seq, want_seq)


@pytest.mark.parametrize("method", ("lora", "prompt"))
@pytest.mark.parametrize("kind", KINDS)
def test_lora_and_prompt_match_peft(kind, method):
    """LoRA (q/v of every attention) and prompt tuning (on the encoder input) against peft's
    own on the same base weights, the tuned tensors copied from peft's model: logits, loss
    and the tuned tensors' gradients; for the prompt also generate() against peft's."""
    peft = pytest.importorskip("peft")
    none = dict(prefix=False, adapter=False, bitfit=False)
    if method == "lora":
        names = ["q", "v"] if kind == "t5" else ["q_proj", "v_proj"]
        pc = peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=12, target_modules=names)
        cfg = up.UniPELTConfig(lora=up.LoRAConfig(r=4, alpha=12.0, gate=False), **none)
    else:
        pc = peft.PromptTuningConfig(
            task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, num_transformer_submodules=1
        )
        cfg = up.UniPELTConfig(prompt=up.PromptConfig(length=3, gate=False), **none)
    pm = peft.get_peft_model(tiny_bart(0, kind), pc)
    perturb(pm)
    pm.eval()
    um = up.apply_unipelt(tiny_bart(0, kind), cfg, backend="eager").eval()
    if method == "lora":
        wrapped = {n: mod for n, mod in um.named_modules() if isinstance(mod, up.GatedLoRA)}
        theirs = {n.removeprefix("base_model.model.") for n, mod in pm.named_modules()}
        theirs = {n for n in theirs if n.endswith(tuple("." + x for x in names))}
        assert set(wrapped) == theirs and len(theirs) == 6 * (2 if kind == "t5" else 1)
        pairs = []
        for n, w in wrapped.items():
            pl = pm.base_model.model.get_submodule(n)
            pairs += [(pl.lora_A["default"].weight, w.units[0].A.weight)]
            pairs += [(pl.lora_B["default"].weight, w.units[0].B.weight)]
    else:
        pairs = [(pm.prompt_encoder["default"].embedding.weight, um.unipelt.prompt.embeddings)]
    with torch.no_grad():
        for theirs_t, ours in pairs:
            ours.copy_(theirs_t.reshape(ours.shape))
    b = bart_batch()
    outs = [model(**b) for model in (pm, um)]
    for o in outs:
        o.loss.backward()
    torch.testing.assert_close(outs[1].logits, outs[0].logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-6)
    for theirs_t, ours in pairs:
        torch.testing.assert_close(ours.grad.reshape(theirs_t.shape), theirs_t.grad)
    if method == "prompt":
        want_seq, want = _generate_logits(pm, b)
        got_seq, got = _generate_logits(um, b)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got_seq, want_seq)


# ---- adapter placements, against their formulas --------------------------------------------


def _ln(n, t):  # the norm's formula (calling n inside its own hook would recurse)
    return F.layer_norm(t, n.normalized_shape, n.weight, n.bias, n.eps)


def _placement_hooks(base, kind, placement, adapters):
    """Hooks on the untouched ``base`` computing the placement (s = x + h after the FFN's
    dropout; post-LN BART: N(s + a(N(s))) / N(s + a(x)); pre-LN mBART and T5: s + a(s) /
    s + a(x); ffn_output: h + a(h) at the FFN's output projection)."""
    enc, dec = base.get_encoder(), base.get_decoder()
    layers = list(enc.block) + list(dec.block) if kind == "t5" else [*enc.layers, *dec.layers]
    handles, it = [], iter(adapters)
    for layer in layers:
        ad, seen = next(it), {}
        if kind == "t5":
            ff = layer.layer[-1]
            fc2, block, norm = ff.DenseReluDense, ff, ff.layer_norm
        else:
            fc2, block, norm = layer.fc2, layer, layer.final_layer_norm
        if placement == "ffn_output":
            handles.append(
                fc2.register_forward_hook(lambda m, a, o, ad=ad: o + formula_adapter(o, ad))
            )
        elif kind in ("bart", "marian"):
            handles.append(
                layer.fc1.register_forward_pre_hook(lambda m, a, s=seen: s.update(x=a[0]))
            )

            def post(m, args, out, ad=ad, seen=seen):
                s = args[0]
                a_in = out if placement == "block_output" else seen["x"]
                return _ln(m, s + formula_adapter(a_in, ad))

            handles.append(norm.register_forward_hook(post))
        else:  # pre-LN: the FFN's input x is the pre-FFN norm's input
            handles.append(norm.register_forward_pre_hook(lambda m, a, s=seen: s.update(x=a[0])))

            def pre(m, args, out, ad=ad, seen=seen):
                s = out[0] if isinstance(out, tuple) else out
                new = s + formula_adapter(s if placement == "block_output" else seen["x"], ad)
                return (new, *out[1:]) if isinstance(out, tuple) else new

            handles.append(block.register_forward_hook(pre))
    assert next(it, None) is None
    return handles


@pytest.mark.parametrize("kind", ("bart", "mbart", "t5"))
@pytest.mark.parametrize("placement", ("block_output", "ffn_output", "ffn_parallel"))
def test_adapter_placement_matches_formula(kind, placement):
    cfg = up.UniPELTConfig(
        bitfit=False, prefix=False, gate_mode="mean",
        adapter=up.AdapterConfig(bottleneck=8, placement=placement, gate=placement != "ffn_output"),
    )  # fmt: skip
    m = up.apply_unipelt(tiny_bart(0, kind), cfg, backend="eager")
    adapters = [mod for mod in m.modules() if isinstance(mod, up.GatedAdapter)]
    n_layers = 4 if kind == "t5" else 2
    assert len(adapters) == n_layers
    params = [p for ad in adapters for p in ad.parameters()]
    perturb_params(params)
    b = {k: v for k, v in bart_batch().items() if k != "labels"}

    def loss_of(model):
        logits = model(**b).logits
        return logits, (logits * torch.linspace(-1, 1, logits.shape[-1])).sum()

    base = tiny_bart(0, kind)
    handles = _placement_hooks(base, kind, placement, adapters)
    want, want_g = reference_run(loss_of, base, handles, params)
    got, loss = loss_of(m)
    loss.backward()
    assert (got - want).norm() <= 1e-5 * want.norm()
    for p, gw in zip(params, want_g, strict=True):
        assert (p.grad - gw).norm() <= 1e-5 * gw.norm() + 1e-12
    with torch.no_grad():  # the adapters matter
        assert (got - base(**b).logits).abs().max() > 1e-3


def test_encdec_refuses_what_it_cannot_place():
    with pytest.raises(NotImplementedError, match="attn_and_ffn_output"):
        up.apply_unipelt(
            tiny_bart(), up.UniPELTConfig(adapter=up.AdapterConfig(placement="attn_and_ffn_output"))
        )
    with pytest.raises(NotImplementedError, match="layers"):
        up.apply_unipelt(tiny_bart(), up.UniPELTConfig(adapter=up.AdapterConfig(layers=(0,))))
    with pytest.raises(NotImplementedError, match="after_prefix"):
        up.apply_unipelt(
            tiny_bart(), up.UniPELTConfig(prefix=up.PrefixConfig(positions="after_prefix"))
        )


def test_example_tiny_bart_loss_goes_down(capsys):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "finetune_tiny_bart.py")
    spec = importlib.util.spec_from_file_location("finetune_tiny_bart", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--steps", "20", "--backend", "eager"]) < 0
    out = capsys.readouterr().out
    assert "  adapter " in out and "copy:" in out


@pytest.mark.parametrize("site", ["dec-self", "dec-cross"])
def test_lora_gate_reads_its_own_stack_mask(site):
    """masked_mean LoRA gates average over the real tokens of their input: decoder tokens
    for decoder self-attention and the cross-attention query, encoder tokens for the
    cross-attention key/value (never the encoder's mask laid over decoder tokens)."""
    cfg = up.UniPELTConfig(
        bitfit=False, adapter=False, prefix=False, gate_mode="masked_mean",
        lora=up.LoRAConfig(r=4, alpha=8.0, targets=("query", "value")),
    )  # fmt: skip
    m = up.apply_unipelt(tiny_bart(), cfg, backend="eager")
    b = {k: v for k, v in bart_batch().items() if k != "labels"}
    base = tiny_bart()
    pick = {"dec-self": lambda x: x.model.decoder.layers[0].self_attn,
            "dec-cross": lambda x: x.model.decoder.layers[0].encoder_attn}[site]  # fmt: skip
    # only this site's LoRA moves off its init (B = 0 elsewhere: no update there)
    perturb_params(
        [p for r in ("q_proj", "v_proj") for p in getattr(pick(m), r).units.parameters()]
    )
    enc_mask, dec_mask = b["attention_mask"].bool(), b["decoder_attention_mask"].bool()
    handles = []
    for role, mask in (
        ("q_proj", dec_mask),
        ("v_proj", enc_mask if site == "dec-cross" else dec_mask),
    ):
        lo = getattr(pick(m), role)
        u = lo.units[0]

        def hook(mod, args, out, u=u, mask=mask, scale=lo.scaling):
            x = args[0]
            g = torch.sigmoid(F.linear(x, u.gate.proj.weight, u.gate.proj.bias))
            w = mask[..., None].to(g.dtype)
            g = (g * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
            return out + g * scale * F.linear(F.linear(x, u.A.weight), u.B.weight)

        handles.append(getattr(pick(base), role).register_forward_hook(hook))
    with torch.no_grad():
        want = base(**b).logits
        got = m(**b).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the LoRA matters
        assert (got - base(**b).logits).abs().max() > 1e-3
