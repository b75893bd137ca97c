"""The attention contract (docs/attention-contract.md): every keyword argument transformers
passes the "unipelt" attention function is implemented, refused when on, or allowlisted
with a reason. Never dropped.

The recording test runs every family this package accepts (tiny random configs, a padded
forward and a cached generate()) and fails on any argument that is in none of the three
lists, so a transformers release that adds one is caught here, not by a user's silently
different logits."""

import sys

import pytest
import torch
import transformers
from transformers.modeling_utils import AttentionInterface

import unipelt_fast as up
from tests.hf_families import ALL, DECODERS, tiny, tiny_batch
from tests.hf_tiny import (
    explicit_prefix_reference,
    generate_logits,
    greedy,
    hf_cache_reference,
    perturb,
)
from unipelt_fast.hf import attention

KNOWN = (
    attention.IMPLEMENTED_KWARGS | set(attention.REFUSED_WHEN_ON) | set(attention.IGNORED_KWARGS)
)
# Families apply_unipelt accepts whose attention passes an argument that is on and not
# implemented: the prefix is refused at the first forward, naming the feature.
REFUSED: dict[str, str] = {}  # soft-capping (Gemma 2) and sinks (gpt-oss) are implemented
# Prefixes apply_unipelt itself refuses: (family, config overrides, the reason it gives).
REFUSED_UP_FRONT = [
    ("deberta_v2", {}, "disentangled attention computes its scores itself"),
    ("falcon", {"alibi": True}, "ALiBi position bias through the attention mask"),
]
NOT_ACCEPTED = ("deberta_v2",)
ACCEPTED = tuple(k for k in ALL if k not in NOT_ACCEPTED)
PREFIX = up.UniPELTConfig(adapter=False, lora=False, bitfit=False, gate_mode="masked_mean")


def _recorder(monkeypatch) -> tuple[list[set], list[str]]:
    """Route the registered "unipelt" attention through a recorder of its keyword names.
    Where unipelt_attention refuses (a family in REFUSED), the call goes on in the model's
    own eager attention, so that every later call's arguments are recorded too."""
    seen: list[set] = []
    refusals: list[str] = []

    def record(module, query, key, value, attention_mask, **kwargs):
        seen.append(set(kwargs))
        try:
            return attention.unipelt_attention(module, query, key, value, attention_mask, **kwargs)
        except NotImplementedError as e:
            refusals.append(str(e))
            site = module.__dict__.get("unipelt_site")  # drop the gate its pre-hook parked
            if site is not None:
                site.root.gate_slots.pop(site.index, None)
            eager = sys.modules[type(module).__module__].eager_attention_forward
            return eager(module, query, key, value, attention_mask, **kwargs)

    up.hf.attention._register()
    monkeypatch.setitem(AttentionInterface._global_mapping, attention.ATTN_NAME, record)
    return seen, refusals


def test_the_three_lists_are_disjoint_and_every_entry_has_a_reason():
    imp, ref, ign = (
        attention.IMPLEMENTED_KWARGS,
        set(attention.REFUSED_WHEN_ON),
        set(attention.IGNORED_KWARGS),
    )
    assert not (imp & ref) and not (imp & ign) and not (ref & ign)
    assert all(len(reason) > 30 for reason in attention.IGNORED_KWARGS.values())
    assert all(len(f) > 10 and len(todo) > 10 for f, todo in attention.REFUSED_WHEN_ON.values())


@pytest.mark.parametrize("kind", ACCEPTED)
def test_every_argument_is_implemented_refused_or_allowlisted(kind, monkeypatch):
    seen, refusals = _recorder(monkeypatch)
    m = up.apply_unipelt(tiny(kind), PREFIX, backend="eager")
    b = tiny_batch(kind)
    m.train()  # the training-time arguments (dropout) too
    m(**b)
    m.eval()
    if kind in DECODERS:  # the cached decoding steps' arguments
        with torch.no_grad():
            m.generate(**b, max_new_tokens=2, do_sample=False, pad_token_id=0)
    if kind in REFUSED:
        assert refusals and all(REFUSED[kind] in r for r in refusals), refusals[:1]
    else:
        assert not refusals, refusals[:1]
    names = set().union(*seen)
    assert seen and "scaling" in names and "dropout" in names  # the recorder saw the calls
    unknown = names - KNOWN
    assert not unknown, (
        f"transformers {transformers.__version__} passes {sorted(unknown)} to the attention "
        f"function for {kind}: implement each, add it to REFUSED_WHEN_ON, or (only if it cannot "
        "change the result) to IGNORED_KWARGS with the reason; see docs/attention-contract.md"
    )


@pytest.mark.parametrize("kind,config,reason", REFUSED_UP_FRONT)
def test_not_accepted_families_are_refused_up_front(kind, config, reason):
    model = tiny(kind, **config)
    with pytest.raises(NotImplementedError, match=reason):
        up.apply_unipelt(model, PREFIX, backend="eager")
    assert not hasattr(model, "unipelt")


def _no_launch(monkeypatch) -> list:
    launches: list = []

    def prefix_attention(*args, **kwargs):
        launches.append(1)
        raise AssertionError("prefix_attention launched")

    monkeypatch.setattr(attention.ops, "prefix_attention", prefix_attention)
    return launches


def test_bidirectional_window_refused_before_any_launch(monkeypatch):
    # ModernBERT's local layers: a window of local_attention/2 + 1 keys on each side; the op's
    # window limits keys from below only (local layer first here; by default layer 0 is
    # global and runs before the refusal)
    launches = _no_launch(monkeypatch)
    config = {"local_attention": 4, "layer_types": ["sliding_attention", "full_attention"]}
    model = tiny("modernbert", **config)
    cfg = up.UniPELTConfig(adapter=up.AdapterConfig(placement="ffn_output"))  # all methods
    m = up.apply_unipelt(model, cfg, backend="eager")
    with pytest.raises(NotImplementedError) as e:
        m(**tiny_batch("modernbert"))
    msg = str(e.value)
    assert all(w in msg for w in ("sliding-window", "prefix=None", "sliding_window=3")), msg
    assert not launches


def test_unknown_argument_refused_and_off_values_accepted():
    mod = tiny("llama").model.layers[0].self_attn
    key = torch.zeros(1, 2, 8, 8)
    with pytest.raises(NotImplementedError, match="'brand_new_flag'.*does not know"):
        attention._check_attention_kwargs(mod, key, {"brand_new_flag": None})
    off = {
        "softcap": None,
        "s_aux": None,
        "sliding_window": 4,  # implemented on the prefix path (test_windowed_prefix_...)
        "output_attentions": False,
        "head_mask": None,
        "cu_seq_lens_q": None,
        "position_ids": torch.arange(8)[None],
        "use_cache": True,
        "is_causal": True,
    }
    attention._check_attention_kwargs(mod, key, off)
    # the sdpa fallback (no prefix on this module): HF's mask carries the window
    attention._check_attention_kwargs(mod, key, {"sliding_window": 7}, prefix=False)
    with pytest.raises(NotImplementedError, match="output_attentions=True"):
        attention._check_attention_kwargs(mod, key, {"output_attentions": True})
    # soft-capping and sinks: implemented on the prefix path, refused on the sdpa fallback
    attention._check_attention_kwargs(mod, key, {"softcap": 50.0, "s_aux": torch.zeros(4)})
    with pytest.raises(NotImplementedError, match="sinks"):
        attention._check_attention_kwargs(mod, key, {"s_aux": torch.zeros(4)}, prefix=False)
    with pytest.raises(NotImplementedError, match="soft-capping"):
        attention._check_attention_kwargs(mod, key, {"softcap": 50.0}, prefix=False)


# Decoders outside tests/hf_tiny.py whose prefix path is exact (Gemma 2: soft-capping on,
# at a cap of 0.02 so that it bends these tiny logits; gpt-oss: its attention sinks).
PREFIX_EXACT = (
    "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "stablelm",
    "smollm3", "mixtral", "qwen3_moe", "gpt_oss", "phi3", "gpt_neox", "falcon", "opt", "cohere",
    "gptj",
)  # fmt: skip


@pytest.mark.parametrize("kind", PREFIX_EXACT)
def test_prefix_equals_hf_cache_reference(kind):
    model = tiny(kind, attn_logit_softcapping=0.02) if kind == "gemma2" else tiny(kind)
    if kind == "gpt_oss":  # sinks that matter (HF initialises them to 0)
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    m = up.apply_unipelt(model, PREFIX, backend="eager")
    perturb(m)
    b = tiny_batch(kind)
    am = b["attention_mask"]
    # OPT counts positions over the real tokens of the mask it is given (here with the prefix)
    pos = {"position_ids": am.cumsum(1) * am - 1} if kind == "opt" else {}
    with torch.no_grad():
        got = m(**b).logits
        # sdpa has no soft cap and drops sinks silently: HF's eager attention has both
        ref_attn = "eager" if kind in ("gemma2", "gpt_oss") else "sdpa"
        want = hf_cache_reference(m, b, attn=ref_attn, **pos)
    real = am.bool()  # padded positions differ by design (HF unmasks them)
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the prefix matters
        m.config._attn_implementation = ref_attn
        plain = m(**b).logits
    assert (plain - got)[real].abs().max() > 1e-3


# The decoders added with the fused and parallel layouts (tests/test_hf_models.py covers GPT-2,
# LLaMA, Mistral, Qwen2).
GENERATE = ("phi3", "gpt_neox", "falcon", "opt", "cohere", "gptj")


@pytest.mark.parametrize("kind", GENERATE)
def test_generate_kv_cache_matches_no_cache(kind):
    """Greedy decoding with the KV cache (the prefix never in it) equals decoding without one,
    with every method on (prefix gate off: with a cache it sees only the step's tokens)."""
    cfg = up.UniPELTConfig(
        lora=True, gate_mode="token", prefix=up.PrefixConfig(gate=False), bitfit=False,
        adapter=up.AdapterConfig(bottleneck=8), prompt=False,
    )  # fmt: skip
    m = up.apply_unipelt(tiny(kind), cfg, backend="eager")
    perturb(m)
    b = tiny_batch(kind, n=2, length=5)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = m.generate(**b, use_cache=True, **kw)
        plain = m.generate(**b, use_cache=False, **kw)
        out = m(**b, use_cache=True)
    assert cached.shape == (2, 9)
    torch.testing.assert_close(cached, plain)
    assert out.past_key_values.get_seq_length() == 5  # the prefix never enters the cache


# Encoders that take no past key values: the prefix against explicit concatenation + SDPA.
ENCODER_PREFIX_EXACT = ("distilbert", "modernbert")


@pytest.mark.parametrize("kind", ENCODER_PREFIX_EXACT)
def test_encoder_prefix_equals_explicit_concat(kind):
    m = up.apply_unipelt(tiny(kind), PREFIX, backend="eager")
    perturb(m)
    b = tiny_batch(kind)
    with torch.no_grad():
        got = m(**b).logits
        want = explicit_prefix_reference(m, b)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the prefix matters
        m.config._attn_implementation = "sdpa"
        plain = m(**b).logits
    assert (plain - got).abs().max() > 1e-3


@pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5, reason="is_causal override: transformers 5"
)
def test_is_causal_override_is_implemented():
    """transformers 5's ``is_causal=False`` (a decoder used bidirectionally) reaches the
    attention function with a padding mask: the prefix path must attend both ways too."""
    m = up.apply_unipelt(tiny("qwen3"), PREFIX, backend="eager")
    perturb(m)
    b = tiny_batch("qwen3")
    with torch.no_grad():
        got = m(**b, is_causal=False).logits
        causal = m(**b).logits
        want = hf_cache_reference(m, b, is_causal=False)
    real = b["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
    assert (got - causal)[real].abs().max() > 1e-3


# Sliding windows, peft's semantics (the prefix as cached keys at positions 0..P-1, inside
# the window too). Window 5, P 3, 10 tokens: queries late in the sequence lose token keys
# and every prefix key, early ones see the prefix. Gemma 2 and gpt-oss: their first layer is
# windowed, their second global (and soft-capping / sinks on); Gemma 3: both local.
WINDOW = 5
WINDOWED = {
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
    "gemma2": dict(sliding_window=WINDOW, attn_logit_softcapping=0.02),
    "gemma3_text": dict(sliding_window=WINDOW),
    "gpt_oss": dict(sliding_window=WINDOW),
}
WINDOW_PREFIX = up.UniPELTConfig(
    adapter=False, lora=False, bitfit=False, gate_mode="masked_mean",
    prefix=up.PrefixConfig(length=3),
)  # fmt: skip


def _windowed(kind: str, backend: str, cfg: up.UniPELTConfig = WINDOW_PREFIX):
    model = tiny(kind, **WINDOWED[kind])
    if kind == "gpt_oss":  # sinks that matter (HF initialises them to 0)
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    m = up.apply_unipelt(model, cfg, backend=backend)
    perturb(m)
    return m


@pytest.mark.parametrize("backend", ("eager", "triton"))
@pytest.mark.parametrize("kind", tuple(WINDOWED))
def test_windowed_prefix_equals_hf_cache_reference(kind, backend):
    """A left-padded batch through windowed layers equals HF's own attention with the prefix
    as past key values (peft's prefix tuning): logits and the gradients of every trainable
    parameter (prefix and its gate)."""
    m = _windowed(kind, backend)
    b = tiny_batch(kind, length=10)
    real = b["attention_mask"].bool()
    w = torch.linspace(-1, 1, 64)
    params = [p for p in m.parameters() if p.requires_grad]
    ref_attn = "eager" if kind in ("gemma2", "gpt_oss") else "sdpa"
    want = hf_cache_reference(m, b, attn=ref_attn)
    (want[real] * w).sum().backward()
    want_g = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    got = m(**b).logits
    (got[real] * w).sum().backward()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
    for p, gw in zip(params, want_g, strict=True):
        assert (p.grad - gw).norm() <= 1e-4 * gw.norm() + 1e-7


def test_windowed_generate_equals_the_hf_cache_reference_without_a_cache():
    """generate() (KV cache; Mistral's cache keeps only window - 1 keys per layer) on a
    left-padded batch equals greedy decoding without a cache by the HF-cache reference at
    every step, positions as generate gives them: step logits and tokens. Prefix ungated
    (a gate from a decoding step's mean differs by design)."""
    cfg = up.UniPELTConfig(
        adapter=False, lora=False, bitfit=False, prefix=up.PrefixConfig(length=3, gate=False)
    )
    m = _windowed("mistral", "eager", cfg)
    b = tiny_batch("mistral", length=6)

    def step(seq, mask):
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # generate's positions
        batch = {"input_ids": seq, "attention_mask": mask}
        return hf_cache_reference(m, batch, position_ids=pos)[:, -1]

    want_seq, want = greedy(step, b["input_ids"], b["attention_mask"], n=4)
    got_seq, got = generate_logits(m, b["input_ids"], b["attention_mask"], n=4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got_seq, want_seq)


def test_window_longer_than_everything_builds_no_bias(monkeypatch):
    """The fast path: no prefix key outside any query's window -> no bias, and no window
    for the op when no token key is outside it either (decided from shapes)."""
    q = torch.zeros(1, 2, 4, 8)
    assert attention.prefix_window_bias(q, 3, 4, None) is None
    assert attention.prefix_window_bias(q, 3, 4, 7) is None  # the farthest: P + Lk - 1 = 6
    assert attention.prefix_window_bias(q, 3, 4, 6) is not None  # hides prefix key 0
    assert attention.prefix_window_bias(q, 0, 4, 2) is None  # no prefix
    bias = attention.prefix_window_bias(q, 3, 4, 5)
    assert bias.shape == (1, 1, 4, 7) and bias.dtype == torch.float32
    # query 3 (position P + 3 = 6) sees prefix positions 2 only; query 0 sees every one
    hidden = bias[0, 0] < 0
    assert hidden[:, 3:].sum() == 0 and hidden[0].sum() == 0 and hidden[3, :3].tolist() == [1, 1, 0]
    calls = []
    real = attention.ops.prefix_attention

    def spy(*args, **kwargs):
        calls.append((kwargs["attn_bias"], kwargs["window"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.ops, "prefix_attention", spy)
    m = up.apply_unipelt(tiny("mistral", sliding_window=64), WINDOW_PREFIX, backend="eager")
    with torch.no_grad():
        m(**tiny_batch("mistral", length=10))
    assert calls and all(b is None and w is None for b, w in calls)


def test_windowed_chunked_prefill_refused_before_any_launch(monkeypatch):
    """A second multi-token forward on Mistral's sliding-window cache: the 4-D mask's window
    cuts off keys, which only a 2-D mask covering the keys can express. Refused, naming
    it, before the op runs in that forward."""
    from transformers import DynamicCache

    cfg = up.UniPELTConfig(
        adapter=False, lora=False, bitfit=False, prefix=up.PrefixConfig(length=3, gate=False)
    )
    m = up.apply_unipelt(tiny("mistral", sliding_window=4), cfg, backend="eager")
    b = tiny_batch("mistral", length=10)
    ids, am = b["input_ids"], b["attention_mask"]
    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        m(input_ids=ids[:, :6], attention_mask=am[:, :6], past_key_values=cache)
        launches = []
        monkeypatch.setattr(attention.ops, "prefix_attention", lambda *a, **k: launches.append(1))
        with pytest.raises(NotImplementedError, match="sliding window"):
            m(input_ids=ids[:, 6:], attention_mask=am, past_key_values=cache)
    assert not launches
