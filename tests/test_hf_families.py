"""LoRA, the soft prompt and BitFit on the decoder families of tests/hf_families.py, each
against an independent formulation on the untouched base model: LoRA as forward hooks on
q_proj/v_proj adding ``g * alpha/r * B(A(x))``; the prompt as explicit ``inputs_embeds``
``[g * prompt ; embed(ids)]`` with the mask extended; BitFit as the base model with the
trained biases copied in (and every bias of the model trained). These back the support
table's cells (tests/support_matrix.py)."""

import pytest
import torch
import torch.nn.functional as F

import unipelt_fast as up
from tests.hf_families import tiny, tiny_batch
from tests.hf_tiny import formula_lora, generate_logits, greedy
from tests.hf_tiny import perturb_params as _perturb

DECODERS = (
    "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite",
    "stablelm", "smollm3", "mixtral", "qwen3_moe", "gpt_oss", "phi3", "gpt_neox", "falcon", "opt",
    "cohere", "gptj",
)  # fmt: skip
ENCODERS = ("distilbert", "deberta_v2", "modernbert")
R, ALPHA, P = 4, 8.0, 3
H, D = 4, 8  # tests/hf_families.py: 4 heads of 8


def _span(a: int, b: int) -> list[int]:
    return list(range(a, b))


# The projections LoRA on query/value updates, by leaf name, with the output columns that are
# the query's and the value's in a fused projection (None: the whole output), as each
# family's modeling code splits it (transformers 5.x).
FUSED = {
    "phi3": ("qkv_proj", _span(0, 32) + _span(48, 64)),  # [q 32 | k 16 | v 16] (2 kv heads)
    # (H, 3, D) interleaved per head: each head's q then k then v
    "gpt_neox": ("query_key_value", [c for h in range(H) for c in _span(24 * h, 24 * h + 8)]
                 + [c for h in range(H) for c in _span(24 * h + 16, 24 * h + 24)]),
    "falcon": ("query_key_value", _span(0, 32) + _span(40, 48)),  # multi-query [q | k 8 | v 8]
    "modernbert": ("Wqkv", _span(0, 32) + _span(64, 96)),  # (3, H, D)
}  # fmt: skip
QV = {
    "distilbert": ("q_lin", "v_lin"),
    "deberta_v2": ("query_proj", "value_proj"),
}


def _lora_sites(base, kind: str) -> list[tuple]:
    """(projection, sorted output columns or None) in module order, as apply_unipelt's
    GatedLoRA modules come in ``model.modules()``."""
    if kind in FUSED:
        name, cols = FUSED[kind]
        return [(m, sorted(cols)) for n, m in base.named_modules() if n.endswith("." + name)]
    names = QV.get(kind, ("q_proj", "v_proj"))
    return [(m, None) for n, m in base.named_modules() if n.rpartition(".")[2] in names]


def _loss(logits):
    return (logits * torch.linspace(-1, 1, logits.shape[-1])).sum()


@pytest.mark.parametrize("kind", (*DECODERS, *ENCODERS))
def test_lora_and_prompt_match_formula(kind):
    """LoRA on q/v and the soft prompt together (one model build per family): logits and the
    gradients of every LoRA and prompt parameter. On a fused q/k/v projection the update
    covers the query's and value's columns only."""
    cfg = up.UniPELTConfig(
        bitfit=False,
        adapter=False,
        prefix=False,
        gate_mode="mean",
        lora=up.LoRAConfig(r=R, alpha=ALPHA),
        prompt=up.PromptConfig(length=P, gate=True),
        modules_to_save=(),  # the encoders' heads stay the base model's
    )
    m = up.apply_unipelt(tiny(kind), cfg, backend="eager")
    params = [p for p in m.parameters() if p.requires_grad]
    _perturb(params)
    loras = [mod for mod in m.modules() if isinstance(mod, up.GatedLoRA)]
    prompt = m.unipelt.prompt
    b = tiny_batch(kind)
    ids, am = b["input_ids"], b["attention_mask"]

    base = tiny(kind)
    sites = _lora_sites(base, kind)
    assert len(sites) == len(loras) == (2 if kind in FUSED else 4)
    handles = []
    for (proj, cols), lo in zip(sites, loras, strict=True):
        u = lo.units[0]

        def hook(mod, args, out, u=u, cols=cols):
            delta = formula_lora(args[0], u, ALPHA / R)
            if cols is None:
                return out + delta
            return out.index_add(-1, torch.tensor(cols), delta)

        handles.append(proj.register_forward_hook(hook))
    e = base.get_input_embeddings()(ids)
    gp = prompt.gates[0].proj
    g = torch.sigmoid(F.linear(e, gp.weight, gp.bias)).mean(1, True)  # "mean": every token
    embeds = torch.cat([g * prompt.embeddings[0].expand(ids.shape[0], -1, -1), e], 1)
    mask = torch.cat([torch.ones(ids.shape[0], P, dtype=am.dtype), am], 1)
    want = base(inputs_embeds=embeds, attention_mask=mask).logits
    _loss(want).backward()
    want_g = [p.grad.clone() for p in params]
    for h in handles:
        h.remove()
    for p in params:
        p.grad = None

    got = m(input_ids=ids, attention_mask=am).logits
    _loss(got).backward()
    real = am.bool() if got.dim() == 3 else slice(None)  # token logits: real tokens only
    if got.dim() == 3:
        got, want = got[:, P:], want[:, P:]
    assert (got[real] - want[real]).norm() <= 1e-5 * want[real].norm()
    for p, gw in zip(params, want_g, strict=True):
        assert (p.grad - gw).norm() <= 1e-4 * gw.norm() + 1e-7  # fp32 sums in another order
    with torch.no_grad():  # the methods matter
        assert (got - base(**b).logits)[real].abs().max() > 1e-3


@pytest.mark.parametrize(
    "kind,config",
    [
        ("gpt2", {}),
        ("phi3", {}),
        ("gpt_neox", {}),
        ("falcon", {}),  # multi-query
        ("falcon", {"multi_query": False}),  # interleaved per head
        ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),  # per kv group
        ("modernbert", {}),
    ],
)
def test_fused_columns_are_the_models_own_split(kind, config):
    """The layout's column ranges of a fused q/k/v projection, against the query, key and value
    the model itself passes to its attention function (at position 0, where rotary
    embeddings are the identity): the ranges, concatenated, give each role's heads in order."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    from unipelt_fast.hf.families import model_layout

    model = tiny(kind, **config)
    seen = {}

    def record(module, query, key, value, *args, **kwargs):
        seen[id(module)] = (query, key, value)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, *args, **kwargs)

    AttentionInterface.register("record_test", record)
    AttentionMaskInterface.register("record_test", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.config._attn_implementation = "record_test"
    blk = model_layout(model).attention[0]
    parent, attr, _ = blk.projections["query"]
    fused = {}
    getattr(parent, attr).register_forward_hook(lambda m, a, out: fused.update(y=out))
    ids = torch.randint(3, 64, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
    q, k, v = seen[id(blk.module)]
    for role, t in zip(("query", "key", "value"), (q, k, v), strict=True):
        cols = blk.projections[role][2]
        got = torch.cat([fused["y"][0, 0, a:b] for a, b in cols])
        torch.testing.assert_close(got, t[0, :, 0, :].reshape(-1))


BIASED = (
    "bert", "roberta", "gpt2", "qwen2", "stablelm", "bart", "gpt_neox", "falcon", "opt", "gptj",
    "distilbert", "deberta_v2", "modernbert",
)  # fmt: skip


@pytest.mark.parametrize("kind", DECODERS)
def test_generate_with_soft_prompt_equals_the_prompted_base_model(kind):
    """generate() with the soft prompt (KV cache, left-padded batch; peft's semantics, see
    docs/usage-hf.md) equals greedy decoding without a cache through the untouched base
    model given ``[prompt ; embed(tokens)]`` and the mask with ones in front: step logits
    and tokens."""
    cfg = up.UniPELTConfig(
        bitfit=False, adapter=False, prefix=False, prompt=up.PromptConfig(length=P, gate=False)
    )
    m, base = up.apply_unipelt(tiny(kind), cfg, backend="eager"), tiny(kind)
    _perturb([m.unipelt.prompt.embeddings])
    prompt = m.unipelt.prompt.embeddings[0].detach()
    b = tiny_batch(kind, length=5)

    def prompted(seq, mask):
        x = torch.cat([prompt.expand(seq.shape[0], -1, -1), base.get_input_embeddings()(seq)], 1)
        full = torch.cat([mask.new_ones(mask.shape[0], P), mask], 1)
        return base(inputs_embeds=x, attention_mask=full).logits[:, -1]

    want_seq, want = greedy(prompted, b["input_ids"], b["attention_mask"], n=3)
    got_seq, got = generate_logits(m, b["input_ids"], b["attention_mask"], n=3)
    assert (got - want).norm() <= 1e-5 * want.norm()
    assert torch.equal(got_seq, want_seq)




@pytest.mark.parametrize("kind", BIASED)
def test_bitfit_matches_base_with_the_biases(kind):
    cfg = up.UniPELTConfig(prefix=False, adapter=False, lora=False, bitfit=True)
    m = up.apply_unipelt(tiny(kind), cfg, backend="eager")
    trained = {n: p for n, p in m.named_parameters() if p.requires_grad}
    base = tiny(kind)
    heads = ("classifier.", "score.")  # trained in full
    biases = {n for n, _ in base.named_parameters() if n.endswith("bias")}
    body = {n for n in trained if not n.startswith(heads)}
    assert body == {n for n in biases if not n.startswith(heads)}  # every bias, only biases
    _perturb(list(trained.values()))
    with torch.no_grad():
        own = dict(base.named_parameters())
        for n, p in trained.items():
            own[n].copy_(p)
    b = tiny_batch(kind)
    with torch.no_grad():
        got, want, plain = (mod(**b).logits for mod in (m, base, tiny(kind)))
    if got.dim() == 3 and kind != "bart":  # token logits: padded positions are not compared
        real = b["attention_mask"].bool()
        got, want, plain = got[real], want[real], plain[real]
    assert (got - want).norm() <= 1e-5 * want.norm()
    assert (got - plain).abs().max() > 1e-3  # the biases matter
