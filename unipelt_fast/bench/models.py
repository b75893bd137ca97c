"""Model-level run: one training step and peak memory for a BERT-base-sized encoder and a
LLaMA-style decoder, built from transformers configs (random weights, no download).

Rows: full fine-tuning (train step), frozen base (inference forward), UniPELT on eager
and on the fused backend (train step and inference forward), and peers when importable
(peft prefix tuning, the adapters library's UniPELT).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from .runners import first_line, record, saved_bytes
from .shapes import MODEL_SIZES

# (row name, what is timed, how the model is adapted)
MODEL_ROWS = (
    ("full_ft", "train", "full"),
    ("frozen_base", "infer", "full"),
    ("unipelt_eager", "train", "unipelt:eager"),
    ("unipelt_eager", "infer", "unipelt:eager"),
    ("unipelt_fused", "train", "unipelt:fused"),
    ("unipelt_fused", "infer", "unipelt:fused"),
    ("peft_prefix", "train", "peft_prefix"),
    ("adapters_unipelt", "train", "adapters_unipelt"),
)


def unipelt_config():
    """The UniPELT configuration the model rows use (BitFit + gated adapter + gated prefix)."""
    import unipelt_fast

    return unipelt_fast.UniPELTConfig(
        bitfit=True, adapter=True, prefix=True, lora=False, prompt=False, gate_mode="mean"
    )


def build_model(name: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """A freshly initialised model and one batch of inputs (with labels)."""
    import transformers

    size = MODEL_SIZES[name]["tiny" if tiny else "full"]
    B, L = size["batch"], size["seq_len"]
    g = torch.Generator().manual_seed(0)
    vocab = size["config"]["vocab_size"]
    ids = torch.randint(0, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if name == "bert-base":
        cfg = transformers.BertConfig(**size["config"], num_labels=2)
        cls = transformers.BertForSequenceClassification
        mask[1::2, L - L // 8 :] = 0  # some padding: exercises the key masks
        labels = torch.randint(0, 2, (B,), generator=g)
        extra = {}
    else:
        cfg = transformers.LlamaConfig(**size["config"])
        cls = transformers.LlamaForCausalLM
        labels = ids.clone()
        extra = {"use_cache": False}  # one full-sequence pass: no KV cache to build
    with torch.device(device):
        model = cls(cfg)
    model = model.to(dtype)
    batch = {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
        **extra,
    }
    shape = f"B={B} L={L} hidden={cfg.hidden_size} layers={cfg.num_hidden_layers}"
    return model, batch, shape


def adapt(model, how: str, device: torch.device):
    """Apply the row's method in place; returns the model. Raises with the reason if the
    method is not available here."""
    if how == "full":
        return model
    if how.startswith("unipelt:"):
        import unipelt_fast

        if not hasattr(unipelt_fast, "apply_unipelt"):
            raise NotImplementedError("unipelt_fast.apply_unipelt is not available yet")
        backend = how.split(":")[1]
        if backend == "fused":
            if device.type != "cuda":
                raise RuntimeError("the fused backend at model level needs a CUDA GPU")
            backend = "triton"
        out = unipelt_fast.apply_unipelt(model, unipelt_config(), backend=backend)
        return model if out is None else out  # in place or returned: either works
    if how == "peft_prefix":
        import peft  # noqa: F401 - ImportError is the reason the row is skipped

        task = "SEQ_CLS" if "Sequence" in type(model).__name__ else "CAUSAL_LM"
        cfg = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=16)
        return peft.get_peft_model(model, cfg)
    if how == "adapters_unipelt":
        import adapters

        adapters.init(model)
        model.add_adapter("unipelt", config=adapters.UniPELTConfig())
        model.train_adapter("unipelt")
        return model
    raise ValueError(f"unknown model method {how!r}")


def _train_step(model, batch, opt) -> Callable[[], None]:
    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _infer(model, batch) -> Callable[[], None]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def fwd():
        with torch.no_grad():
            model(**inputs)

    return fwd


def prepare(
    name: str, how: str, mode: str, tiny: bool, device, dtype, info: dict | None = None
) -> tuple:
    """A warmed-up zero-argument callable (a train step or an inference forward) for one
    model row, plus its info (shape, params, trainable params, saved bytes for train),
    filled into ``info`` as it goes. Raises with the reason when the row cannot run here."""
    model, batch, shape = build_model(name, tiny, device, dtype)
    info = {} if info is None else info
    info.update(shape=shape, params=sum(p.numel() for p in model.parameters()))
    model = adapt(model, how, device)
    if mode == "infer" and how == "full":
        model.requires_grad_(False)  # the frozen base
    trainable = [p for p in model.parameters() if p.requires_grad]
    info["trainable_params"] = sum(p.numel() for p in trainable)
    if mode == "infer":
        model.eval()
        fn = _infer(model, batch)
        fn()
        return fn, info
    model.train()
    if not trainable:
        raise RuntimeError("no trainable parameters after adaptation")
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    fn = _train_step(model, batch, opt)
    fn()  # builds the optimizer state; compiles / autotunes kernels
    total, extra, _ = saved_bytes(lambda: model(**batch).loss, list(model.parameters()))
    info["saved_bytes"], info["saved_extra_bytes"] = total, extra
    opt.zero_grad(set_to_none=True)
    return fn, info


def run_model_row(
    name: str, row: str, mode: str, how: str, tiny: bool, device, dtype, timer
) -> dict:
    """One model-level row: median ms of a train step / inference forward, peak memory."""
    res: dict = {"impl": row, "pass": mode}
    fn = None
    try:
        fn, _ = prepare(name, how, mode, tiny, device, dtype, info=res)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            res["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated())
        record(res, "time_ms", timer(fn))
        res["available"] = True
    except Exception as e:  # noqa: BLE001 - any failure makes the row unavailable, with why
        res["available"] = False
        res["reason"] = first_line(e)
    finally:
        fn = None  # the closure holds the model and optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def fractions(rows: list[dict]) -> dict[str, float]:
    """UniPELT train time / full fine-tuning, and inference time / frozen base (the paper
    reports 55-67% and 118-127%)."""
    t = {(r["impl"], r["pass"]): r.get("time_ms") for r in rows if r.get("available")}
    out = {}
    for impl in ("unipelt_eager", "unipelt_fused", "peft_prefix", "adapters_unipelt"):
        if t.get((impl, "train")) and t.get(("full_ft", "train")):
            out[f"{impl}_train_frac_of_full_ft"] = t[(impl, "train")] / t[("full_ft", "train")]
        if t.get((impl, "infer")) and t.get(("frozen_base", "infer")):
            out[f"{impl}_infer_frac_of_frozen"] = t[(impl, "infer")] / t[("frozen_base", "infer")]
    return out
