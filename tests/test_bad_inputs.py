"""A new user's mistakes (issue 17's table and more) get a clear error naming the argument,
raised before anything changes; nothing is silently accepted."""

import math

import pytest
import torch

import unipelt_fast as up
from tests.hf_tiny import ADAPTER, B, batch, tiny_model
from tests.parity import gated_adapter_case, prefix_attention_case

# --- configuration fields: (constructor, kwargs, error, words the message must contain) ---
CONFIG_BAD = [
    (up.UniPELTConfig, dict(bitfit="no"), TypeError, "UniPELTConfig.bitfit"),
    (up.UniPELTConfig, dict(bitfit=1), TypeError, "UniPELTConfig.bitfit"),
    (up.UniPELTConfig, dict(gate_mode="avg"), ValueError, "UniPELTConfig.gate_mode"),
    (up.UniPELTConfig, dict(tasks=()), ValueError, "UniPELTConfig.tasks"),
    (up.UniPELTConfig, dict(tasks=("a", "a")), ValueError, "UniPELTConfig.tasks"),
    (up.UniPELTConfig, dict(tasks=("a", 3)), TypeError, "UniPELTConfig.tasks"),
    (up.UniPELTConfig, dict(tasks=5), TypeError, "UniPELTConfig.tasks"),
    (up.UniPELTConfig, dict(modules_to_save=(1,)), TypeError, "UniPELTConfig.modules_to_save"),
    (up.UniPELTConfig, dict(extra=[]), TypeError, "UniPELTConfig.extra"),
    (up.UniPELTConfig, dict(adapter="yes"), TypeError, "UniPELTConfig.adapter"),
    (up.UniPELTConfig, dict(prefix=1), TypeError, "UniPELTConfig.prefix"),
    (up.UniPELTConfig, dict(lora={"r": 0}), ValueError, "LoRAConfig.r"),
    (up.PrefixConfig, dict(length=2.5), TypeError, "PrefixConfig.length"),
    (up.PrefixConfig, dict(length=True), TypeError, "PrefixConfig.length"),
    (up.PrefixConfig, dict(length=0), ValueError, "PrefixConfig.length"),
    (up.PrefixConfig, dict(mlp_hidden=8.0), TypeError, "PrefixConfig.mlp_hidden"),
    (up.PrefixConfig, dict(embed_dim=0), ValueError, "PrefixConfig.embed_dim"),
    (up.PrefixConfig, dict(reparam="false"), TypeError, "PrefixConfig.reparam"),
    (up.PrefixConfig, dict(gate=None), TypeError, "PrefixConfig.gate"),
    (up.AdapterConfig, dict(bottleneck=2.5), TypeError, "AdapterConfig.bottleneck"),
    (up.AdapterConfig, dict(bottleneck=0), ValueError, "AdapterConfig.bottleneck"),
    (up.AdapterConfig, dict(activation="swish"), ValueError, "AdapterConfig.activation"),
    (up.AdapterConfig, dict(scaling=math.inf), ValueError, "AdapterConfig.scaling"),
    (up.AdapterConfig, dict(scaling="1"), TypeError, "AdapterConfig.scaling"),
    (up.AdapterConfig, dict(gate=0), TypeError, "AdapterConfig.gate"),
    (up.LoRAConfig, dict(alpha=math.nan), ValueError, "LoRAConfig.alpha"),
    (up.LoRAConfig, dict(alpha=True), TypeError, "LoRAConfig.alpha"),
    (up.LoRAConfig, dict(r=4.0), TypeError, "LoRAConfig.r"),
    (up.LoRAConfig, dict(targets=("q",)), ValueError, "LoRAConfig.targets"),
    (up.LoRAConfig, dict(targets=()), ValueError, "LoRAConfig.targets"),
    (up.LoRAConfig, dict(targets=("query", "query")), ValueError, "LoRAConfig.targets"),
    (up.LoRAConfig, dict(target_modules=5), TypeError, "LoRAConfig.target_modules"),
    (up.LoRAConfig, dict(target_modules=[""]), TypeError, "LoRAConfig.target_modules"),
    (up.LoRAConfig, dict(target_modules="(q"), ValueError, "LoRAConfig.target_modules"),
    (
        up.LoRAConfig,
        dict(target_modules=["q_proj"], split_fused=True),
        ValueError,
        "LoRAConfig.split_fused",
    ),
    (up.PromptConfig, dict(length=1.5), TypeError, "PromptConfig.length"),
    (up.PromptConfig, dict(gate="on"), TypeError, "PromptConfig.gate"),
]


@pytest.mark.parametrize("cls,kw,err,words", CONFIG_BAD, ids=lambda v: repr(v)[:40])
def test_config_field_is_checked(cls, kw, err, words):
    with pytest.raises(err) as e:
        cls(**kw)
    assert words in str(e.value), str(e.value)
    if cls in (up.AdapterConfig, up.PrefixConfig, up.LoRAConfig, up.PromptConfig):
        with pytest.raises(err, match=words.split(".")[1]):  # also inside UniPELTConfig
            up.UniPELTConfig(**{cls.__name__[:-6].lower(): kw})


def test_good_configs_still_pass():
    cfg = up.UniPELTConfig(
        lora=up.LoRAConfig(r=2, alpha=4, targets=["query"]),
        prompt={"length": 3},
        adapter=up.AdapterConfig(bottleneck=None, scaling=2),
        tasks="one",
        modules_to_save="classifier",
    )
    assert cfg.tasks == ("one",) and cfg.modules_to_save == ("classifier",)
    assert cfg.lora.targets == ("query",)
    assert up.UniPELTConfig.from_dict(cfg.to_dict()) == cfg


def _state(model):
    return (
        {n: p.detach().clone() for n, p in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [type(m) for m in model.modules()],
        model.config._attn_implementation,
        len(model._forward_pre_hooks),
    )


def _assert_unchanged(model, before):
    sd, rg, types, attn, hooks = _state(model)
    assert sd.keys() == before[0].keys()
    for n in sd:
        assert torch.equal(sd[n], before[0][n]), n
    assert rg == before[1] and types == before[2] and attn == before[3] and hooks == before[4]
    assert not hasattr(model, "unipelt")


def test_modules_to_save_typo_lists_the_modules_and_changes_nothing():
    m = tiny_model("bert")
    before = _state(m)
    with pytest.raises(ValueError, match="modules_to_save") as e:
        up.apply_unipelt(m, up.UniPELTConfig(modules_to_save=("classifer",), adapter=ADAPTER))
    assert "'classifer'" in str(e.value) and "'classifier'" in str(e.value)
    _assert_unchanged(m, before)


def test_field_changed_after_construction_is_checked_before_apply():
    m = tiny_model("gpt2")
    before = _state(m)
    cfg = up.UniPELTConfig(adapter=ADAPTER, lora=True)
    cfg.lora.alpha = float("nan")
    with pytest.raises(ValueError, match="LoRAConfig.alpha"):
        up.apply_unipelt(m, cfg)
    cfg.lora.alpha, cfg.bitfit = 16.0, "no"
    with pytest.raises(TypeError, match="UniPELTConfig.bitfit"):
        up.apply_unipelt(m, cfg)
    _assert_unchanged(m, before)


# --- task ids at model entry and set_active_task -----------------------------------------


@pytest.fixture(scope="module")
def two_task_gpt2():
    m = tiny_model("gpt2")
    up.apply_unipelt(m, up.UniPELTConfig(tasks=("a", "b"), adapter=ADAPTER, lora=True))
    return m


@pytest.mark.parametrize(
    "task_ids,err,words",
    [
        (torch.tensor([0.0, 1.0, 0.0]), TypeError, "task_ids must be an integer tensor"),
        (torch.tensor([0.7, 1.2, 0.0]), TypeError, "torch.float32"),
        (torch.tensor([True, False, True]), TypeError, "torch.bool"),
        ([0.0, 1.0, 0.0], TypeError, "task_ids entries"),
        ([True, False, True], TypeError, "task_ids entries"),
        (["a", "zzz", "b"], ValueError, "unknown task 'zzz'; the tasks are ('a', 'b')"),
        ("a", TypeError, "list of task names"),
        (torch.tensor([0, 2, 1]), ValueError, "task_ids must be in [0, 2)"),
        (torch.tensor([0, 1]), ValueError, "task_ids has 2 entries for 3 examples"),
    ],
)
def test_bad_task_ids(two_task_gpt2, task_ids, err, words):
    b = batch("gpt2")
    with pytest.raises(err) as e, torch.no_grad():
        two_task_gpt2(**b, task_ids=task_ids)
    assert words in str(e.value), str(e.value)


def test_task_names_equal_task_indices(two_task_gpt2):
    b = batch("gpt2")
    with torch.no_grad():
        by_name = two_task_gpt2(**b, task_ids=["b", "a", "b"]).logits
        by_index = two_task_gpt2(**b, task_ids=torch.tensor([1, 0, 1])).logits
        by_ints = two_task_gpt2(**b, task_ids=[1, 0, 1]).logits
    torch.testing.assert_close(by_name, by_index, rtol=0, atol=0)
    torch.testing.assert_close(by_ints, by_index, rtol=0, atol=0)


@pytest.mark.parametrize(
    "task,err,words",
    [
        ("zzz", ValueError, "unknown task 'zzz'; the tasks are ('a', 'b')"),
        (2, ValueError, "the tasks are ('a', 'b')"),
        (True, TypeError, "task must be"),
        (1.0, TypeError, "task must be"),
    ],
)
def test_set_active_task_unknown(two_task_gpt2, task, err, words):
    with pytest.raises(err) as e:
        up.set_active_task(two_task_gpt2, task)
    assert words in str(e.value), str(e.value)
    assert two_task_gpt2.unipelt.default_task == 0  # unchanged


# --- op arguments --------------------------------------------------------------------------


def _f32(d: dict) -> dict:
    return {
        n: (t.detach().float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
        for n, t in d.items()
    }


def _pa_args():
    case = prefix_attention_case(B=2, H=2, Hkv=1, Lq=3, Lk=4, P=2, D=8, layout="shared")
    return _f32({**case.args, **case.kwargs})


@pytest.mark.parametrize("backend", ["eager", "triton", "cuda", "auto"])
@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan, 0.0])
def test_prefix_attention_softmax_scale_must_be_finite(backend, scale):
    a = _pa_args()
    with pytest.raises(ValueError, match="softmax_scale must be positive and finite"):
        up.prefix_attention(**{**a, "softmax_scale": scale}, backend=backend)


def _ga_args(**over):
    case = gated_adapter_case((2, 5), 8, 4, gate_mode="mean", masked=True)
    return {**_f32({**case.args, **case.kwargs}), **over}


@pytest.mark.parametrize("backend", ["eager", "triton", "cuda", "auto"])
@pytest.mark.parametrize("scaling", [math.nan, math.inf, -math.inf])
def test_gated_adapter_scaling_must_be_finite(backend, scaling):
    with pytest.raises(ValueError, match="scaling must be finite"):
        up.gated_adapter(**_ga_args(scaling=scaling), backend=backend)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_nan_in_excluded_token_stays_out_of_the_mean_gate(backend):
    """A NaN in a padding token the mask excludes must not reach the example's other tokens
    (masking by multiplication would give 0 * NaN = NaN in the mean)."""
    a = _ga_args()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    x = a["x"].detach().clone()
    x_nan = x.clone()
    x_nan[0, 4] = float("nan")
    a.update(gate_mask=mask, residual=None)
    clean = up.gated_adapter(**{**a, "x": x}, backend=backend)
    dirty = up.gated_adapter(**{**a, "x": x_nan}, backend=backend)
    assert torch.isnan(dirty[0, 4]).all()  # the NaN token itself stays NaN
    torch.testing.assert_close(dirty[0, :4], clean[0, :4], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dirty[1], clean[1], rtol=0, atol=0)


def test_gate_module_masked_mean_ignores_nan_in_padding():
    g = up.Gate(8, "masked_mean")
    h = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    want = g(h, mask)
    h[0, 4] = float("nan")
    torch.testing.assert_close(g(h, mask), want, rtol=0, atol=0)


# --- meta tensors: shape inference through the eager path, errors still clear ------------


def test_meta_inputs_run_eager_and_bad_meta_inputs_get_clear_errors():
    a = {n: (t.to("meta") if isinstance(t, torch.Tensor) else t) for n, t in _pa_args().items()}
    out = up.prefix_attention(**a)
    assert out.device.type == "meta" and out.shape == a["q"].shape
    ga = {n: (t.to("meta") if isinstance(t, torch.Tensor) else t) for n, t in _ga_args().items()}
    y = up.gated_adapter(**ga)
    assert y.device.type == "meta" and y.shape == ga["x"].shape
    with pytest.raises(ValueError, match="k must be"):
        up.prefix_attention(**{**a, "k": torch.empty(3, 1, 4, 8, device="meta")})
    with pytest.raises(ValueError, match="w_up"):
        up.gated_adapter(**{**ga, "w_up": torch.empty(3, 3, device="meta")})
    with pytest.raises(ValueError, match="is on cpu"):
        up.prefix_attention(**{**a, "k": torch.empty(2, 1, 4, 8)})
    with pytest.raises(RuntimeError, match="triton"):
        up.prefix_attention(**a, backend="triton")
    assert B == 3  # the HF batch size the task-id cases above assume
