"""Model-level run: one training step and peak memory for a BERT-base-sized encoder, a
LLaMA-style decoder and BART-base, built from transformers configs (random weights, no
download).

Rows: full fine-tuning (train step), frozen base (inference forward), this package's UniPELT
on eager and on the fused backend (train step and inference forward), and each peer (when
importable) next to this package running the same configuration, like for like:
peft prefix tuning against ``as_peft_prefix`` (a flat ungated prefix of the same length,
tokens after the prefix) and the adapters library's UniPELT against ``as_adapters_unipelt``
(``adapters.UniPELTConfig()`` translated by :func:`unipelt_fast.interop.adapters_config`).

``base_quant`` quantizes the base's weights before the method is applied (QLoRA-style), by
the libraries themselves: bitsandbytes through transformers' ``BitsAndBytesConfig``, or
torchao's ``quantize_``; every row then reports the base weights' bytes as stored.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from ..hf.report import _nbytes, _numel
from .runners import first_line, record, saved_bytes
from .shapes import MODEL_SIZES

PEERS = ("peft_prefix", "adapters_unipelt", "adapters_unipelt_mixed")
# this package's configuration row -> the peer row that runs the same configuration
LIKE_FOR_LIKE = {"as_peft_prefix": "peft_prefix", "as_adapters_unipelt": "adapters_unipelt"}
PEFT_PREFIX_LEN = 16


MIXED = "_mixed"  # a mixed-task batch: min(16, B) tasks in contiguous blocks of examples
MAX_MIXED_TASKS = 16


def _rows() -> tuple[tuple[str, str, str], ...]:
    rows = [("full_ft", "train", "full"), ("frozen_base", "infer", "full")]
    for cfg in ("unipelt", *LIKE_FOR_LIKE, "as_adapters_unipelt" + MIXED):
        for backend in ("eager", "fused"):
            rows += [(f"{cfg}_{backend}", mode, f"{cfg}:{backend}") for mode in ("train", "infer")]
        peer = LIKE_FOR_LIKE.get(cfg.removesuffix(MIXED))
        if peer:  # adapters' mixed batch: BatchSplit over one adapter per task
            peer += MIXED if cfg.endswith(MIXED) else ""
            rows += [(peer, mode, peer) for mode in ("train", "infer")]
    return tuple(rows)


def mixed_tasks(batch: int) -> list[int]:
    """Examples per task of a mixed batch (contiguous blocks, as BatchSplit needs)."""
    T = min(MAX_MIXED_TASKS, batch)
    return [batch // T + (1 if i < batch % T else 0) for i in range(T)]


# (row name, what is timed, how the model is adapted)
MODEL_ROWS = _rows()

# adapters 1.3's ``UniPELTConfig().to_dict()`` (the keys that matter; a test in the adapters
# venv checks it against the library), so the like-for-like row runs without the library.
ADAPTERS_UNIPELT = {
    "architecture": "union",
    "configs": [
        {"architecture": "prefix_tuning", "prefix_length": 10, "bottleneck_size": 512,
         "non_linearity": "tanh", "flat": False, "use_gating": True, "shared_gating": True,
         "leave_out": []},
        {"architecture": None, "mh_adapter": False, "output_adapter": True,
         "reduction_factor": 16, "non_linearity": "relu", "original_ln_before": True,
         "original_ln_after": True, "residual_before_ln": True, "is_parallel": False,
         "scaling": 1.0, "use_gating": True, "leave_out": []},
        {"architecture": "lora", "selfattn_lora": True, "r": 8, "alpha": 2,
         "attn_matrices": ["q", "v"], "use_gating": True, "leave_out": []},
    ],
}  # fmt: skip


def unipelt_config():
    """The UniPELT configuration the ``unipelt_*`` rows use (BitFit + gated adapter + gated
    prefix)."""
    import unipelt_fast

    return unipelt_fast.UniPELTConfig(
        bitfit=True, adapter=True, prefix=True, lora=False, prompt=False, gate_mode="mean"
    )


def config_for(cfg: str, model, batch: int = 1):
    """This package's configuration for row family ``cfg`` on ``model`` (``batch``: the
    batch size, which sets the task count of a mixed-task row)."""
    import unipelt_fast
    from unipelt_fast.interop import adapters_config

    if cfg == "unipelt":
        return unipelt_config()
    if cfg == "as_adapters_unipelt":
        return adapters_config(ADAPTERS_UNIPELT, model)
    if cfg == "as_peft_prefix":  # peft's PrefixTuningConfig defaults: flat, ungated
        if model.config.is_encoder_decoder:
            raise NotImplementedError(
                "peft prefixes only the decoder self-attention of an encoder-decoder; this "
                "package prefixes every attention site (no per-site selection), so there is "
                "no like-for-like row"
            )
        return unipelt_fast.UniPELTConfig(
            bitfit=False, adapter=False, lora=False, prompt=False,
            prefix=unipelt_fast.PrefixConfig(
                length=PEFT_PREFIX_LEN, reparam=False, gate=False, positions="after_prefix"
            ),
        )  # fmt: skip
    if cfg.endswith(MIXED):
        import dataclasses

        base = config_for(cfg.removesuffix(MIXED), model)
        T = len(mixed_tasks(batch))
        return dataclasses.replace(base, tasks=tuple(f"task{i}" for i in range(T)))
    raise ValueError(f"unknown configuration {cfg!r}")


# --base-quant values: bitsandbytes 4-bit NF4 / 8-bit (LLM.int8) through transformers'
# BitsAndBytesConfig, torchao int8 weight-only. Both libraries also run on CPU.
BASE_QUANTS = ("bnb_nf4", "bnb_int8", "torchao_int8")


def quantize_base(model, base_quant: str, device: torch.device, dtype: torch.dtype):
    """``model`` with its linear weights quantized by ``base_quant`` (one of
    :data:`BASE_QUANTS`). bitsandbytes quantizes while loading: the model is saved to a
    temporary folder and loaded back with ``quantization_config``, as a checkpoint would be;
    torchao quantizes in place. Raises ImportError when the library is not installed."""
    if base_quant == "torchao_int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
        return model
    if base_quant not in BASE_QUANTS:
        raise ValueError(f"unknown base quantization {base_quant!r}; choose from {BASE_QUANTS}")
    import importlib.util
    import tempfile
    import warnings

    import transformers

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{base_quant} needs bitsandbytes (pip install 'unipelt-fast[quant]')")
    if base_quant == "bnb_nf4":
        q = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    else:
        q = transformers.BitsAndBytesConfig(load_in_8bit=True)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # the bench prints its own progress
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bitsandbytes' notes on casting and CPU support
            model.save_pretrained(tmp)
            return type(model).from_pretrained(
                tmp, quantization_config=q, device_map={"": str(device)}, dtype=dtype
            )
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def quant_library_version(base_quant: str | None) -> str | None:
    """The installed version of the library behind ``base_quant`` (None: dense, or absent)."""
    from importlib.metadata import PackageNotFoundError, version

    if base_quant is None:
        return None
    try:
        return version("torchao" if base_quant.startswith("torchao") else "bitsandbytes")
    except PackageNotFoundError:
        return None


def base_bytes(model) -> int:
    """Bytes of the model's parameters as stored: quantized weights with their scales (the
    count ``trainable_report`` gives), each shared parameter once."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += _nbytes(p)
    return n


def build_model(
    name: str, tiny: bool, device: torch.device, dtype: torch.dtype, base_quant: str | None = None
):
    """A freshly initialised model (its base quantized by ``base_quant``, see
    :func:`quantize_base`) and one batch of inputs (with labels)."""
    import transformers

    size = MODEL_SIZES[name]["tiny" if tiny else "full"]
    B, L = size["batch"], size["seq_len"]
    g = torch.Generator().manual_seed(0)
    vocab = size["config"]["vocab_size"]
    ids = torch.randint(0, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if name == "bart-base":
        cfg = transformers.BartConfig(**size["config"])
        cls = transformers.BartForConditionalGeneration
        mask[1::2, L - L // 8 :] = 0  # padded sources
        labels = torch.randint(0, vocab, (B, size["target_len"]), generator=g)
        start = cfg.decoder_start_token_id
        dec_in = torch.cat([torch.full((B, 1), start), labels[:, :-1]], dim=1)
        extra = {"decoder_input_ids": dec_in, "use_cache": False}  # inference decodes it too
    elif name == "bert-base":
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
    if base_quant is not None:
        model = quantize_base(model, base_quant, device, dtype)
    batch = {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
        **{k: v.to(device) if torch.is_tensor(v) else v for k, v in extra.items()},
    }
    if name == "bart-base":
        shape = (
            f"B={B} L={L}->{size['target_len']} hidden={cfg.d_model} "
            f"layers={cfg.encoder_layers}+{cfg.decoder_layers}"
        )
    else:
        shape = f"B={B} L={L} hidden={cfg.hidden_size} layers={cfg.num_hidden_layers}"
    return model, batch, shape


def adapt(model, how: str, device: torch.device, batch: int = 1):
    """Apply the row's method in place; returns the model. Raises with the reason if the
    method is not available here."""
    if how == "full":
        return model
    if ":" in how:
        import unipelt_fast

        cfg, backend = how.split(":")
        if backend == "fused":
            if device.type != "cuda":
                raise RuntimeError("the fused backend at model level needs a CUDA GPU")
            backend = "triton"
        return unipelt_fast.apply_unipelt(model, config_for(cfg, model, batch), backend=backend)
    if how == "peft_prefix":
        import peft  # noqa: F401 - ImportError is the reason the row is skipped

        name = type(model).__name__
        task = (
            "SEQ_CLS" if "Sequence" in name
            else "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder
            else "CAUSAL_LM"
        )  # fmt: skip
        cfg = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=PEFT_PREFIX_LEN)
        return peft.get_peft_model(model, cfg)
    if how == "adapters_unipelt":
        import adapters

        adapters.init(model)
        model.add_adapter("unipelt", config=adapters.UniPELTConfig())
        model.train_adapter("unipelt")
        return model
    if how == "adapters_unipelt" + MIXED:
        import adapters
        from adapters.composition import BatchSplit

        adapters.init(model)
        sizes = mixed_tasks(batch)
        names = [f"task{i}" for i in range(len(sizes))]
        for n in names:
            model.add_adapter(n, config=adapters.UniPELTConfig())
        model.train_adapter(BatchSplit(*names, batch_sizes=sizes))
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
    name: str,
    how: str,
    mode: str,
    tiny: bool,
    device,
    dtype,
    info: dict | None = None,
    base_quant: str | None = None,
) -> tuple:
    """A warmed-up zero-argument callable (a train step or an inference forward) for one
    model row, plus its info (shape, params, the base's bytes as stored, trainable params,
    saved bytes for train), filled into ``info`` as it goes. ``base_quant``: quantize the
    base first (:data:`BASE_QUANTS`). Raises with the reason when the row cannot run here."""
    if base_quant is not None and how == "full" and mode == "train":
        raise RuntimeError(f"full fine-tuning cannot train a quantized ({base_quant}) base")
    model, batch, shape = build_model(name, tiny, device, dtype, base_quant)
    info = {} if info is None else info
    info.update(
        shape=shape,
        params=sum(_numel(p) for p in model.parameters()),
        base_quant=base_quant,
        base_bytes=base_bytes(model),
    )
    B = batch["input_ids"].shape[0]
    model = adapt(model, how, device, B)
    if MIXED in how:
        sizes = mixed_tasks(B)
        info["tasks"] = len(sizes)
        if ":" in how:  # this package: each example's task id (BatchSplit needs none)
            ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
            batch["task_ids"] = ids.to(device)
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
    name: str,
    row: str,
    mode: str,
    how: str,
    tiny: bool,
    device,
    dtype,
    timer,
    base_quant: str | None = None,
) -> dict:
    """One model-level row: median ms of a train step / inference forward, peak memory,
    the base's bytes as stored (``base_quant``: quantized first, :data:`BASE_QUANTS`)."""
    res: dict = {"impl": row, "pass": mode}
    fn = None
    try:
        fn, _ = prepare(name, how, mode, tiny, device, dtype, info=res, base_quant=base_quant)
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
    """Train time / full fine-tuning and inference time / frozen base for every adapted row
    (the UniPELT paper reports 55-67% and 118-127%), and, like for like, each peer's time /
    this package's on the same configuration (``<row>_<pass>_speedup_vs_<peer>``)."""
    t = {(r["impl"], r["pass"]): r.get("time_ms") for r in rows if r.get("available")}
    out = {}
    impls = dict.fromkeys(i for i, _, _ in MODEL_ROWS if i not in ("full_ft", "frozen_base"))
    for impl in impls:
        if t.get((impl, "train")) and t.get(("full_ft", "train")):
            out[f"{impl}_train_frac_of_full_ft"] = t[(impl, "train")] / t[("full_ft", "train")]
        if t.get((impl, "infer")) and t.get(("frozen_base", "infer")):
            out[f"{impl}_infer_frac_of_frozen"] = t[(impl, "infer")] / t[("frozen_base", "infer")]
        cfg = impl.rsplit("_", 1)[0] if impl not in PEERS else impl
        mixed = cfg.endswith(MIXED)
        peer = LIKE_FOR_LIKE.get(cfg.removesuffix(MIXED))
        peer = peer and peer + (MIXED if mixed else "")
        single = impl.replace(MIXED, "") if mixed else None
        for mode in ("train", "infer"):
            if peer and t.get((impl, mode)) and t.get((peer, mode)):
                out[f"{impl}_{mode}_speedup_vs_{peer}"] = t[(peer, mode)] / t[(impl, mode)]
            if single and t.get((impl, mode)) and t.get((single, mode)):
                out[f"{impl}_{mode}_mix_cost"] = t[(impl, mode)] / t[(single, mode)]
    return out
