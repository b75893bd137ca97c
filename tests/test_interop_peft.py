"""from_peft / save_peft against the real peft: peft builds, runs and saves (or loads) the
model itself; the logits and the tuned tensors' gradients must match (eval mode)."""

import json
import os

import pytest
import torch
import transformers

import unipelt_fast as up
from tests.hf_tiny import perturb, tiny_model
from tests.interop_tiny import DECODER, KINDS, run_both
from tests.interop_tiny import close as _close
from tests.interop_tiny import interop_batch as _batch

peft = pytest.importorskip("peft")

P = 3
TF5 = int(transformers.__version__.split(".")[0]) >= 5


def _skip_peft_prefix_on_encoders(kind, method):
    if TF5 and kind in ("bert", "roberta") and method.startswith("prefix"):
        pytest.skip(
            "peft refuses prefix tuning on BERT/RoBERTa under transformers 5 (their forward "
            "takes no past_key_values); BERT runs in the transformers 4.57 venv"
        )
    if not TF5 and kind == "roberta" and method.startswith("prefix"):
        pytest.skip(
            "peft 0.21's RoBERTa prefix tuning fails inside transformers 4.57's cache "
            "(TypeError in cache_utils); the RoBERTa prefix path is checked against peft's "
            "format by the BERT case and against HF's cache in test_hf_models"
        )


def _peft_cfg(kind, method):
    task = "CAUSAL_LM" if kind in DECODER else "SEQ_CLS"
    if method in ("lora", "lora_all"):  # lora_all: every linear layer but the heads
        tm = {"bert": ["query", "value"], "roberta": ["query", "key", "value"]}
        tm.update(gpt2=["c_attn"], llama=["q_proj", "v_proj"])
        return peft.LoraConfig(
            task_type=task,
            r=4,
            lora_alpha=12,
            target_modules="all-linear" if method == "lora_all" else tm[kind],
            fan_in_fan_out=kind == "gpt2",
            layers_to_transform=[1] if kind == "llama" and method == "lora" else None,
            use_rslora=kind == "bert",
        )
    if method == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=P)
    return peft.PrefixTuningConfig(
        task_type=task,
        num_virtual_tokens=P,
        prefix_projection=method == "prefix_mlp",
        encoder_hidden_size=16,
    )


def _run(model, ids, am):
    logits = model(input_ids=ids, attention_mask=am).logits
    if logits.dim() == 3:
        logits = logits[:, -ids.shape[1] :]  # peft's prompt positions are not compared
        sel = am.bool()
        logits = logits[sel]
    w = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)
    return logits, (logits * w).sum()


def _tuned_pairs(pm, um, method):
    """(peft tensor, our tensor) pairs of the tuned tensors (shapes may differ by a task dim)."""
    if method in ("prefix", "prompt"):
        ours = um.unipelt.prefix.prefix if method == "prefix" else um.unipelt.prompt.embeddings
        pairs = [(pm.prompt_encoder["default"].embedding.weight, ours)]
    elif method == "prefix_mlp":
        pairs = []  # peft trains the MLP; here it is loaded flat (its output)
    else:
        pairs = []
        for n, mod in um.named_modules():
            if isinstance(mod, up.GatedLoRA):
                pl = pm.base_model.model.get_submodule(n)
                u = mod.units[0]
                pairs += [(pl.lora_A["default"].weight, u.A.weight)]
                pairs += [(pl.lora_B["default"].weight, u.B.weight)]
    head = dict(um.named_parameters())
    for n, p in pm.named_parameters():
        if p.requires_grad and "modules_to_save" in n:
            name = n.replace(".modules_to_save.default", "").removeprefix("base_model.")
            pairs.append((p, head[name.removeprefix("model.")]))
    return pairs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ("prefix", "prefix_mlp", "prompt", "lora", "lora_all"))
def test_from_peft_matches_peft(kind, method, tmp_path):
    _skip_peft_prefix_on_encoders(kind, method)
    pm = peft.get_peft_model(tiny_model(kind), _peft_cfg(kind, method))
    perturb(pm)
    pm.eval()
    pm.save_pretrained(tmp_path)
    um = up.from_peft(tiny_model(kind), str(tmp_path), backend="eager").eval()
    for left in (False, True) if kind in DECODER else (False,):
        want, got = run_both(pm, um, *_batch(kind, left), _run)
        assert _close(got, want), (left, (got - want).abs().max())
        pairs = _tuned_pairs(pm, um, method)
        assert pairs or method == "prefix_mlp"
        for a, b in pairs:
            assert _close(b.grad, a.grad), (a.shape, b.shape)


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ("roberta", "gpt2", "llama"))
def test_from_peft_prefix_triton(kind, tmp_path):
    _skip_peft_prefix_on_encoders(kind, "prefix")
    pm = peft.get_peft_model(tiny_model(kind), _peft_cfg(kind, "prefix"))
    perturb(pm)
    pm.eval().save_pretrained(tmp_path)
    um = up.from_peft(tiny_model(kind), str(tmp_path), backend="triton").eval()
    ids, am = _batch(kind, left=kind == "llama")
    want, got = run_both(pm, um, ids, am, _run)
    assert _close(got, want, 2e-4)
    for a, b in _tuned_pairs(pm, um, "prefix"):
        assert _close(b.grad, a.grad, 2e-4)


@pytest.mark.parametrize("backend", ("eager", "triton"))
def test_from_peft_prefix_with_a_sliding_window(backend, tmp_path):
    """Mistral with window 4 < the 7 tokens, and P = 3: the window hides token keys and, peft
    putting the prefix at positions 0..P-1, the prefix from the late queries. Left padding;
    logits and the prefix's gradients against peft's own model."""
    from tests.hf_families import tiny

    pm = peft.get_peft_model(tiny("mistral", sliding_window=4), _peft_cfg("llama", "prefix"))
    perturb(pm)
    pm.eval().save_pretrained(tmp_path)
    um = up.from_peft(tiny("mistral", sliding_window=4), str(tmp_path), backend=backend).eval()
    want, got = run_both(pm, um, *_batch("llama", left=True), _run)
    assert _close(got, want, 2e-4 if backend == "triton" else 1e-5)
    for a, b in _tuned_pairs(pm, um, "prefix"):
        assert _close(b.grad, a.grad, 2e-4 if backend == "triton" else 1e-5)


@pytest.mark.parametrize("kind", DECODER)
def test_generate_matches_peft_prefix(kind, tmp_path):
    """peft's positions P..P+L-1 hold in generate() too (left-padded, KV cache). The reference
    is greedy decoding with peft's own forward on the whole sequence and the position ids that
    generate() passes (peft 0.21's generate() drops the prefix under transformers 5.24, whose
    models take the cache as ``cache=``, so it is not the reference)."""
    pm = peft.get_peft_model(tiny_model(kind), _peft_cfg(kind, "prefix"))
    perturb(pm, seed=5)
    pm.eval().save_pretrained(tmp_path)
    um = up.from_peft(tiny_model(kind), str(tmp_path), backend="eager").eval()
    ids, am = _batch(kind, left=True)
    n = 5
    got = um.generate(
        input_ids=ids,
        attention_mask=am,
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    seq, mask = ids, am
    with torch.no_grad():
        for step in range(n):
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            logits = pm(input_ids=seq, attention_mask=mask, position_ids=pos).logits[:, -1]
            assert _close(got.scores[step], logits)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, mask.new_ones(3, 1)], 1)
    assert torch.equal(got.sequences, seq)


@pytest.mark.parametrize("kind", DECODER)
def test_generate_matches_peft_prompt(kind, tmp_path):
    """generate() with a soft prompt (KV cache, left-padded batch) equals greedy decoding
    with peft's own prompt-tuning forward on the whole sequence (tokens and step logits),
    and peft's generate() (its prepare_inputs_for_generation: the prompt at the prefill
    only, position ids ignored) where it works: on transformers 4.57. peft 0.21 under
    transformers 5.25 looks for ``past_key_values`` where the models now take ``cache=``, so
    it prepends the prompt again at every step; there only its first step is compared."""
    pm = peft.get_peft_model(tiny_model(kind), _peft_cfg(kind, "prompt"))
    perturb(pm, seed=5)
    pm.eval().save_pretrained(tmp_path)
    um = up.from_peft(tiny_model(kind), str(tmp_path), backend="eager").eval()
    ids, am = _batch(kind, left=True)
    n = 4
    kw = dict(
        input_ids=ids, attention_mask=am, max_new_tokens=n, do_sample=False, pad_token_id=0,
        eos_token_id=None, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    with torch.no_grad():
        got, theirs = um.generate(**kw), pm.generate(**kw)
        seq, mask = ids, am
        for step in range(n):
            logits = pm(input_ids=seq, attention_mask=mask).logits[:, -1]
            assert _close(got.logits[step], logits), step
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, mask.new_ones(3, 1)], 1)
    assert torch.equal(got.sequences, seq)
    assert _close(got.logits[0], theirs.logits[0])
    if not TF5:
        for a, b in zip(got.logits, theirs.logits, strict=True):
            assert _close(a, b)
        assert torch.equal(got.sequences, theirs.sequences)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ("prefix", "prompt", "lora", "lora_all"))
def test_save_peft_loads_in_peft(kind, method, tmp_path):
    _skip_peft_prefix_on_encoders(kind, method)
    sub = {"prefix": None, "prompt": None, "lora": None}
    if method == "prefix":
        sub["prefix"] = up.PrefixConfig(length=P, gate=False, positions="after_prefix")
    elif method == "prompt":
        sub["prompt"] = up.PromptConfig(length=P, gate=False)
    elif method == "lora_all":
        sub["lora"] = up.LoRAConfig(r=4, alpha=8.0, target_modules="all-linear", gate=False)
    else:
        targets = ("query", "key", "value") if kind == "gpt2" else ("query", "value")
        sub["lora"] = up.LoRAConfig(r=4, alpha=8.0, targets=targets, gate=False)
    cfg = up.UniPELTConfig(bitfit=False, adapter=None, **sub)
    um = up.apply_unipelt(tiny_model(kind), cfg, backend="eager")
    perturb(um)
    um.eval()
    up.save_peft(um, str(tmp_path))
    assert json.load(open(tmp_path / "adapter_config.json"))["peft_type"]
    pm = peft.PeftModel.from_pretrained(tiny_model(kind), str(tmp_path)).eval()
    ids, am = _batch(kind, left=kind in DECODER)
    with torch.no_grad():
        assert _close(_run(um, ids, am)[0], _run(pm, ids, am)[0])


@pytest.mark.parametrize(
    "kind, lora, written",
    [  # the short names when peft's matching picks exactly our modules with them
        (
            "llama",
            dict(target_modules=["o_proj", "down_proj"], layers=[1]),
            ["down_proj", "o_proj"],
        ),
        # "c_proj" would also pick the MLP's c_proj: the full names
        (
            "gpt2",
            dict(target_modules=r".*\.attn\.c_proj"),
            [f"transformer.h.{i}.attn.c_proj" for i in (0, 1)],
        ),
        # a role LoRA of some layers: short names and layers_to_transform
        ("bert", dict(targets=("value",), layers=[0]), ["value"]),
    ],
)
def test_save_peft_writes_targets_peft_matches_exactly(kind, lora, written, tmp_path):
    lc = up.LoRAConfig(r=2, alpha=4.0, gate=False, **lora)
    um = up.apply_unipelt(
        tiny_model(kind),
        up.UniPELTConfig(bitfit=False, adapter=None, prefix=None, lora=lc),
        backend="eager",
    )
    perturb(um)
    um.eval()
    up.save_peft(um, str(tmp_path))
    meta = json.load(open(tmp_path / "adapter_config.json"))
    assert meta["target_modules"] == written
    pm = peft.PeftModel.from_pretrained(tiny_model(kind), str(tmp_path)).eval()
    ours = {n for n, m in um.named_modules() if isinstance(m, up.GatedLoRA)}
    theirs = {
        n.removeprefix("base_model.model.").removesuffix(".lora_A")
        for n, _ in pm.named_modules()
        if n.endswith(".lora_A")
    }
    assert ours == theirs
    ids, am = _batch(kind, left=kind in DECODER)
    with torch.no_grad():
        assert _close(_run(um, ids, am)[0], _run(pm, ids, am)[0])
    # and back: from_peft gives the same modules and logits
    back = up.from_peft(tiny_model(kind), str(tmp_path), backend="eager").eval()
    assert {n for n, m in back.named_modules() if isinstance(m, up.GatedLoRA)} == ours
    with torch.no_grad():
        assert _close(_run(back, ids, am)[0], _run(pm, ids, am)[0])


def test_save_peft_names_what_peft_cannot_hold(tmp_path):
    um = up.apply_unipelt(tiny_model("bert"), up.UniPELTConfig(), backend="eager")
    with pytest.raises(up.InteropError, match="BitFit"):
        up.save_peft(um, str(tmp_path))
    cfg = up.UniPELTConfig(bitfit=False, adapter=None, prefix=up.PrefixConfig(gate=False))
    um = up.apply_unipelt(tiny_model("llama"), cfg, backend="eager")
    with pytest.raises(up.InteropError, match="tokens_only"):
        up.save_peft(um, str(tmp_path))
    cfg = up.UniPELTConfig(bitfit=False, adapter=None, prefix=None, lora=True)
    um = up.apply_unipelt(tiny_model("llama"), cfg, backend="eager")
    with pytest.raises(up.InteropError, match="lora gate"):
        up.save_peft(um, str(tmp_path))
    lc = up.LoRAConfig(targets=("query", "value"), gate=False)  # GPT-2: slices of c_attn
    um = up.apply_unipelt(
        tiny_model("gpt2"), up.UniPELTConfig(bitfit=False, adapter=None, prefix=None, lora=lc)
    )
    with pytest.raises(up.InteropError, match="output slices"):
        up.save_peft(um, str(tmp_path))
    qkv = up.LoRAConfig(targets=("query", "key", "value"), gate=False, split_fused=True)
    cfg = up.UniPELTConfig(bitfit=False, adapter=None, prefix=None, lora=qkv)
    um = up.apply_unipelt(tiny_model("gpt2"), cfg, backend="eager")
    with pytest.raises(up.InteropError, match="split_fused"):
        up.save_peft(um, str(tmp_path))
    assert not os.path.exists(tmp_path / "adapter_config.json")


def test_from_peft_bad_input_leaves_model_untouched(tmp_path):
    pm = peft.get_peft_model(tiny_model("llama"), _peft_cfg("llama", "lora"))
    pm.save_pretrained(tmp_path)
    base = tiny_model("bert")  # wrong model: targets q_proj/v_proj
    before = {n: p.clone() for n, p in base.state_dict().items()}
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(up.InteropError, match="LoRA targets"):
        up.from_peft(base, str(tmp_path))
    assert [n for n, _ in base.named_modules()] == names
    assert not hasattr(base, "unipelt")
    assert all(torch.equal(before[n], p) for n, p in base.state_dict().items())
    # what has no equivalent here: DoRA, per-module ranks, excluded modules
    good = json.load(open(tmp_path / "adapter_config.json"))
    for key, v in (("use_dora", True), ("rank_pattern", {"q_proj": 2}), ("exclude_modules", ["x"])):
        json.dump({**good, key: v}, open(tmp_path / "adapter_config.json", "w"))
        m = tiny_model("llama")
        with pytest.raises(up.InteropError, match=key):
            up.from_peft(m, str(tmp_path))
        assert not hasattr(m, "unipelt")
    json.dump(good, open(tmp_path / "adapter_config.json", "w"))
    # a corrupt weights file
    with open(tmp_path / "adapter_model.safetensors", "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(up.InteropError, match="cannot read"):
        up.from_peft(tiny_model("llama"), str(tmp_path))
    # .bin holding more than tensors is refused (weights_only=True)
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save({"x": torch.zeros(1), "obj": object.__new__(_Evil)}, tmp_path / "adapter_model.bin")
    with pytest.raises(up.InteropError, match="safely"):
        up.from_peft(tiny_model("llama"), str(tmp_path))
    # a mismatching tensor shape: everything is put back
    torch.save({"prompt_embeddings": torch.zeros(2, 5)}, tmp_path / "adapter_model.bin")
    json.dump(
        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2},
        open(tmp_path / "adapter_config.json", "w"),
    )
    m = tiny_model("llama")
    with pytest.raises(up.InteropError, match="shape"):
        up.from_peft(m, str(tmp_path))
    assert not hasattr(m, "unipelt")


class _Evil:
    pass


@pytest.mark.parametrize("kind", ("phi3", "gpt_neox", "falcon", "opt", "gptj", "cohere"))
def test_from_peft_all_linear_on_more_families(kind, tmp_path):
    """peft's all-linear LoRA on the fused-QKV, OPT and parallel-block families loads exactly
    (left-padded batch: logits and every LoRA gradient against peft's own model)."""
    from tests.hf_families import tiny

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    pm = peft.get_peft_model(tiny(kind), cfg)
    perturb(pm)
    pm.eval().save_pretrained(tmp_path)
    um = up.from_peft(tiny(kind), str(tmp_path), backend="eager").eval()
    want, got = run_both(pm, um, *_batch(kind, True), _run)
    assert _close(got, want), (got - want).abs().max()
    pairs = _tuned_pairs(pm, um, "lora_all")
    assert pairs
    for a, b in pairs:
        assert _close(b.grad, a.grad), (a.shape, b.shape)


@pytest.mark.parametrize("kind", ("gpt_neox", "falcon", "opt", "gptj"))
def test_from_peft_prefix_on_more_families(kind, tmp_path):
    """peft's prefix tuning on GPT-NeoX, Falcon, OPT (learned positions from the padding mask,
    the prefix counted as P tokens) and GPT-J loads exactly, left-padded (no
    num_key_value_heads in the config: peft would size the prefix by it)."""
    from tests.hf_families import _COMMON, _DECODERS

    cfg_cls, model_cls, extra = _DECODERS[kind]
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)

    def base():
        torch.manual_seed(0)
        cfg = getattr(transformers, cfg_cls)(**_COMMON, **extra, **ids)
        return getattr(transformers, model_cls)(cfg).eval()

    pm = peft.get_peft_model(
        base(), peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    )
    perturb(pm)
    pm.eval().save_pretrained(tmp_path)
    if kind in ("falcon", "gptj") and int(transformers.__version__.split(".")[0]) < 5:
        # transformers 4.x: their attention does not dispatch through the registry
        with pytest.raises(NotImplementedError, match="attention registry"):
            up.from_peft(base(), str(tmp_path), backend="eager")
        return
    um = up.from_peft(base(), str(tmp_path), backend="eager").eval()
    want, got = run_both(pm, um, *_batch(kind, True), _run)
    assert _close(got, want), (got - want).abs().max()
    for a, b in _tuned_pairs(pm, um, "prefix"):
        assert _close(b.grad, a.grad), (a.shape, b.shape)
