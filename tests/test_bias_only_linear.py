"""The bias_only_linear op on every backend (parity with the float64 eager reference, saved
tensors, BitFit), and its eager reference (gradcheck). The torch
backend runs the eager code in the test dtype; triton runs under the interpreter. The CUDA
backend's parity runs on a GPU in tests/test_cuda_backend.py."""

import pytest
import torch
import torch.nn.functional as F

import unipelt_fast as uf
from tests.launches import Counter
from tests.parity import bias_only_linear_case, check_parity
from unipelt_fast._args import BiasOnlyLinearArgs
from unipelt_fast.testing import assert_close

ACTS = [None, "relu", "gelu", "gelu_tanh", "silu", "tanh"]
# (lead, d_in, d_out, noncontiguous): 1, 7 and 33 rows, a 3-D x, odd feature sizes, and
# d_out = 130 so the backward has two column blocks (128 + a masked 2).
SHAPES = [
    ((1,), 5, 3, False),
    ((7,), 19, 37, True),
    ((33,), 9, 130, False),
    ((3, 11), 17, 21, True),
]


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}->{s[2]}")
def test_parity(shape, act, dtype, backend):
    lead, d_in, d_out, nc = shape
    case = bias_only_linear_case(lead, d_in, d_out, activation=act, noncontiguous=nc)
    check_parity(uf.bias_only_linear, case, dtype, backend)


@pytest.mark.interpreter
def test_parity_many_row_tiles_per_program():
    # 600 rows: the backward programs loop over several row tiles before storing partials.
    case = bias_only_linear_case((600,), 7, 130, activation="gelu")
    check_parity(uf.bias_only_linear, case, torch.float32, "triton")


@pytest.mark.interpreter
def test_parity_wide_column_blocks():
    # 1100 columns: 128-wide column blocks in the backward (9 programs, the last masked).
    case = bias_only_linear_case((21,), 6, 1100, activation="relu")
    check_parity(uf.bias_only_linear, case, torch.float16, "triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("act", ACTS)
def test_launches_per_call(monkeypatch, act):
    """relu and identity run in the GEMM epilogue (no Triton launch), other activations
    take one pass; the backward is one launch (grad_pre and the finished dbias) plus the dx
    GEMM, with no torch reduction and no zero grad filled for the unused pre output."""
    name = act or "identity"
    fused = name in ("identity", "relu")
    x, w, b = torch.randn(40, 9), torch.randn(70, 9), torch.randn(70)
    g = torch.randn(40, 70)
    count = Counter(monkeypatch, "bias_only_linear")
    from unipelt_fast.kernels import bias_only_linear as kernel

    # the launcher: the GEMM is its only torch compute op
    with count:
        y, pre = kernel.forward(BiasOnlyLinearArgs(x, w, b, name))
    assert count.launches == ([] if fused else ["_act_fwd_kernel"])
    assert count.compute_ops() == ["aten._addmm_activation" if name == "relu" else "aten.addmm"]
    count.clear()
    with count:
        kernel.backward(BiasOnlyLinearArgs(x, w, b, name), g, pre if not fused else y)
    assert count.launches == ["_act_bias_bwd_kernel"]
    assert count.compute_ops() == ["aten.mm"]
    # the op through autograd: the same launches, nothing else around the custom ops
    x.requires_grad_(), b.requires_grad_()
    count.clear()
    with count:
        y = uf.bias_only_linear(x, w, b, activation=act, backend="triton")
    assert count.launches == ([] if fused else ["_act_fwd_kernel"])
    assert count.compute_ops() == ["unipelt_fast.bias_only_linear"]
    count.clear()
    with count:
        y.backward(g)
    assert count.launches == ["_act_bias_bwd_kernel"]
    assert count.compute_ops() == ["unipelt_fast.bias_only_linear_backward"]


@pytest.mark.interpreter
@pytest.mark.parametrize("act", [None, "relu", "gelu"])
def test_no_rows(act):
    x = torch.randn(2, 0, 5, requires_grad=True)
    w, b = torch.randn(7, 5), torch.randn(7, requires_grad=True)
    y = uf.bias_only_linear(x, w, b, activation=act, backend="triton")
    assert y.shape == (2, 0, 7)
    y.sum().backward()
    assert torch.equal(b.grad, torch.zeros(7)) and x.grad.shape == x.shape


@pytest.mark.interpreter
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_dbias_is_deterministic(act):
    x = torch.randn(33, 9)
    w, b = torch.randn(70, 9), torch.randn(70, requires_grad=True)
    g = torch.randn(33, 70)
    grads = []
    for _ in range(2):
        y = uf.bias_only_linear(x, w, b, activation=act, backend="triton")
        (db,) = torch.autograd.grad(y, b, g)
        grads.append(db)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.interpreter
@pytest.mark.parametrize("act", [None, "relu", "gelu"])
def test_no_weight_grad_and_x_not_saved(act):
    lin = torch.nn.Linear(9, 13)
    lin.weight.requires_grad_(False)
    x = torch.randn(2, 5, 9, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = uf.bias_only_linear(x, lin.weight, lin.bias, activation=act, backend="triton")
    ptrs = {t.data_ptr() for t in saved}
    assert x.data_ptr() not in ptrs
    assert all(t.shape != x.reshape(-1, 9).shape for t in saved)
    # only the (already alive) weight plus at most one (M, d_out) tensor: pre, or y for relu
    big = [t for t in saved if t.numel() > 0 and t.data_ptr() != lin.weight.data_ptr()]
    assert len(big) == (0 if act is None else 1)
    assert all(t.shape == (10, 13) for t in big)
    if act == "relu":  # relu keeps the output itself, no pre-activation
        assert big[0].data_ptr() == y.data_ptr()
    y.square().sum().backward()
    assert lin.weight.grad is None
    assert lin.bias.grad is not None and x.grad is not None


def _tiny_bert(hidden_act="gelu", layers=1, intermediate=24):
    """A tiny BertConfig (hidden 16, vocab 50) and the BertModel class to build it."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=16,
        hidden_act=hidden_act,
    )
    return cfg, BertModel


def _bias_grads_match(model, ref, ids, dtype=torch.float32):
    """Same hidden states and bias gradients (a random projection of the output: the sum of
    LayerNorm(h)^2 would be constant in h at gamma = 1)."""
    out_ref = ref(ids).last_hidden_state
    out = model(ids).last_hidden_state
    assert_close(out, out_ref, dtype, "hidden")
    proj = torch.randn_like(out)
    (out_ref * proj).sum().backward()
    (out * proj).sum().backward()
    got = dict(model.named_parameters())
    checked = 0
    for n, p in ref.named_parameters():
        if p.requires_grad and p.grad is not None:
            if n.endswith("key.bias"):  # softmax is shift-invariant: d key-bias is exactly 0
                assert got[n].grad.abs().max() < 1e-5 and p.grad.abs().max() < 1e-5, n
            else:
                assert_close(got[n].grad, p.grad, dtype, n)
            checked += 1
        else:
            assert got[n].grad is None, n
    assert checked == 9  # every Linear/LayerNorm bias but the (unused) pooler's


def _bert_pair(hidden_act="gelu"):
    """An eager-BitFit reference BERT (off its init) and an identical copy."""
    cfg, BertModel = _tiny_bert(hidden_act)
    ref = BertModel(cfg).eval()
    with torch.no_grad():  # off the init (LayerNorm gamma = 1, beta = 0, zero biases)
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = BertModel(cfg).eval()
    model.load_state_dict(ref.state_dict())
    for n, p in ref.named_parameters():  # eager BitFit: biases of Linear/LayerNorm train
        p.requires_grad_(n.endswith(".bias"))
    return model, ref


@pytest.mark.interpreter
def test_bitfit_on_tiny_bert_matches_eager_bitfit():
    model, ref = _bert_pair("gelu")
    uf.bitfit(model, backend="triton")
    assert any(isinstance(m, uf.BiasOnlyLinear) for m in model.modules())
    assert any(isinstance(m, uf.BiasOnlyLayerNorm) for m in model.modules())
    # BertIntermediate's gelu now runs inside the linear's fused passes
    inter = model.encoder.layer[0].intermediate
    assert inter.dense.activation == "gelu"
    assert isinstance(inter.intermediate_act_fn, torch.nn.Identity)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in ref.named_parameters() if p.requires_grad}
    _bias_grads_match(model, ref, torch.randint(0, 50, (2, 7)))


@pytest.mark.parametrize(
    "hidden_act, fused",
    [
        ("gelu", "gelu"),
        ("gelu_new", "gelu_tanh"),
        ("gelu_pytorch_tanh", "gelu_tanh"),
        ("relu", "relu"),
        ("silu", "silu"),
        ("tanh", "tanh"),
        ("quick_gelu", None),  # no bias_only_linear equivalent: left as it is
    ],
)
def test_bitfit_fuses_intermediate_activation_exactly(hidden_act, fused):
    # eager backend: checks the fusion rewrite itself (the triton test above checks kernels)
    model, ref = _bert_pair(hidden_act)
    uf.bitfit(model, backend="eager")
    assert model.encoder.layer[0].intermediate.dense.activation == fused
    _bias_grads_match(model, ref, torch.randint(0, 50, (2, 7)))
    plain = uf.bitfit(_bert_pair(hidden_act)[0], backend="eager", fuse_activations=False)
    assert plain.encoder.layer[0].intermediate.dense.activation is None


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES + [((4, 129), 257, 1000, True)], ids=str)
def test_parity_gpu(shape, act, dtype):
    lead, d_in, d_out, nc = shape
    case = bias_only_linear_case(lead, d_in, d_out, activation=act, noncontiguous=nc, device="cuda")
    check_parity(uf.bias_only_linear, case, dtype, "triton")


@pytest.mark.gpu
def test_parity_gpu_realistic_gelu_bf16():
    # The benchmark shape: M=16384, d_in=4096, d_out=16384, gelu.
    case = bias_only_linear_case((16384,), 4096, 16384, activation="gelu", device="cuda")
    check_parity(uf.bias_only_linear, case, torch.bfloat16, "triton")


# ---- the eager reference (the spec) ------------------------------------------------------


@pytest.mark.parametrize("act", [None, "relu", "gelu", "gelu_tanh", "silu", "tanh", "identity"])
def test_gradcheck_and_value(act):
    case = bias_only_linear_case(lead=(3, 2), d_in=5, d_out=4, activation=act)
    x, w, b = case.args.values()
    y = uf.bias_only_linear(x, w, b, activation=act, backend="eager")
    z = x @ w.T + b
    want = {
        None: z,
        "identity": z,
        "relu": z.clamp_min(0),
        "tanh": torch.tanh(z),
        "gelu": F.gelu(z),
        "gelu_tanh": F.gelu(z, approximate="tanh"),
        "silu": F.silu(z),
    }[act]
    assert_close(y, want, torch.float64, "y")
    xx, bb = x.detach().requires_grad_(), b.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x_, b_: uf.bias_only_linear(x_, w, b_, activation=act, backend="eager"), (xx, bb)
    )


def test_weight_never_gets_grad():
    lin = torch.nn.Linear(6, 5)
    lin.weight.requires_grad_(False)
    x = torch.randn(3, 6, requires_grad=True)
    uf.bias_only_linear(
        x, lin.weight, lin.bias, activation="gelu", backend="eager"
    ).sum().backward()
    assert lin.weight.grad is None and lin.bias.grad is not None and x.grad is not None


def test_eager_bitfit_matches_bert_with_trainable_biases():
    cfg, BertModel = _tiny_bert(layers=2, intermediate=32)
    torch.manual_seed(0)
    ref = BertModel(cfg).eval()
    model = BertModel(cfg).eval()
    model.load_state_dict(ref.state_dict())
    for n, p in ref.named_parameters():  # eager BitFit: biases of Linear/LayerNorm train
        p.requires_grad_(n.endswith(".bias"))
    uf.bitfit(model, backend="eager")
    assert any(isinstance(m, uf.BiasOnlyLinear) for m in model.modules())
    assert any(isinstance(m, uf.BiasOnlyLayerNorm) for m in model.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in ref.named_parameters() if p.requires_grad}
    ids = torch.randint(0, 50, (2, 7))
    ref(ids).last_hidden_state.square().mean().backward()
    model(ids).last_hidden_state.square().mean().backward()
    got = dict(model.named_parameters())
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert_close(got[n].grad, p.grad, torch.float32, n)
        else:
            assert got[n].grad is None, n
