"""save_unipelt / load_unipelt: round trips, and errors that leave the model untouched."""

import json
import os

import pytest
import torch

import unipelt_fast as up
from tests.hf_tiny import ADAPTER, batch, pelt, tiny_model


def _weights(path):
    """The weights file the checkpoint's JSON names (its name is its content's hash)."""
    meta = json.loads((path / "unipelt.json").read_text())
    return path / meta["weights"]


def _snapshot(model):
    return (
        {n: t.detach().clone() for n, t in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [type(m).__name__ for m in model.modules()],
        model.config._attn_implementation,
    )


def _assert_same(model, snap):
    state, grads, types, attn = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for n in state:
        assert torch.equal(now[n], state[n]), n
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert [type(m).__name__ for m in model.modules()] == types
    assert model.config._attn_implementation == attn


def _logits(m, b, **kw):
    with torch.no_grad():
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **kw).logits


CFG = dict(lora=True, prompt=True, tasks=("a", "b"), adapter=ADAPTER)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_round_trip_onto_fresh_copy(kind, tmp_path):
    m = pelt(kind, up.UniPELTConfig(**CFG))
    b = batch(kind)
    tid = torch.tensor([0, 1, 1])
    want = _logits(m, b, task_ids=tid)
    up.save_unipelt(m, str(tmp_path))
    size = os.path.getsize(_weights(tmp_path))
    assert size < 200_000
    meta = json.loads((tmp_path / "unipelt.json").read_text())
    assert sorted(os.listdir(tmp_path)) == sorted(["unipelt.json", meta["weights"]])
    assert meta["model_type"] == m.config.model_type and meta["config"]["tasks"] == ["a", "b"]

    fresh = up.apply_unipelt(tiny_model(kind), up.UniPELTConfig(**CFG), backend="eager")
    assert not torch.equal(_logits(fresh, b, task_ids=tid), want)
    up.load_unipelt(fresh, str(tmp_path))
    torch.testing.assert_close(_logits(fresh, b, task_ids=tid), want, rtol=0, atol=0)

    plain = tiny_model(kind)  # a plain base model: the saved config is applied first
    up.load_unipelt(plain, str(tmp_path), backend="eager")
    torch.testing.assert_close(_logits(plain, b, task_ids=tid), want, rtol=0, atol=0)


def test_round_trip_ejected(tmp_path):
    m = pelt("llama")
    b = batch("llama")
    up.eject(m)
    want = _logits(m, b)
    up.save_unipelt(m, str(tmp_path))
    plain = tiny_model("llama")
    up.load_unipelt(plain, str(tmp_path), backend="eager")
    assert plain.unipelt.prefix.is_ejected
    torch.testing.assert_close(_logits(plain, b), want, rtol=0, atol=0)
    not_ejected = up.apply_unipelt(tiny_model("llama"), m.unipelt.cfg, backend="eager")
    snap = _snapshot(not_ejected)
    with pytest.raises(up.UniPELTCheckpointError, match="eject"):
        up.load_unipelt(not_ejected, str(tmp_path))
    _assert_same(not_ejected, snap)


def _corrupt_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:40])


@pytest.mark.parametrize("damage", ["flip", "truncate", "json", "missing"])
@pytest.mark.parametrize("target", ["applied", "plain"])
def test_corrupt_checkpoint_raises_and_changes_nothing(tmp_path, damage, target):
    m = pelt("bert", up.UniPELTConfig(**CFG))
    up.save_unipelt(m, str(tmp_path))
    w, j = _weights(tmp_path), tmp_path / "unipelt.json"
    if damage == "flip":
        _corrupt_byte(w)
    elif damage == "truncate":
        _truncate(w)
    elif damage == "json":
        j.write_text(j.read_text()[:-20])
    else:
        w.unlink()
    if target == "applied":
        other = up.apply_unipelt(tiny_model("bert", 5), up.UniPELTConfig(**CFG), backend="eager")
    else:
        other = tiny_model("bert", 5)
    snap = _snapshot(other)
    with pytest.raises(up.UniPELTCheckpointError):
        up.load_unipelt(other, str(tmp_path))
    _assert_same(other, snap)


@pytest.mark.parametrize(
    "case", ["model_type", "sizes", "config", "tensor_shape", "extra_tensor", "late_mismatch"]
)
def test_mismatched_checkpoint_raises_and_changes_nothing(tmp_path, case):
    from safetensors.torch import load_file, save_file

    m = pelt("bert", up.UniPELTConfig(**CFG))
    up.save_unipelt(m, str(tmp_path))
    target = up.apply_unipelt(tiny_model("bert", 5), up.UniPELTConfig(**CFG), backend="eager")
    if case == "model_type":
        target = up.apply_unipelt(tiny_model("roberta"), up.UniPELTConfig(**CFG), backend="eager")
    elif case == "sizes":
        import transformers as tf

        cfg = tf.BertConfig(
            vocab_size=64,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=3,
        )
        target = tf.BertForSequenceClassification(cfg)
    elif case == "config":
        target = up.apply_unipelt(tiny_model("bert", 5), up.UniPELTConfig(), backend="eager")
    else:  # rewrite the tensors, keeping the JSON and its checksum consistent
        w, j = _weights(tmp_path), tmp_path / "unipelt.json"
        state = load_file(str(w))
        name = sorted(state)[0]
        if case == "tensor_shape":
            state[name] = torch.zeros(state[name].numel() + 1)
        else:
            state["bert.extra.bias"] = torch.zeros(3)
        if case == "late_mismatch":  # only found after applying the config to a plain model
            target = tiny_model("bert", 5)
        from unipelt_fast.checkpoint import _sha256, weights_name

        save_file(state, str(w))
        meta = json.loads(j.read_text())
        meta["tensors"] = {n: [list(t.shape), str(t.dtype)] for n, t in state.items()}
        meta["sha256"] = _sha256(str(w))
        meta["weights"] = weights_name(meta["sha256"])
        w.rename(tmp_path / meta["weights"])
        j.write_text(json.dumps(meta))
    snap = _snapshot(target)
    with pytest.raises(up.UniPELTCheckpointError):
        up.load_unipelt(target, str(tmp_path))
    _assert_same(target, snap)
    if case in ("sizes", "late_mismatch"):
        assert not hasattr(target, "unipelt")


def test_previous_format_loads(tmp_path):
    """unipelt-fast/1: a fixed unipelt.safetensors beside a JSON without a "weights" key."""
    from safetensors.torch import save_file

    from unipelt_fast.checkpoint import _sha256

    m = pelt("llama", up.UniPELTConfig(**CFG))
    b = batch("llama")
    tid = torch.tensor([0, 1, 1])
    want = _logits(m, b, task_ids=tid)
    up.save_unipelt(m, str(tmp_path))
    meta = json.loads((tmp_path / "unipelt.json").read_text())
    _weights(tmp_path).rename(tmp_path / "unipelt.safetensors")
    meta = {k: v for k, v in meta.items() if k != "weights"}
    meta["format"] = "unipelt-fast/1"
    (tmp_path / "unipelt.json").write_text(json.dumps(meta))
    fresh = up.apply_unipelt(tiny_model("llama"), up.UniPELTConfig(**CFG), backend="eager")
    up.load_unipelt(fresh, str(tmp_path))
    torch.testing.assert_close(_logits(fresh, b, task_ids=tid), want, rtol=0, atol=0)
    # a flipped byte in the old format's weights is still caught by its SHA-256
    save_file({"x": torch.zeros(3)}, str(tmp_path / "unipelt.safetensors"))
    assert _sha256(str(tmp_path / "unipelt.safetensors")) != meta["sha256"]
    with pytest.raises(up.UniPELTCheckpointError, match="SHA-256"):
        up.load_unipelt(fresh, str(tmp_path))
    # saving over an old-format directory switches it to the new format, old weights gone
    up.save_unipelt(m, str(tmp_path))
    new = json.loads((tmp_path / "unipelt.json").read_text())
    assert new["format"] == "unipelt-fast/2"
    assert sorted(os.listdir(tmp_path)) == sorted(["unipelt.json", new["weights"]])


def test_weights_name_must_be_a_plain_hash_name(tmp_path):
    m = pelt("bert", up.UniPELTConfig(**CFG))
    up.save_unipelt(m, str(tmp_path))
    j = tmp_path / "unipelt.json"
    meta = json.loads(j.read_text())
    for bad in ("../unipelt.json", "unipelt.safetensors", None):
        j.write_text(json.dumps({**meta, "weights": bad}))
        with pytest.raises(up.UniPELTCheckpointError, match="names no valid weights"):
            up.load_unipelt(m, str(tmp_path))


def test_trainable_report_bert_base_under_two_percent():
    import transformers as tf

    with torch.device("meta"):
        model = tf.BertForSequenceClassification(tf.BertConfig(num_labels=2))
    up.apply_unipelt(model, up.UniPELTConfig())
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 100_000_000 < total < 120_000_000
    assert trainable / total < 0.02, trainable / total
    # analytic count of the default config (hidden 768, 12 layers, 12 heads)
    h, layers = 768, 12
    adapter = layers * (h * 48 + 48 + 48 * h + h + h + 1)
    prefix = 10 * h + (h * 32 + 32) + (32 * layers * 2 * h + layers * 2 * h) + layers * (h + 1)
    head = h * 2 + 2
    biases = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")
    ) - sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.endswith("bias") and ("adapters." in n or "unipelt." in n or "classifier" in n)
    )
    assert trainable == adapter + prefix + head + biases
    report = up.trainable_report(model)
    assert "adapter" in report and "prefix" in report and "bitfit" in report
    assert f"{adapter:,}" in report and f"{trainable:,}" in report and f"{head:,}" in report
    assert f"{10 * layers * 2 * h:,} fixed K/V" in report
