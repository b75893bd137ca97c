"""LoRA on any linear layer, by name (``LoRAConfig.target_modules``): which modules peft's
rules pick (peft itself is the oracle), the math (the plain model with the LoRA merged into
its weights), mixed-task batches on the fused op, refusals and checkpoints."""

import json

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import unipelt_fast as up
from tests.hf_tiny import bart_batch, batch, formula_lora, perturb, tiny_bart, tiny_model
from tests.interop_tiny import close
from unipelt_fast.lora import GatedLoRA


def _named(kind, cfg_lora, backend="eager", **kw):
    cfg = up.UniPELTConfig(bitfit=False, adapter=None, prefix=None, lora=cfg_lora, **kw)
    return up.apply_unipelt(tiny_model(kind), cfg, backend=backend)


def _wrapped(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, GatedLoRA)}


# (kind, target_modules, layers_to_transform, layers_pattern)
PEFT_CASES = [
    ("bert", "all-linear", None, None),  # the pooler too; not the classifier (a head)
    ("gpt2", "all-linear", None, None),  # Conv1D layers; not lm_head
    ("llama", ["o_proj", "down_proj"], [1], None),
    ("llama", r".*\.0\.mlp\.(gate|up)_proj", None, None),  # a regex: full match
    ("llama", ["self_attn.q_proj", "up_proj"], [0], ["layers"]),
    ("llama", ["model.layers.1.mlp.down_proj", "q_proj"], [0], None),  # exact name: no layer check
]


@pytest.mark.parametrize("case", range(len(PEFT_CASES)))
def test_targets_are_the_modules_peft_picks(case):
    peft = pytest.importorskip("peft")
    kind, tm, layers, pattern = PEFT_CASES[case]
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    pc = peft.LoraConfig(
        task_type=task,
        r=2,
        target_modules=tm,
        layers_to_transform=layers,
        layers_pattern=pattern,
    )
    pm = peft.get_peft_model(tiny_model(kind), pc)
    want = {
        n.removeprefix("base_model.model.").removesuffix(".lora_A")
        for n, _ in pm.named_modules()
        if n.endswith(".lora_A")
    }
    lc = up.LoRAConfig(r=2, target_modules=tm, layers=layers, layers_pattern=pattern, gate=False)
    assert _wrapped(_named(kind, lc)) == want


def _base(kind):
    return tiny_bart(kind=kind) if kind in ("bart", "t5") else tiny_model(kind)


def _merged_reference(kind, um):
    """The plain model with every LoRA folded into its weight: W + s * B @ A (Conv1D stores
    W transposed), and BitFit's biases copied in: the independent formulation."""
    base = _base(kind)
    mods = dict(base.named_modules())
    with torch.no_grad():
        for n, w in um.named_modules():
            if isinstance(w, GatedLoRA):
                u = w.units[0]
                delta = w.scaling * (u.B.weight @ u.A.weight)  # (d_out, d_in)
                m = mods[n]
                m.weight.add_(delta.T if isinstance(m, Conv1D) else delta)
        params = dict(base.named_parameters())
        for n, p in um.named_parameters():  # BitFit's biases and the head
            if p.requires_grad and n.replace(".base.", ".") in params:
                params[n.replace(".base.", ".")].copy_(p)
    return base.eval()


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "bart", "t5"])
def test_all_linear_equals_merged_weights(kind):
    """Every linear layer but the heads; BERT with BitFit: its intermediate dense keeps the
    activation outside the LoRA. Encoder-decoders: both stacks and the cross-attention."""
    cfg = up.UniPELTConfig(
        bitfit=kind == "bert",
        adapter=None,
        prefix=None,
        lora=up.LoRAConfig(r=4, alpha=6.0, target_modules="all-linear", gate=False),
    )
    um = up.apply_unipelt(_base(kind), cfg, backend="eager")
    perturb(um)
    um.eval()
    names = _wrapped(um)
    assert any(
        n.endswith(("mlp.c_fc", "down_proj", "intermediate.dense", "fc2", "wo")) for n in names
    )
    ref = _merged_reference(kind, um)
    if kind in ("bart", "t5"):
        b = {k: v for k, v in bart_batch().items() if k != "labels"}
    else:
        b = {k: v for k, v in batch(kind).items() if k != "labels"}
    with torch.no_grad():
        got, want = um(**b).logits, ref(**b).logits
    assert close(got, want), (got - want).abs().max()


@pytest.mark.parametrize(
    "kind, tm", [("llama", ["o_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"])]
)
def test_gated_named_targets_match_formula(kind, tm):
    """Gated LoRA (gate_mode "mean") on the attention output and the MLP, and on GPT-2's
    fused c_attn named whole (one update over all its columns, unlike the role slices):
    ``out + g * alpha/r * B(A(x))`` as hooks on the untouched base model."""
    um = _named(kind, up.LoRAConfig(r=4, alpha=12.0, target_modules=tm))
    perturb(um)
    base = tiny_model(kind)
    mods = dict(base.named_modules())
    handles = []
    for n, w in um.named_modules():
        if isinstance(w, GatedLoRA):
            assert w.out_slices is None

            def hook(mod, args, out, u=w.units[0]):
                return out + formula_lora(args[0], u, 12.0 / 4)

            handles.append(mods[n].register_forward_hook(hook))
    assert len(handles) == 4
    b = batch(kind)
    kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    with torch.no_grad():
        assert close(um(**kw).logits, base(**kw).logits)


@pytest.mark.parametrize(
    "kind, backend",
    [("bert", "eager"), pytest.param("llama", "triton", marks=pytest.mark.interpreter)],
)
def test_mixed_tasks_named_targets(kind, backend):
    """Gated LoRA on named targets (BERT: every linear layer, the pooler's 2-D input
    included; LLaMA on the triton op: the MLP's down projection, d_in != d_out): a
    mixed-task batch gives each example what it gets alone with its task, values and
    gradients."""
    tm = "all-linear" if kind == "bert" else ["down_proj"]
    lc = up.LoRAConfig(r=2, target_modules=tm, layers=None if kind == "bert" else [1])
    um = _named(kind, lc, backend=backend, tasks=("a", "b"), gate_mode="masked_mean")
    perturb(um)
    um.eval()
    b = batch(kind)
    tid = torch.tensor([1, 0, 1])
    out = um(input_ids=b["input_ids"], attention_mask=b["attention_mask"], task_ids=tid).logits
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in um.named_parameters() if p.requires_grad}
    um.zero_grad()
    for i in range(3):
        one = um(
            input_ids=b["input_ids"][i : i + 1],
            attention_mask=b["attention_mask"][i : i + 1],
            task_ids=tid[i : i + 1],
        ).logits
        assert close(out[i : i + 1], one, 1e-4), i
        one.square().sum().backward()
    for n, p in um.named_parameters():
        if p.requires_grad:
            assert close(grads[n], p.grad, 1e-4), n


def test_bad_target_modules_are_refused_before_any_change():
    with pytest.raises(ValueError, match="not both"):
        up.LoRAConfig(targets=("query",), target_modules=["q_proj"])
    with pytest.raises(ValueError, match="regex"):
        up.LoRAConfig(target_modules="all-linear", layers=[0])
    with pytest.raises(ValueError, match="not a valid regex"):
        up.LoRAConfig(target_modules="(")
    with pytest.raises(ValueError, match="attention_types"):
        up.LoRAConfig(target_modules=["q"], attention_types=("self",))
    with pytest.raises(ValueError, match="layers_pattern needs layers"):
        up.LoRAConfig(target_modules=["q_proj"], layers_pattern=["layers"])
    for tm, err, msg in (
        (["mlp"], NotImplementedError, "LlamaMLP"),  # not a linear layer
        (["wq"], ValueError, "matches no linear layer"),
        (["lm_head.nope"], ValueError, "matches no linear layer"),
    ):
        m = tiny_model("llama")
        names = [n for n, _ in m.named_modules()]
        cfg = up.UniPELTConfig(lora=up.LoRAConfig(target_modules=tm))
        with pytest.raises(err, match=msg):
            up.apply_unipelt(m, cfg)
        assert [n for n, _ in m.named_modules()] == names and not hasattr(m, "unipelt")
        assert all(p.requires_grad for p in m.parameters())


def test_encdec_named_targets_read_their_stack_mask():
    """A cross-attention's key/value projection reads the encoder's tokens (its gate, the
    encoder mask); the query and the decoder's own projections the decoder's."""
    m = tiny_bart()
    lc = up.LoRAConfig(r=2, target_modules=["q_proj", "k_proj", "fc2"])
    cfg = up.UniPELTConfig(
        bitfit=False, adapter=None, prefix=None, lora=lc, gate_mode="masked_mean"
    )
    up.apply_unipelt(m, cfg, backend="eager")
    stacks = {n: w.site.stack for n, w in m.named_modules() if isinstance(w, GatedLoRA)}
    assert stacks["model.encoder.layers.0.self_attn.k_proj"] == "enc"
    assert stacks["model.decoder.layers.0.self_attn.k_proj"] == "dec"
    assert stacks["model.decoder.layers.0.encoder_attn.q_proj"] == "dec"
    assert stacks["model.decoder.layers.0.encoder_attn.k_proj"] == "enc"
    assert stacks["model.decoder.layers.0.fc2"] == "dec"
    b = bart_batch()
    m(**b).loss.backward()  # the gates' masks fit their inputs


def test_checkpoints_record_named_targets_and_old_configs_load(tmp_path):
    lc = up.LoRAConfig(r=2, target_modules=["o_proj", "down_proj"], layers=[1])
    um = _named("llama", lc)
    perturb(um)
    up.save_unipelt(um, str(tmp_path))
    meta = json.load(open(tmp_path / "unipelt.json"))
    assert meta["config"]["lora"]["target_modules"] == ["o_proj", "down_proj"]
    assert meta["config"]["lora"]["targets"] is None
    loaded = up.load_unipelt(tiny_model("llama"), str(tmp_path))
    assert (
        _wrapped(loaded)
        == _wrapped(um)
        == {
            "model.layers.1.self_attn.o_proj",
            "model.layers.1.mlp.down_proj",
        }
    )
    b = batch("llama")
    with torch.no_grad():
        assert close(loaded(**b).logits, um(**b).logits)
    # a config written before target_modules existed: roles, as before
    old = up.UniPELTConfig(lora=True).to_dict()
    for k in ("target_modules", "layers_pattern"):
        del old["lora"][k]
    cfg = up.UniPELTConfig.from_dict(old)
    assert cfg.lora.targets == ("query", "value") and cfg.lora.target_modules is None
