"""from_adapters against the real adapters library (AdapterHub). adapters 1.3 pins
transformers ~=4.57.6, so these run in the test command's second venv (.venv-adapters, see
scripts/test.sh); in the main venv adapters is not installed and they skip."""

import pytest
import torch

import unipelt_fast as up
from tests.hf_tiny import tiny_model
from tests.interop_tiny import DECODER, KINDS, run_both
from tests.interop_tiny import close as _close
from tests.interop_tiny import interop_batch as _batch

adapters = pytest.importorskip("adapters")


def _configs():
    A = adapters
    return {
        "unipelt": A.UniPELTConfig(),
        "seq_bn_ln_before": A.SeqBnConfig(reduction_factor=4, use_gating=True),
        "seq_bn": A.SeqBnConfig(reduction_factor=4, original_ln_before=False, leave_out=[0]),
        "double_seq_bn": A.DoubleSeqBnConfig(reduction_factor=4, use_gating=True),
        "par_bn": A.ParBnConfig(reduction_factor=4),
        "prefix_mlp": A.PrefixTuningConfig(prefix_length=3, bottleneck_size=16),
        "prefix_flat_gated": A.PrefixTuningConfig(
            prefix_length=3, flat=True, use_gating=True, leave_out=[1]
        ),
        "lora_gated": A.LoRAConfig(r=4, alpha=8, use_gating=True, attn_matrices=["q", "k", "v"]),
        "lora": A.LoRAConfig(r=4, alpha=8, leave_out=[0]),
    }


def _run(model, ids, am):
    logits = model(input_ids=ids, attention_mask=am).logits
    if logits.dim() == 3:
        logits = logits[am.bool()]
    w = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)
    return logits, (logits * w).sum()


def _peer(kind, name, tmp_path):
    m = tiny_model(kind)
    if kind in DECODER and name.startswith(("prefix", "unipelt")):
        # adapters 1.3's decoder prefix under sdpa + transformers 4.57: an unpadded batch gets
        # no mask, and sdpa's is_causal then aligns the causal mask top-left over the P + L
        # keys (a token misses its last P keys). Its eager attention is right: the reference.
        # (Without a prefix, sdpa stays: eager attends uniformly on fully padded rows, whose
        # states then enter the "mean" gates.)
        m.config._attn_implementation = "eager"
    adapters.init(m)
    m.add_adapter("x", config=_configs()[name])
    m.train_adapter("x")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(m.named_parameters(), key=lambda t: t[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    m.eval()
    m.save_adapter(str(tmp_path), "x")
    return m


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "name",
    [
        "unipelt",
        "seq_bn_ln_before",
        "seq_bn",
        "double_seq_bn",
        "par_bn",
        "prefix_mlp",
        "prefix_flat_gated",
        "lora_gated",
        "lora",
    ],
)
def test_from_adapters_matches_adapters(kind, name, tmp_path):
    pm = _peer(kind, name, tmp_path)
    um = up.from_adapters(tiny_model(kind), str(tmp_path), backend="eager").eval()
    # the tuned tensors, paired by value (independently of the converter's name mapping);
    # GPT-2's merged c_attn (LoRAMergedLinear) stacks its n matrices' LoRA and gate rows in
    # one tensor each: each of its n row blocks is paired on its own
    heads = ("classifier", "score")
    blocks = {}
    for mod in pm.modules():
        if type(mod).__name__ == "LoRAMergedLinear":
            for lora in mod.loras.values():
                blocks.update({id(p): sum(lora.enable_lora) for p in lora.parameters()})
    peer_blocks = [
        (p, j, blocks.get(id(p), 1))
        for n, p in pm.named_parameters()
        if p.requires_grad and not n.startswith(heads)
        for j in range(blocks.get(id(p), 1))
    ]

    def block(t, j, nb):
        return t.chunk(nb, 0)[j]

    pairs = []
    peer_named = dict(pm.named_parameters())
    for n, p in um.named_parameters():
        if p.requires_grad and n.startswith(heads):  # the head file loaded onto the same head
            assert torch.equal(peer_named[n], p), n
            pairs.append((peer_named[n], 0, 1, p))
    ours = [(n, p) for n, p in um.named_parameters() if p.requires_grad and not n.startswith(heads)]
    for n, p in ours:
        match = [
            (q, j, nb)
            for q, j, nb in peer_blocks
            if block(q, j, nb).numel() == p.numel()
            and torch.equal(block(q, j, nb).reshape(p.shape), p)
        ]
        assert len(match) == 1, n
        pairs.append((*match[0], p))
    assert len(ours) == len(peer_blocks)
    for left in (False, True) if kind in DECODER else (False,):
        want, got = run_both(pm, um, *_batch(kind, left), _run)
        assert _close(got, want), (left, (got - want).abs().max())
        for q, j, nb, p in pairs:  # fp32 gradients of gate biases nearly cancel: 1e-4
            assert _close(p.grad, block(q.grad, j, nb), 1e-4), p.shape


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ("bert", "gpt2", "llama"))
def test_from_adapters_unipelt_triton(kind, tmp_path):
    pm = _peer(kind, "unipelt", tmp_path)
    um = up.from_adapters(tiny_model(kind), str(tmp_path), backend="triton").eval()
    ids, am = _batch(kind, left=kind in DECODER)
    want = _run(pm, ids, am)[0]
    got = _run(um, ids, am)[0]
    assert _close(got, want, 2e-4)


def test_from_adapters_bad_input_leaves_model_untouched(tmp_path):
    _peer("llama", "par_bn", tmp_path)
    m = tiny_model("bert")
    before = {n: p.clone() for n, p in m.state_dict().items()}
    with pytest.raises(up.InteropError, match="llama"):
        up.from_adapters(m, str(tmp_path))
    assert not hasattr(m, "unipelt")
    assert all(torch.equal(before[n], p) for n, p in m.state_dict().items())
    sd = torch.load(tmp_path / "pytorch_adapter.bin", weights_only=True)
    sd.pop(sorted(sd)[0])
    torch.save(sd, tmp_path / "pytorch_adapter.bin")
    m = tiny_model("llama")
    names = [n for n, _ in m.named_modules()]
    with pytest.raises(up.InteropError, match="missing"):
        up.from_adapters(m, str(tmp_path))
    assert [n for n, _ in m.named_modules()] == names and not hasattr(m, "unipelt")


def test_from_adapters_gpt2_c_attn_blocks_must_fit(tmp_path):
    """A merged c_attn tensor that is not n row blocks of one matrix's LoRA is refused, the
    model untouched."""
    _peer("gpt2", "lora_gated", tmp_path)
    sd = torch.load(tmp_path / "pytorch_adapter.bin", weights_only=True)
    key = next(k for k in sorted(sd) if k.endswith("c_attn.loras.x.lora_A"))
    sd[key] = sd[key][:-1]
    torch.save(sd, tmp_path / "pytorch_adapter.bin")
    m = tiny_model("gpt2")
    names = [n for n, _ in m.named_modules()]
    with pytest.raises(up.InteropError, match="not 3 blocks"):
        up.from_adapters(m, str(tmp_path))
    assert [n for n, _ in m.named_modules()] == names and not hasattr(m, "unipelt")


@pytest.mark.parametrize("kind", ("bert", "llama"))
def test_bench_like_for_like_config_is_adapters_unipelt(kind):
    """The bench's as_adapters_unipelt rows run adapters' own UniPELTConfig() (the bench
    holds a copy of its dict so the row runs without the library)."""
    from unipelt_fast.bench.models import ADAPTERS_UNIPELT
    from unipelt_fast.interop import adapters_config

    m = tiny_model(kind)
    want = adapters_config(adapters.UniPELTConfig().to_dict(), m)
    assert adapters_config(ADAPTERS_UNIPELT, m) == want
    assert want.prefix.mlp_hidden == 512 and want.lora.r == 8 and want.adapter.gate


@pytest.mark.parametrize("name", ("bert-base", "llama-1b-like"))
def test_bench_adapters_rows_train_what_ours_train(name):
    """Tiny model rows: adapters' UniPELT and this package's as_adapters_unipelt train the
    same number of parameters; the mixed-task (BatchSplit) rows run."""
    from unipelt_fast.bench import models

    cpu = torch.device("cpu")
    got = {}
    for how in ("adapters_unipelt", "as_adapters_unipelt:eager", "adapters_unipelt_mixed",
                "as_adapters_unipelt_mixed:eager"):  # fmt: skip
        fn, info = models.prepare(name, how, "train", True, cpu, torch.float32)
        fn()
        got[how] = info["trainable_params"]
    assert got["adapters_unipelt"] == got["as_adapters_unipelt:eager"]
    # mixed: adapters holds a prefix MLP per task, this package one MLP for all tasks
    assert got["as_adapters_unipelt_mixed:eager"] < got["adapters_unipelt_mixed"]
