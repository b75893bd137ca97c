"""The HF tests' shared helpers: tiny models (hidden 32, vocab 64) built from configs,
their batches, parameter perturbation, and the adapter formula the placement tests use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers as tf
from transformers import DynamicCache

import unipelt_fast as up
from unipelt_fast.hf import attention

FAMILIES = ("bert", "roberta", "gpt2", "llama", "mistral", "qwen2")
DECODERS = ("gpt2", "llama", "mistral", "qwen2")
VOCAB, B, L = 64, 3, 8
LS, LT = 7, 5  # encoder-decoders: source and target lengths
PAD, BOS, EOS = 1, 0, 2
# hidden/16 = 2 bottleneck units at hidden 32: too few (relu can kill both); use 8 in tests
ADAPTER = up.AdapterConfig(bottleneck=8)


def tiny_model(kind: str, seed: int = 0):
    """A fresh tiny model; the same seed gives the same base weights."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    enc = dict(
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    dec = dict(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "bert":
        m = tf.BertForSequenceClassification(tf.BertConfig(**common, **enc))
    elif kind == "roberta":
        m = tf.RobertaForSequenceClassification(tf.RobertaConfig(**common, **enc, pad_token_id=1))
    elif kind == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        m = tf.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(**common, **dec, bos_token_id=0, eos_token_id=0))
    elif kind == "mistral":
        m = tf.MistralForCausalLM(tf.MistralConfig(**common, **dec, bos_token_id=0, eos_token_id=0))
    elif kind == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, **dec, bos_token_id=0, eos_token_id=0))
    else:
        raise ValueError(kind)
    return m.eval()


def batch(kind: str, seed: int = 1, pad: bool = True, n: int = B) -> dict:
    """input_ids/attention_mask/labels; example 1 is right-padded (left-padded for decoders'
    generate tests is built separately)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, L), generator=g)
    am = torch.ones(n, L, dtype=torch.long)
    if pad:
        am[1, 5:] = 0
    out = {"input_ids": ids, "attention_mask": am}
    if kind in DECODERS:
        out["labels"] = ids.masked_fill(am == 0, -100)
    else:
        out["labels"] = torch.randint(0, 3, (n,), generator=g)
    return out


def perturb_params(params, scale: float = 0.3, seed: int = 2) -> None:
    """Move ``params`` off their init, in the order given (zero-init B/up would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def perturb(model, scale: float = 0.3, seed: int = 2) -> None:
    """Move every trainable parameter off its init, in name order."""
    named = sorted(model.named_parameters(), key=lambda t: t[0])
    perturb_params([p for _, p in named if p.requires_grad], scale, seed)


def reference_run(loss_of, base, handles, params):
    """The independent formulation's side of a test: ``loss_of(base) -> (out, loss)`` with
    ``handles`` (hooks on ``base`` computing a formula) in place; returns the output and
    the gradients of ``params``, then removes the hooks and clears those gradients."""
    want, loss = loss_of(base)
    loss.backward()
    want_g = [p.grad.clone() for p in params]
    for h in handles:
        h.remove()
    for p in params:
        p.grad = None
    return want, want_g


def hf_cache_reference(
    model,
    batch: dict,
    position_offset: int = 0,
    attn: str = "sdpa",
    position_ids: torch.Tensor | None = None,
    **kw,
) -> torch.Tensor:
    """The prefix path's independent formulation: ``model`` on HF's own ``attn`` attention
    (sdpa; "eager" where sdpa lacks a feature: Gemma 2's soft cap, gpt-oss's sinks) with
    the gated prefix fed as past key values (peft's way of doing prefix tuning), positions
    given explicitly (``position_ids``, or from ``position_offset``) so that the prefix
    takes none. Returns the logits; ``kw`` goes to the forward."""
    am = batch["attention_mask"]
    Bn, Ln = am.shape
    root = model.unipelt
    P = root.prefix.prefix_len
    attns = [mod for mod in model.modules() if "unipelt_site" in mod.__dict__]
    cache = DynamicCache()
    for i, (pk, pv) in enumerate(root.prefix()):
        cache.update(pk.expand(Bn, -1, -1, -1).clone(), pv.expand(Bn, -1, -1, -1).clone(), i)

    def gate_hook(i):
        def hook(mod, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            g = root.prefix_gates[i][0](h, am.bool())[:, None, None, None]
            lay = cache.layers[i]
            lay.keys = torch.cat([lay.keys[:, :, :P] * g, lay.keys[:, :, P:]], 2)
            lay.values = torch.cat([lay.values[:, :, :P] * g, lay.values[:, :, P:]], 2)

        return hook

    hooks = [
        a.register_forward_pre_hook(gate_hook(i), with_kwargs=True, prepend=True)
        for i, a in enumerate(attns)
        if root.prefix_gates is not None  # PrefixConfig(gate=False): the prefix as it is
    ]
    model.config._attn_implementation = attn
    try:
        return model(
            input_ids=batch["input_ids"],
            attention_mask=torch.cat([torch.ones(Bn, P, dtype=am.dtype), am], 1),
            past_key_values=cache,
            position_ids=(
                torch.arange(Ln).expand(Bn, Ln) + position_offset
                if position_ids is None
                else position_ids
            ),
            **kw,
        ).logits
    finally:
        model.config._attn_implementation = attention.ATTN_NAME
        for h in hooks:
            h.remove()


def explicit_prefix_reference(model, batch: dict) -> torch.Tensor:
    """The prefix path's independent formulation where HF takes no past key values (encoders):
    ``model`` with every prefixed attention module's attention replaced by an explicit
    ``[g * prefix ; keys]`` concatenation and SDPA with an explicit boolean mask built here
    from the 2-D ``attention_mask`` (bidirectional; a module's ``sliding_window`` w keeps
    ``|i - j| < w``). Returns the logits."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    am = batch["attention_mask"].bool()
    root = model.unipelt
    prefixes = root.prefix()
    gates: dict[int, torch.Tensor] = {}

    def gate_hook(mod, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        i = mod.__dict__["unipelt_site"].index
        gates[i] = root.prefix_gates[i][0](h, am).reshape(-1)

    def explicit(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        i = module.__dict__["unipelt_site"].index
        Bn, H, Lq, D = query.shape
        g = gates[i][:, None, None, None]
        pk, pv = (t.expand(Bn, -1, -1, -1) * g for t in prefixes[i])
        keys, vals = torch.cat([pk, key], 2), torch.cat([pv, value], 2)
        rep = H // keys.shape[1]
        keys, vals = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
        tok = am[:, None, None, :].expand(Bn, 1, Lq, key.shape[2])
        w = getattr(module, "sliding_window", None)
        if w is not None:
            i_, j_ = torch.arange(Lq)[:, None], torch.arange(key.shape[2])[None]
            tok = tok & ((i_ - j_).abs() < w)
        P = pk.shape[2]
        allowed = torch.cat([torch.ones(Bn, 1, Lq, P, dtype=torch.bool), tok], -1)
        o = F.scaled_dot_product_attention(query, keys, vals, attn_mask=allowed, scale=scaling)
        return o.transpose(1, 2), None

    AttentionInterface.register("explicit_prefix_test", explicit)
    AttentionMaskInterface.register("explicit_prefix_test", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    attns = [mod for mod in model.modules() if "unipelt_site" in mod.__dict__]
    hooks = [a.register_forward_pre_hook(gate_hook, with_kwargs=True, prepend=True) for a in attns]
    model.config._attn_implementation = "explicit_prefix_test"
    try:
        return model(**batch).logits
    finally:
        model.config._attn_implementation = attention.ATTN_NAME
        for h in hooks:
            h.remove()


def greedy(step_logits, ids, am, n: int = 4):
    """Greedy decoding without a cache: ``step_logits(seq, mask)`` gives the last position's
    logits. Returns the sequences and the (B, n, V) step logits."""
    seq, mask, steps = ids, am, []
    with torch.no_grad():
        for _ in range(n):
            logits = step_logits(seq, mask)
            steps.append(logits)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return seq, torch.stack(steps, 1)


def generate_logits(m, ids, am, n: int = 4, **kw):
    """generate() (greedy, KV cache; EOS off so that every example runs n steps): the
    sequences and the (B, n, V) raw step logits."""
    with torch.no_grad():
        out = m.generate(
            input_ids=ids, attention_mask=am, max_new_tokens=n, eos_token_id=None,
            do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
            **kw,
        )  # fmt: skip
    return out.sequences, torch.stack(out.logits, 1)


def checkpointing_grads(make, b: dict, reentrant: bool) -> list[dict[str, torch.Tensor]]:
    """Trainable grads of ``make()`` in train mode on ``b``, without and with gradient
    checkpointing."""
    grads = []
    for ckpt in (False, True):
        m = make()
        m.train()
        if ckpt:
            m.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant}
            )
        m(**b).loss.backward()
        grads.append(trainable_grads(m))
    return grads


def formula_adapter(z, ad):
    """An adapter by its formula (AdapterHub): g * scaling * up(relu(down(z))), g the sequence
    mean of sigmoid(gate(z)); the placement tests' independent formulation."""
    out = F.linear(F.relu(F.linear(z, ad.down.weight, ad.down.bias)), ad.up.weight, ad.up.bias)
    out = out * ad.scaling
    if ad.gate is not None:
        out = out * torch.sigmoid(F.linear(z, ad.gate.weight, ad.gate.bias)).mean(1, keepdim=True)
    return out


def formula_lora(x, unit, scale: float):
    """A LoRA unit's delta by its formula: g * scale * B(A(x)), g the sequence mean of
    sigmoid(gate(x)) (gate_mode "mean"); the LoRA placement tests' independent formulation."""
    g = torch.sigmoid(F.linear(x, unit.gate.proj.weight, unit.gate.proj.bias)).mean(1, True)
    return g * scale * F.linear(F.linear(x, unit.A.weight), unit.B.weight)


def pelt(kind: str, cfg: up.UniPELTConfig | None = None, backend: str = "eager", seed: int = 0):
    cfg = cfg or up.UniPELTConfig(lora=True, gate_mode="masked_mean", adapter=ADAPTER)
    m = up.apply_unipelt(tiny_model(kind, seed), cfg, backend=backend)
    perturb(m)
    return m


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def tiny_bart(seed: int = 0, kind: str = "bart"):
    """A fresh tiny encoder-decoder (BART family, or T5/mT5), 1 layer per stack (T5: 2)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        decoder_start_token_id=BOS, forced_eos_token_id=None,
    )  # fmt: skip
    if kind == "bart":
        return tf.BartForConditionalGeneration(tf.BartConfig(**common)).eval()
    if kind == "marian":
        return tf.MarianMTModel(tf.MarianConfig(**common)).eval()
    if kind == "mbart":  # pre-LN
        return tf.MBartForConditionalGeneration(tf.MBartConfig(**common)).eval()
    if kind == "pegasus":  # pre-LN, sinusoidal positions
        return tf.PegasusForConditionalGeneration(tf.PegasusConfig(**common)).eval()
    if kind in ("t5", "mt5"):  # 2 blocks: block 1 reuses block 0's relative position bias
        cfg = (tf.T5Config if kind == "t5" else tf.MT5Config)(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            dropout_rate=0.0, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=BOS,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
        )  # fmt: skip
        if kind == "mt5":
            return tf.MT5ForConditionalGeneration(cfg).eval()
        return tf.T5ForConditionalGeneration(cfg).eval()
    raise ValueError(kind)


def bart_batch(seed: int = 1, LT: int = LT) -> dict:
    """Encoder-decoder batch: example 1 has a padded source, example 2 a padded target."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, LS), generator=g)
    am = torch.ones(B, LS, dtype=torch.long)
    am[1, 4:] = 0  # a right-padded source
    labels = torch.randint(3, VOCAB, (B, LT), generator=g)
    dam = torch.ones(B, LT, dtype=torch.long)
    dam[2, 3:] = 0  # a padded target
    labels = labels.masked_fill(dam == 0, -100)
    dec_in = tf.models.bart.modeling_bart.shift_tokens_right(labels, PAD, BOS)
    return {
        "input_ids": ids,
        "attention_mask": am,
        "decoder_input_ids": dec_in,
        "decoder_attention_mask": dam,
        "labels": labels,
    }
