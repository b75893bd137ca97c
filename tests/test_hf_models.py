"""apply_unipelt on tiny BERT / RoBERTa / GPT-2 / LLaMA / Mistral / Qwen2 models (eager)."""

import pytest
import torch
import transformers

import unipelt_fast as up
from tests.hf_tiny import (
    ADAPTER,
    DECODERS,
    FAMILIES,
    B,
    batch,
    checkpointing_grads,
    generate_logits,
    greedy,
    hf_cache_reference,
    pelt,
    tiny_model,
    trainable_grads,
)


def _logits(model, b, **kw):
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **kw).logits


@pytest.mark.parametrize("kind", FAMILIES)
def test_only_pelt_params_train(kind):
    m = pelt(kind)
    base = tiny_model(kind)
    base_names = {n for n, _ in base.named_parameters()}
    heads = ("classifier.", "score.")
    for n, p in m.named_parameters():
        pelt_param = any(s in n for s in ("units.", "adapters.", "unipelt."))
        bias = n.endswith("bias") and not pelt_param
        head = any(h in n for h in heads)
        assert p.requires_grad == (pelt_param or bias or head), n
        if not pelt_param:  # everything else is a base parameter (maybe under a wrapper)
            assert n.replace(".base.", ".").replace(".inner.", ".") in base_names, n
    # with bitfit off, no base bias trains
    m2 = pelt(kind, up.UniPELTConfig(bitfit=False, lora=True))
    for n, p in m2.named_parameters():
        if n.endswith("bias") and not any(s in n for s in ("units.", "adapters.", "unipelt.")):
            assert p.requires_grad == any(h in n for h in heads), n


@pytest.mark.parametrize("kind", FAMILIES)
def test_prefix_equals_hf_cache_reference(kind):
    """Independent check of the prefix path, masks and gates: the same model on HF's own sdpa
    attention with the gated prefix fed as past key values (peft's way of doing prefix
    tuning), positions given explicitly so that the prefix takes none."""
    if kind in ("bert", "roberta") and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x encoder heads take no past_key_values (the reference)")
    m = pelt(kind)
    b = batch(kind)
    am = b["attention_mask"]
    with torch.no_grad():
        want = _logits(m, b)
        assert sum("unipelt_site" in mod.__dict__ for mod in m.modules()) == 2
        got = hf_cache_reference(m, b, position_offset=2 if kind == "roberta" else 0)
    if want.dim() == 3:  # token logits: padded positions differ by design (HF unmasks them)
        want, got = want[am.bool()], got[am.bool()]
    torch.testing.assert_close(want, got, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", FAMILIES)
def test_training_lowers_loss(kind):
    m = up.apply_unipelt(
        tiny_model(kind), up.UniPELTConfig(lora=True, adapter=ADAPTER), backend="eager"
    )
    m.train()
    b = batch(kind)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = m(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_same_grads(kind, reentrant):
    grads = checkpointing_grads(lambda: pelt(kind), batch(kind), reentrant)
    assert grads[0].keys() == grads[1].keys()
    assert any("prefix" in n for n in grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)
        if "prefix" in n or "adapters" in n:
            assert grads[1][n].abs().sum() > 0, n


@pytest.mark.parametrize("kind", FAMILIES)
def test_mixed_task_batch_equals_per_task(kind):
    cfg = up.UniPELTConfig(
        lora=True, prompt=True, gate_mode="masked_mean", tasks=("a", "b"), adapter=ADAPTER
    )
    m = pelt(kind, cfg)
    b = batch(kind)
    tid = torch.tensor([1, 0, 1])
    with torch.no_grad():
        mixed = _logits(m, b, task_ids=tid)
        per = torch.cat(
            [
                _logits(m, {k: v[i : i + 1] for k, v in b.items()}, task_ids=tid[i : i + 1])
                for i in range(B)
            ]
        )
        other = _logits(m, b, task_ids=1 - tid)
    torch.testing.assert_close(mixed, per, rtol=1e-5, atol=1e-6)
    assert (mixed - other).abs().max() > 1e-3  # the tasks really differ
    report = up.trainable_report(m)
    for what in ("adapter", "prefix", "lora", "prompt"):
        assert f"  {what} " in report, report
    assert ("  bitfit " in report) == (kind not in ("llama", "mistral"))  # no biases there
    up.set_active_task(m, "b")  # the default for forwards without task_ids
    with torch.no_grad():
        all_b = _logits(m, b)
    up.set_active_task(m, 0)
    torch.testing.assert_close(all_b, _logits(m, b, task_ids=torch.ones(B, dtype=torch.long)))
    with pytest.raises(ValueError):
        up.set_active_task(m, "c")
    with pytest.raises(ValueError, match="task_ids"):
        _logits(m, b, task_ids=torch.tensor([0, 2, 1]))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_mixed_task_gradients(kind):
    """Gradients of a mixed batch equal the sum of the per-task sub-batches' gradients."""
    cfg = up.UniPELTConfig(lora=True, tasks=("a", "b"), adapter=ADAPTER)
    b = batch(kind)
    tid = torch.tensor([1, 0, 1])
    m = pelt(kind, cfg)
    _logits(m, b, task_ids=tid).float().pow(2).sum().backward()
    mixed = trainable_grads(m)
    m.zero_grad()
    for t in (0, 1):
        sel = (tid == t).nonzero().squeeze(1)
        sub = {k: v[sel] for k, v in b.items()}
        _logits(m, sub, task_ids=tid[sel]).float().pow(2).sum().backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(mixed[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "qwen2"])
def test_eject_identical(kind):
    m = pelt(kind)
    b = batch(kind)
    with torch.no_grad():
        before = _logits(m, b)
        up.eject(m)
        after = _logits(m, b)
    assert m.unipelt.prefix.is_ejected and not hasattr(m.unipelt.prefix, "mlp")
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_layer_prefix_matches_encoder():
    m = pelt("llama")
    root = m.unipelt
    full = root.prefix()
    for i in range(2):
        for a, b_ in zip(root.layer_prefix(i), full[i], strict=True):
            torch.testing.assert_close(a, b_)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_autocast_bf16(kind):
    m = pelt(kind)
    b = batch(kind)
    with torch.no_grad():
        ref = _logits(m, b).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _logits(m, b).float()
    err = (got - ref).norm() / ref.norm()
    assert err < 5e-2, err
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(**b).loss
    loss.backward()
    assert m.unipelt.prefix.embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", DECODERS)
def test_generate_kv_cache_matches_no_cache(kind):
    """Greedy decoding with the KV cache (prefix not in it) equals decoding without one. Gate
    mode "token" (the prefix gate then uses masked_mean over the step's tokens, so it is the
    only gate that differs with a cache; turn it off here)."""
    cfg = up.UniPELTConfig(
        lora=True, gate_mode="token", prefix=up.PrefixConfig(gate=False), adapter=ADAPTER
    )
    m = pelt(kind, cfg)
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    am = torch.ones_like(ids)
    am[1, :2] = 0  # left padding, as generate expects for decoders
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = m.generate(input_ids=ids, attention_mask=am, use_cache=True, **kw)
        plain = m.generate(input_ids=ids, attention_mask=am, use_cache=False, **kw)
    assert cached.shape == (2, 10)
    torch.testing.assert_close(cached, plain)
    with torch.no_grad():  # the prefix never enters the KV cache
        out = m(input_ids=ids, attention_mask=am, use_cache=True)
    assert out.past_key_values.get_seq_length() == ids.shape[1]


def _left_padded():
    ids = torch.randint(2, 64, (3, 5), generator=torch.Generator().manual_seed(3))
    am = torch.ones_like(ids)
    am[1, :2] = 0
    am[2, :1] = 0
    return ids, am


@pytest.mark.parametrize("kind", ("gpt2", "llama"))
def test_generate_with_soft_prompt_equals_the_prompted_base_model(kind):
    """generate() with a soft prompt runs peft's prompt tuning for generation: the prompt
    in front of the input embeddings at the prefill only (later steps read it from the
    cache), ones for it in the mask, positions 0, 1, ... over prompt and tokens (padding
    included; generate's position_ids are ignored, as peft does). The reference decodes
    without a cache through the untouched base model, given [prompt ; embed(tokens)] at
    every step; left-padded batch, step logits and tokens."""
    cfg = up.UniPELTConfig(
        prompt=up.PromptConfig(length=3, gate=False), prefix=False, adapter=False, bitfit=False
    )
    m, base = pelt(kind, cfg), tiny_model(kind)
    prompt = m.unipelt.prompt.embeddings[0].detach()
    ids, am = _left_padded()

    def prompted(seq, mask):
        emb = base.get_input_embeddings()(seq)
        x = torch.cat([prompt.expand(seq.shape[0], -1, -1), emb], 1)
        full = torch.cat([mask.new_ones(mask.shape[0], 3), mask], 1)
        return base(inputs_embeds=x, attention_mask=full).logits[:, -1]

    want_seq, want = greedy(prompted, ids, am)
    got_seq, got = generate_logits(m, ids, am)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_seq, want_seq)
    no_cache, _ = generate_logits(m, ids, am, use_cache=False)
    assert torch.equal(no_cache, want_seq)


def test_generate_with_prefix_prompt_and_adapters_equals_the_forward():
    """The whole UniPELT (prefix, gated prompt, adapters, LoRA, BitFit) on LLaMA: generate()
    with the KV cache equals decoding without a cache through the model's forward (which
    prepends the prompt each time). Gate mode "token" and no prefix gate (a mean gate over
    the step's tokens differs by design); the prompt's gate is computed once, from the
    prompt's input at the prefill, so the reference holds the prompt at its first value."""
    cfg = up.UniPELTConfig(
        lora=True, gate_mode="token", prefix=up.PrefixConfig(gate=False), adapter=ADAPTER,
        prompt=up.PromptConfig(length=3),
    )  # fmt: skip
    m = pelt("llama", cfg)
    ids, am = _left_padded()
    first = {}

    def hold(mod, args, out):
        return first.setdefault("p", out)

    h = m.unipelt.prompt.register_forward_hook(hold)
    try:
        want_seq, want = greedy(
            lambda s, k: m(input_ids=s, attention_mask=k).logits[:, -1], ids, am
        )
    finally:
        h.remove()
    got_seq, got = generate_logits(m, ids, am)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_seq, want_seq)
    assert (first["p"] - m.unipelt.prompt.embeddings[0]).abs().max() > 1e-3  # the gate acted


def test_unsupported_model_and_twice():
    import transformers as tf

    with pytest.raises(TypeError):
        up.apply_unipelt(torch.nn.Linear(2, 2))
    m = pelt("bert")
    with pytest.raises(ValueError, match="already"):
        up.apply_unipelt(m)
    # BLOOM (fused query_key_value with ALiBi, no family table) is not a supported family
    bloom = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4))
    before = {n: p.requires_grad for n, p in bloom.named_parameters()}
    with pytest.raises(NotImplementedError, match="found 0 attention"):
        up.apply_unipelt(bloom)
    assert {n: p.requires_grad for n, p in bloom.named_parameters()} == before
    assert not hasattr(bloom, "unipelt")


def _vis(B, Lq, Lk, kpm, causal):
    from unipelt_fast.reference import token_key_visibility

    return token_key_visibility(B, Lq, Lk, kpm, causal, torch.device("cpu"))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", ["bool", "additive", "row"])
def testconvert_mask_forms(causal, form):
    from unipelt_fast.hf import convert_mask

    B, Lq, Lk = 2, 3, 5
    kpm = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 0, 1]], dtype=torch.bool)
    vis = _vis(B, Lq, Lk, kpm, causal)
    if form == "additive":
        mask = torch.zeros(vis.shape).masked_fill(~vis, torch.finfo(torch.float32).min)
    elif form == "row":  # 4.x BERT-style (B, 1, 1, Lk) extended mask
        mask = torch.zeros(B, 1, 1, Lk).masked_fill(~kpm[:, None, None], -10000.0)
    else:
        mask = vis
    q, k = torch.randn(B, 2, Lq, 4), torch.randn(B, 2, Lk, 4)
    got_kpm, got_causal, k2, _ = convert_mask(mask, causal, q, k, k)
    assert torch.equal(got_kpm, kpm) and got_causal == causal and k2.shape == k.shape
    # the model's flag is wrong but the mask is clear: the mask wins (GPT-2 on 4.x)
    if form != "row":
        assert convert_mask(mask, not causal, q, k, k)[1] == causal


def testconvert_mask_static_cache_and_unsupported():
    from unipelt_fast.hf import convert_mask

    B, Lq, Lk = 1, 3, 8  # prefill of 3 tokens into a static cache of 8 slots
    vis = torch.zeros(B, 1, Lq, Lk, dtype=torch.bool)
    vis[0, 0, :, :3] = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    q, k = torch.randn(B, 2, Lq, 4), torch.randn(B, 2, Lk, 4)
    kpm, causal, k2, v2 = convert_mask(vis, True, q, k, k)
    assert kpm is None and causal and k2.shape[2] == 3 and torch.equal(k2, k[:, :, :3])
    # a sliding window of 2 over 4 tokens is not padding + causal
    win = torch.tril(torch.ones(4, 4, dtype=torch.bool)) & ~torch.tril(
        torch.ones(4, 4, dtype=torch.bool), diagonal=-2
    )
    q4 = torch.randn(1, 2, 4, 4)
    with pytest.raises(NotImplementedError, match="causal"):
        convert_mask(win[None, None], True, q4, q4, q4)


def test_model_split_over_devices_is_refused():
    m = tiny_model("llama")
    m.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1}
    before = {n: p.requires_grad for n, p in m.named_parameters()}
    with pytest.raises(NotImplementedError, match="split over devices"):
        up.apply_unipelt(m, up.UniPELTConfig())
    assert {n: p.requires_grad for n, p in m.named_parameters()} == before
    assert not hasattr(m, "unipelt")
