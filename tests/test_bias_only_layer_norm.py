"""The bias_only_layer_norm op on every backend: parity with the float64 eager reference
(the torch backend runs the eager code in the test dtype, triton under the interpreter),
d gamma never made; and the eager reference's gradcheck. The CUDA backend's parity runs on a
GPU in tests/test_cuda_backend.py."""

import pytest
import torch
import torch.nn.functional as F

import unipelt_fast as uf
from tests.launches import Counter
from tests.parity import Case, check_parity, noncontig
from unipelt_fast._args import BiasOnlyLayerNormArgs
from unipelt_fast.testing import assert_close


def ln_case(lead, d, *, layout="contiguous", device="cpu") -> Case:
    """Random x with an offset (so the mean matters), gamma, beta; x and beta trainable.

    layout: "contiguous", "transposed" (last two dims swapped in memory) or "strided"
    (every other element of a wider row)."""
    f = lambda *s: torch.randn(*s, dtype=torch.float64, device=device)
    if layout == "strided":
        x = f(*lead, 2 * d)[..., ::2]
    else:
        x = f(*lead, d)
        if layout == "transposed":
            x = noncontig(x)
    x = x * 3 + 1.5
    return Case({"x": x, "weight": f(d), "bias": f(d)}, {}, ("x", "bias"))


SHAPES = [
    ((1,), 7, "contiguous"),
    ((7,), 37, "transposed"),
    ((33,), 130, "strided"),
    ((3, 11), 19, "transposed"),
    ((5,), 3, "contiguous"),
]


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{s[2]}")
def test_parity(shape, dtype, backend):
    lead, d, layout = shape
    check_parity(uf.bias_only_layer_norm, ln_case(lead, d, layout=layout), dtype, backend)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("d", [37, 48])
def test_parity_wide_rows_loop(monkeypatch, d, dtype):
    # Rows wider than one block loop over N (at N > 16384 on a GPU); force it with 16.
    from unipelt_fast.kernels import bias_only_layer_norm as kernel  # needs triton

    monkeypatch.setattr(kernel, "MAX_BLOCK_N", 16)
    check_parity(uf.bias_only_layer_norm, ln_case((9,), d, layout="strided"), dtype, "triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows", [3, 33])
def test_parity_row_blocks_loop(monkeypatch, rows, dtype):
    # Row blocks of 2 rows: 33 rows in 4 programs make 10-row chunks (5 blocks each) and a
    # last chunk of 3 rows (a half-masked block); 3 rows make chunks of 2 and 1.
    from unipelt_fast.kernels import bias_only_layer_norm as kernel  # needs triton

    monkeypatch.setattr(kernel, "MAX_BLOCK_M", 2)
    case = ln_case((rows,), 21, layout="transposed")
    check_parity(uf.bias_only_layer_norm, case, dtype, "triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("wide", [False, True])
def test_launches_per_call(monkeypatch, wide):
    """Forward 1 launch; backward 2 (dx with per-program partial column sums, then the
    fixed-order dbias finish), with no torch compute op around them and no zero grads
    filled for mean and rstd."""
    from unipelt_fast.kernels import bias_only_layer_norm as kernel

    if wide:
        monkeypatch.setattr(kernel, "MAX_BLOCK_N", 16)
    x = torch.randn(33, 37, requires_grad=True)
    w, b = torch.randn(37), torch.randn(37, requires_grad=True)
    g = torch.randn(33, 37)
    count = Counter(monkeypatch, "bias_only_layer_norm")
    with count:
        y = uf.bias_only_layer_norm(x, w, b, backend="triton")
    assert count.launches == ["_ln_fwd_kernel"]
    assert count.compute_ops() == ["unipelt_fast.bias_only_layer_norm"]
    count.clear()
    with count:
        y.backward(g)
    assert count.launches == ["_ln_bwd_kernel", "_ln_dbias_kernel"]
    assert count.compute_ops() == ["unipelt_fast.bias_only_layer_norm_backward"]
    # inside the launcher: allocation only (dx, partials, dbias)
    count.clear()
    with count:
        args = BiasOnlyLayerNormArgs(x.detach(), w, b, 1e-5)
        _, mean, rstd = kernel.forward(args)
        kernel.backward(args, g, mean, rstd)
    assert count.launches == ["_ln_fwd_kernel", "_ln_bwd_kernel", "_ln_dbias_kernel"]
    assert count.compute_ops() == []


@pytest.mark.interpreter
def test_no_rows():
    x = torch.randn(2, 0, 5, requires_grad=True)
    w, b = torch.randn(5), torch.randn(5, requires_grad=True)
    y = uf.bias_only_layer_norm(x, w, b, backend="triton")
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(b.grad, torch.zeros(5)) and x.grad.shape == x.shape


@pytest.mark.interpreter
def test_dbias_is_deterministic_and_gamma_gets_no_grad():
    x = torch.randn(33, 21, requires_grad=True)
    w, b = torch.randn(21), torch.randn(21, requires_grad=True)
    g = torch.randn(33, 21)
    grads = []
    for _ in range(2):
        y = uf.bias_only_layer_norm(x, w, b, backend="triton")
        grads.append(torch.autograd.grad(y, (x, b), g))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    ln = torch.nn.LayerNorm(21)
    mod = uf.BiasOnlyLayerNorm.from_layer_norm(ln, backend="triton")
    mod(x).sum().backward()
    assert ln.weight.grad is None and ln.bias.grad is not None


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES + [((4, 129), 768, "transposed")], ids=str)
def test_parity_gpu(shape, dtype):
    lead, d, layout = shape
    case = ln_case(lead, d, layout=layout, device="cuda")
    check_parity(uf.bias_only_layer_norm, case, dtype, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_parity_gpu_realistic(dtype):
    check_parity(uf.bias_only_layer_norm, ln_case((16384,), 4096, device="cuda"), dtype, "triton")


@pytest.mark.gpu
def test_parity_gpu_wide_rows():
    # 20000 > MAX_BLOCK_N: the looped path on real hardware.
    case = ln_case((64,), 20000, layout="strided", device="cuda")
    check_parity(uf.bias_only_layer_norm, case, torch.float32, "triton")


# ---- the eager reference (the spec) ------------------------------------------------------


def test_layer_norm_gradcheck_and_frozen_gamma():
    x = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = uf.bias_only_layer_norm(x, w, b, 1e-5, backend="eager")
    assert_close(y, F.layer_norm(x, (6,), w, b, 1e-5), torch.float64, "y")
    assert torch.autograd.gradcheck(
        lambda x_, b_: uf.bias_only_layer_norm(x_, w, b_, backend="eager"), (x, b)
    )
    with pytest.raises(ValueError, match="weight \\(gamma\\) requires grad"):
        uf.bias_only_layer_norm(x, w.clone().requires_grad_(), b)
    with pytest.raises(ValueError, match="weight must have shape \\(6,\\)"):
        uf.bias_only_layer_norm(x, w[:5], b)
    with pytest.raises(ValueError, match="eps must be a positive float"):
        uf.bias_only_layer_norm(x, w, b, eps=0.0)
