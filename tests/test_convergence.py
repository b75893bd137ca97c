"""Convergence: training runs on the fused backends against eager (issue 28, part 3).

Op-level parity cannot see drift that builds up over a run. As Liger-Kernel's
test/convergence does (same seed, a mini model with and without the kernels, then the
per-step losses, the eval log-probabilities and every final parameter compared with per-dtype
tolerances), each mini model here gets the full UniPELT config -- BitFit, adapters, prefix,
LoRA and soft prompt, every one gated, two tasks mixed within each batch via ``task_ids`` --
and trains with AdamW on a fixed token stream, once on ``eager`` (the spec) and once on each
fused backend: ``torch`` and ``triton`` (under the interpreter in CI).

Models: LLaMA with GQA (4 heads, 2 KV heads), BERT (sequence classification), BART and T5
(seq2seq), at tests/hf_tiny.py / tests/test_hf_encdec.py sizes (hidden 32). CI (fp32): 30
steps on torch for every model; 2 on triton for T5, whose interpreter costs ~30 s a step
for the full config on 2 cores (LLaMA, BERT and BART on triton, and 12 triton steps on every
model, are slow tests: UNIPELT_SLOW=1). The gpu variant trains LLaMA at Liger's mini size (hidden 1024, 4 layers) in bf16 for 30 steps.

A failure names the first step whose loss diverged, with both losses, and the parameters
and log-probs that differ most.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import transformers as tf

import unipelt_fast as up
from tests.hf_tiny import ADAPTER, perturb, tiny_model
from tests.test_hf_encdec import tiny_bart

VOCAB, B, L, LT = 64, 4, 8, 5
TASK_IDS = torch.tensor([0, 1, 1, 0])
LR = 5e-3  # large enough that every tensor moves well off its start in 30 steps
KINDS = ("llama", "bert", "bart", "t5")
# steps per backend in CI; the triton interpreter costs ~30 s a step for the full config on 2
# cores (plus ~30 s of first-call setup), so CI runs it for 2 steps on each model and the
# slow test for 12
STEPS = {"torch": 30, "triton": 2}


@dataclass(frozen=True)
class Tol:
    """Per-dtype tolerances (|a - b| <= atol + rtol * |b|, elementwise)."""

    loss_atol: float
    loss_rtol: float
    logprob_atol: float
    logprob_rtol: float
    param_atol: float
    param_rtol: float


# fp32: the fused kernels change only the rounding order. Measured worst cases of the torch
# backend over 30 steps (llama, bert, bart, t5): losses 2.3e-7 relative, final parameters
# 3e-5 absolute (t5; 5e-6 the others), eval log-probs 1.5e-6 absolute; triton over 2 steps
# (llama, t5): losses 1.1e-7 relative, parameters 1.2e-5, log-probs 1.3e-6. The bounds sit
# 10-20x above those where that is possible: a 1e-4 relative error injected into the
# prefix attention's output fails the parameter check. Liger's fp32 loss bound is rtol 2e-5.
# bf16 (gpu): an 8-bit mantissa; Liger's bf16 bounds.
TOL = {
    torch.float32: Tol(1e-6, 5e-6, 2e-5, 1e-5, 5e-5, 1e-4),
    torch.bfloat16: Tol(1e-2, 2e-2, 1e-1, 2e-2, 2e-2, 2e-2),
}


def _config() -> up.UniPELTConfig:
    return up.UniPELTConfig(
        bitfit=True,
        adapter=ADAPTER,
        prefix=True,
        lora=True,
        prompt=True,
        gate_mode="masked_mean",
        tasks=("a", "b"),
    )


def _base(kind: str, size: str):
    if size == "liger":  # Liger-Kernel's mini LLaMA size, GQA
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(
            vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return tf.LlamaForCausalLM(cfg)
    if kind in ("bart", "t5"):
        return tiny_bart(0, kind)
    return tiny_model(kind)  # llama: 4 heads, 2 KV heads


def _batch(kind: str, step: int, vocab: int = VOCAB, seq: int = L) -> dict:
    """The fixed token stream: batch ``step`` (a negative step: the eval batch)."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, vocab, (B, seq), generator=g)
    am = torch.ones(B, seq, dtype=torch.long)
    am[1, seq - 3 :] = 0  # a right-padded example
    if kind == "llama":
        return {"input_ids": ids, "attention_mask": am, "labels": ids.masked_fill(am == 0, -100)}
    if kind == "bert":
        return {
            "input_ids": ids,
            "attention_mask": am,
            "labels": torch.randint(0, 3, (B,), generator=g),
        }
    labels = torch.randint(3, vocab, (B, LT), generator=g)
    labels[2, LT - 2 :] = -100  # a padded target; the model shifts labels into its inputs
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


@dataclass
class Run:
    losses: torch.Tensor  # (steps,) float64
    logprobs: torch.Tensor  # eval batch, log_softmax of the logits, float64
    params: dict[str, torch.Tensor]  # every tuned tensor after the run, float64
    start: dict[str, torch.Tensor]  # ... and before it


@functools.cache
def _train(kind: str, backend: str, dtype: torch.dtype, steps: int, size: str = "tiny") -> Run:
    device = "cuda" if size == "liger" else "cpu"
    vocab, seq = (32000, 64) if size == "liger" else (VOCAB, L)
    torch.manual_seed(0)
    m = up.apply_unipelt(_base(kind, size), _config(), backend=backend)
    perturb(m, scale=0.1)  # off the zero inits (LoRA B, adapter up), the same for every run
    m = m.to(device=device, dtype=dtype).train()
    tuned = {n: p for n, p in m.named_parameters() if p.requires_grad}
    start = {n: p.detach().double().cpu() for n, p in tuned.items()}
    opt = torch.optim.AdamW(tuned.values(), lr=LR)
    tid = TASK_IDS.to(device)
    losses = []
    for step in range(steps):
        b = {k: v.to(device) for k, v in _batch(kind, step, vocab, seq).items()}
        loss = m(**b, task_ids=tid).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    m.eval()
    with torch.no_grad():
        b = {k: v.to(device) for k, v in _batch(kind, -1, vocab, seq).items()}
        logits = m(**b, task_ids=tid).logits
    return Run(
        torch.stack(losses).double().cpu(),
        torch.log_softmax(logits.double(), -1).cpu(),
        {n: p.detach().double().cpu() for n, p in tuned.items()},
        start,
    )


def _worst(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> tuple[float, float]:
    """(the largest |a - b| - (atol + rtol |b|), the largest |a - b|)."""
    d = (a - b).abs()
    return (d - (atol + rtol * b.abs())).max().item(), d.max().item()


def _compare(got: Run, want: Run, tol: Tol, what: str) -> None:
    # per-step losses: name the first step that diverged
    d = (got.losses - want.losses).abs()
    bad = (d > tol.loss_atol + tol.loss_rtol * want.losses.abs()).nonzero().flatten()
    if len(bad):
        s = bad[0].item()
        rows = "\n".join(
            f"  step {i:2d}: eager {want.losses[i].item():.9f}  fused {got.losses[i].item():.9f}"
            for i in range(max(0, s - 1), min(len(d), s + 3))
        )
        pytest.fail(
            f"{what}: the loss first diverged at step {s} of {len(d)} "
            f"(|diff| {d[s].item():.3e} > {tol.loss_atol:.0e} + {tol.loss_rtol:.0e}|loss|)\n{rows}"
        )
    # every final tuned parameter
    assert got.params.keys() == want.params.keys()
    over = []
    for n in want.params:
        excess, diff = _worst(got.params[n], want.params[n], tol.param_atol, tol.param_rtol)
        if excess > 0:
            over.append((diff, n))
    if over:
        over.sort(reverse=True)
        names = ", ".join(f"{n} ({diff:.2e})" for diff, n in over[:5])
        pytest.fail(
            f"{what}: losses agree over all {len(d)} steps, but {len(over)} of "
            f"{len(want.params)} final parameters differ beyond atol {tol.param_atol:.0e} / "
            f"rtol {tol.param_rtol:.0e}; worst: {names}"
        )
    # eval log-probabilities
    excess, diff = _worst(got.logprobs, want.logprobs, tol.logprob_atol, tol.logprob_rtol)
    assert excess <= 0, f"{what}: eval log-probs differ by up to {diff:.3e}"
    # the run did train: the comparison is not between two models that stood still
    still = [n for n in want.params if torch.allclose(want.params[n], want.start[n])]
    assert not still, f"{what}: tensors that did not move in training: {still[:5]}"


# CI: torch on every model; triton on T5 (encoder-decoder, relative position bias, causal
# decoder), ~65 CPU-s of interpreter time; triton on LLaMA, BERT and BART, and 12 triton
# steps on every model, are slow tests (UNIPELT_SLOW=1). LLaMA's triton run left CI for time
# (~33 CPU-s): tests/test_hf_triton.py::test_triton_matches_eager[llama-*-kernels] still checks
# its logits and every gradient on triton against eager (GQA, causal), and T5's run here the
# multi-step path.
CI_TRITON = ("t5",)
CASES = [
    *(
        pytest.param(kind, "triton", STEPS["triton"], marks=pytest.mark.interpreter)
        if kind in CI_TRITON
        else pytest.param(
            kind, "triton", STEPS["triton"], marks=[pytest.mark.interpreter, pytest.mark.slow]
        )
        for kind in KINDS
    ),
    *(
        pytest.param(kind, "triton", 12, marks=[pytest.mark.interpreter, pytest.mark.slow])
        for kind in KINDS
    ),
    *((kind, "torch", STEPS["torch"]) for kind in KINDS),
]


@pytest.mark.parametrize(("kind", "backend", "steps"), CASES)
def test_convergence_fp32(kind, backend, steps):
    want = _train(kind, "eager", torch.float32, steps)
    got = _train(kind, backend, torch.float32, steps)
    _compare(got, want, TOL[torch.float32], f"{kind} {backend} vs eager, fp32")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_convergence_bf16_liger_size(backend):
    want = _train("llama", "eager", torch.bfloat16, 30, "liger")
    got = _train("llama", backend, torch.bfloat16, 30, "liger")
    _compare(got, want, TOL[torch.bfloat16], f"llama (hidden 1024, 4 layers) {backend}, bf16")


def test_a_divergence_names_its_first_step():
    """The comparison itself: a loss that drifts from step 5 on is reported at step 5."""
    losses = torch.linspace(4.0, 2.0, 10, dtype=torch.float64)
    p = {"w": torch.ones(3, dtype=torch.float64)}
    want = Run(losses, torch.zeros(2, 3), p, {"w": torch.zeros(3)})
    drift = losses.clone()
    drift[5:] += 1e-3 * torch.arange(1, 6)
    with pytest.raises(pytest.fail.Exception, match="first diverged at step 5 of 10"):
        _compare(Run(drift, want.logprobs, p, want.start), want, TOL[torch.float32], "x")
    bumped = {"w": p["w"] + torch.tensor([0.0, 1e-3, 0.0], dtype=torch.float64)}
    with pytest.raises(pytest.fail.Exception, match="1 of 1 final parameters differ"):
        _compare(Run(losses, want.logprobs, bumped, want.start), want, TOL[torch.float32], "x")
    with pytest.raises(AssertionError, match="did not move"):
        _compare(want, Run(losses, want.logprobs, p, p), TOL[torch.float32], "x")
