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
    "stablelm", "smollm3", "mixtral", "qwen3_moe", "gpt_oss",
)  # fmt: skip
R, ALPHA, P = 4, 8.0, 3


def _loss(logits):
    return (logits * torch.linspace(-1, 1, logits.shape[-1])).sum()


@pytest.mark.parametrize("kind", DECODERS)
def test_lora_and_prompt_match_formula(kind):
    """LoRA on q/v and the soft prompt together (one model build per family): logits and the
    gradients of every LoRA and prompt parameter."""
    cfg = up.UniPELTConfig(
        bitfit=False,
        adapter=False,
        prefix=False,
        gate_mode="mean",
        lora=up.LoRAConfig(r=R, alpha=ALPHA),
        prompt=up.PromptConfig(length=P, gate=True),
    )
    m = up.apply_unipelt(tiny(kind), cfg, backend="eager")
    params = [p for p in m.parameters() if p.requires_grad]
    _perturb(params)
    loras = [mod for mod in m.modules() if isinstance(mod, up.GatedLoRA)]
    prompt = m.unipelt.prompt
    b = tiny_batch(kind)
    ids, am = b["input_ids"], b["attention_mask"]

    base = tiny(kind)
    projs = [p for blk in base.model.layers for p in (blk.self_attn.q_proj, blk.self_attn.v_proj)]
    assert len(projs) == len(loras)
    handles = []
    for proj, lo in zip(projs, loras, strict=True):
        u = lo.units[0]

        def hook(mod, args, out, u=u):
            return out + formula_lora(args[0], u, ALPHA / R)

        handles.append(proj.register_forward_hook(hook))
    e = base.get_input_embeddings()(ids)
    gp = prompt.gates[0].proj
    g = torch.sigmoid(F.linear(e, gp.weight, gp.bias)).mean(1, True)  # "mean": every token
    embeds = torch.cat([g * prompt.embeddings[0].expand(ids.shape[0], -1, -1), e], 1)
    mask = torch.cat([torch.ones(ids.shape[0], P, dtype=am.dtype), am], 1)
    want = base(inputs_embeds=embeds, attention_mask=mask).logits[:, P:]
    _loss(want).backward()
    want_g = [p.grad.clone() for p in params]
    for h in handles:
        h.remove()
    for p in params:
        p.grad = None

    got = m(input_ids=ids, attention_mask=am).logits[:, P:]
    _loss(got).backward()
    real = am.bool()
    assert (got[real] - want[real]).norm() <= 1e-5 * want[real].norm()
    for p, gw in zip(params, want_g, strict=True):
        assert (p.grad - gw).norm() <= 1e-4 * gw.norm() + 1e-7  # fp32 sums in another order
    with torch.no_grad():  # the methods matter
        assert (got - base(**b).logits)[real].abs().max() > 1e-3


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


BIASED = ("bert", "roberta", "gpt2", "qwen2", "stablelm", "bart")


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
