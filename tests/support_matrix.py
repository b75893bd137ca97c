"""The support matrix, family x method: the README's support table is generated from it
(scripts/support_table.py), and tests/test_support_table.py holds it to the tests.

Each cell is one of:

* :class:`Exact`: a named test compares this method on this family with an independent
  formulation (the oracle). The support-table test checks the test exists and that its
  parametrization includes this family (and method, where it is parametrized by method).
* :class:`Refused`: ``apply_unipelt`` or the first forward raises ``NotImplementedError``
  saying why; the support-table test runs it and matches ``match`` in the message.
* :class:`NotApplicable`: the method has nothing to act on (BitFit on a model without biases).
* :class:`Untested`: accepted, but no test checks it against an oracle yet. Stated, so the
  table never claims more than the tests show.

Change a cell only together with the test that backs it."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("prefix", "adapter", "lora", "bitfit", "prompt", "gates")
METHOD_TITLES = {
    "prefix": "Prefix",
    "adapter": "Adapter",
    "lora": "LoRA",
    "bitfit": "BitFit",
    "prompt": "Prompt",
    "gates": "Gates",
}


@dataclass(frozen=True)
class Exact:
    oracle: str  # what the result is compared with, in a few words
    test: str  # "tests/test_file.py::test_name"
    param: str | None = "kind"  # the test's family parameter (None: the test is one family's)
    method_param: str | None = None  # the test's method parameter, if it has one
    method_value: str | None = None  # its value for this column (default: the column name)
    note: str = ""

    def text(self) -> str:
        return f"exact ({self.oracle})" + (f"; {self.note}" if self.note else "")


@dataclass(frozen=True)
class Refused:
    reason: str  # shown in the table
    match: str  # a regex the NotImplementedError's message must match

    def text(self) -> str:
        return f"refused: {self.reason}"


@dataclass(frozen=True)
class NotApplicable:
    reason: str

    def text(self) -> str:
        return f"n/a: {self.reason}"


@dataclass(frozen=True)
class Untested:
    note: str = ""

    def text(self) -> str:
        return "untested" + (f" ({self.note})" if self.note else "")


# family key (tests/hf_families.py) -> its name in the table
FAMILIES = {
    "bert": "BERT",
    "roberta": "RoBERTa",
    "gpt2": "GPT-2",
    "llama": "LLaMA",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
    "olmo": "OLMo",
    "olmo2": "OLMo2",
    "granite": "Granite",
    "stablelm": "StableLM",
    "smollm3": "SmolLM3",
    "mixtral": "Mixtral",
    "qwen3_moe": "Qwen3-MoE",
    "gpt_oss": "gpt-oss",
    "phi3": "Phi-3",
    "gpt_neox": "GPT-NeoX",
    "falcon": "Falcon",
    "opt": "OPT",
    "cohere": "Cohere",
    "gptj": "GPT-J",
    "distilbert": "DistilBERT",
    "deberta_v2": "DeBERTa-v2",
    "modernbert": "ModernBERT",
    "bart": "BART",
    "t5": "T5",
}

_PEFT = "tests/test_interop_peft.py::test_from_peft_matches_peft"
_HF_CACHE = "tests/test_hf_models.py::test_prefix_equals_hf_cache_reference"
_HF_CACHE_MORE = "tests/test_attention_contract.py::test_prefix_equals_hf_cache_reference"
_PLACEMENT = "tests/test_hf_placements.py::test_placement_matches_formula"
_PLACEMENT_MORE = "tests/test_hf_moe.py::test_adapter_on_block_matches_formula"
_PLACEMENT_ENCDEC = "tests/test_hf_encdec.py::test_adapter_placement_matches_formula"
_PEFT_ENCDEC = "tests/test_hf_encdec.py::test_lora_and_prompt_match_peft"
_LORA_MORE = "tests/test_hf_families.py::test_lora_and_prompt_match_formula"
_BITFIT = "tests/test_hf_families.py::test_bitfit_matches_base_with_the_biases"
_PROMPT_MORE = _LORA_MORE  # one model build for both

_ENCODER_PREFIX = "tests/test_attention_contract.py::test_encoder_prefix_equals_explicit_concat"
_NO_BIAS = NotApplicable("no biases")
_SANDWICH = "ffn_output and attn_and_ffn_output only (post-FFN norm)"


def _row(**cells) -> dict:
    missing = set(METHODS) - set(cells)
    assert not missing, missing
    return cells


def _decoder(prefix, adapter, *, bitfit=_NO_BIAS, lora_note: str = "") -> dict:
    """A decoder (or encoder) whose LoRA, prompt and gate cells come from
    tests/test_hf_families.py."""
    return _row(
        prefix=prefix,
        adapter=adapter,
        lora=Exact("formula", _LORA_MORE, note=lora_note),
        bitfit=bitfit,
        prompt=Exact("explicit embeddings", _PROMPT_MORE),
        gates=Exact("formula", _LORA_MORE),  # the LoRA and prompt gates
    )


_ADAPTER_MORE = Exact("formula", _PLACEMENT_MORE)
_BITFIT_EXACT = Exact("base + biases", _BITFIT)
_GRANITE = "block_output and ffn_parallel need residual_multiplier 1"
_ADAPTER_SANDWICH = Exact("formula", _PLACEMENT_MORE, note=_SANDWICH)
_PREFIX_MORE = Exact("HF cache", _HF_CACHE_MORE)
_FUSED = "q/v columns of the fused projection"
_PARALLEL = "parallel attention/FFN block (placements: docs/hf.md)"
_ADAPTER_PARALLEL = Exact("formula", _PLACEMENT_MORE, note=_PARALLEL)
# Sliding windows: tests/test_attention_contract.py::test_windowed_prefix_equals_hf_cache_reference
# (its WINDOWED families; tests/test_support_table.py holds the notes to it).
WINDOW_NOTE = "sliding window too"
_PREFIX_WINDOWED = Exact("HF cache", _HF_CACHE_MORE, note=WINDOW_NOTE)

MATRIX: dict[str, dict] = {
    **{
        kind: _row(
            prefix=Exact("HF cache", _HF_CACHE),
            adapter=Exact("formula", _PLACEMENT),
            lora=Exact("peft", _PEFT, method_param="method"),
            bitfit=_BITFIT_EXACT,
            prompt=Exact("peft", _PEFT, method_param="method"),
            gates=Exact("formula", _PLACEMENT),  # the adapter gates
        )
        for kind in ("bert", "roberta", "gpt2")
    },
    "llama": _row(
        prefix=Exact("HF cache", _HF_CACHE),
        adapter=Exact("formula", _PLACEMENT),
        lora=Exact("peft", _PEFT, method_param="method"),
        bitfit=_NO_BIAS,
        prompt=Exact("peft", _PEFT, method_param="method"),
        gates=Exact("formula", _PLACEMENT),
    ),
    "mistral": _decoder(Exact("HF cache", _HF_CACHE, note=WINDOW_NOTE), _ADAPTER_MORE),
    "qwen2": _decoder(
        Exact("HF cache", _HF_CACHE, note=WINDOW_NOTE), _ADAPTER_MORE, bitfit=_BITFIT_EXACT
    ),
    "qwen3": _decoder(_PREFIX_MORE, _ADAPTER_MORE),
    "gemma": _decoder(_PREFIX_MORE, _ADAPTER_MORE),
    "gemma2": _decoder(_PREFIX_WINDOWED, _ADAPTER_SANDWICH),  # soft-capping on
    "gemma3_text": _decoder(_PREFIX_WINDOWED, _ADAPTER_SANDWICH),
    "olmo": _decoder(_PREFIX_MORE, _ADAPTER_MORE),
    "olmo2": _decoder(_PREFIX_MORE, _ADAPTER_SANDWICH),
    "granite": _decoder(_PREFIX_MORE, Exact("formula", _PLACEMENT_MORE, note=_GRANITE)),
    "stablelm": _decoder(_PREFIX_MORE, _ADAPTER_MORE, bitfit=_BITFIT_EXACT),
    "smollm3": _decoder(_PREFIX_MORE, _ADAPTER_MORE),
    "mixtral": _decoder(_PREFIX_MORE, _ADAPTER_MORE),
    "qwen3_moe": _decoder(_PREFIX_MORE, _ADAPTER_MORE),
    "gpt_oss": _decoder(
        _PREFIX_WINDOWED,  # attention sinks on
        _ADAPTER_MORE,
        bitfit=Untested("expert and router biases are not trained"),
    ),
    "phi3": _decoder(_PREFIX_MORE, _ADAPTER_MORE, lora_note=_FUSED),
    "gpt_neox": _decoder(
        _PREFIX_MORE, _ADAPTER_PARALLEL, bitfit=_BITFIT_EXACT, lora_note=_FUSED + " (per head)"
    ),
    "falcon": _decoder(
        Exact("HF cache", _HF_CACHE_MORE, note="refused with alibi=True"),
        _ADAPTER_PARALLEL,
        bitfit=_BITFIT_EXACT,
        lora_note=_FUSED,
    ),
    "opt": _decoder(_PREFIX_MORE, _ADAPTER_MORE, bitfit=_BITFIT_EXACT),
    "cohere": _decoder(_PREFIX_MORE, _ADAPTER_PARALLEL),
    "gptj": _decoder(_PREFIX_MORE, _ADAPTER_PARALLEL, bitfit=_BITFIT_EXACT),
    "distilbert": _decoder(
        Exact("explicit concat + SDPA", _ENCODER_PREFIX), _ADAPTER_MORE, bitfit=_BITFIT_EXACT
    ),
    "deberta_v2": _decoder(
        Refused(
            "disentangled attention (computes its own scores)",
            "disentangled attention computes its scores itself",
        ),
        _ADAPTER_MORE,
        bitfit=_BITFIT_EXACT,
    ),
    "modernbert": _decoder(
        Exact(
            "explicit concat + SDPA",
            _ENCODER_PREFIX,
            note="local layers: sequences within the window (longer: refused)",
        ),
        _ADAPTER_MORE,
        bitfit=_BITFIT_EXACT,
        lora_note=_FUSED,
    ),
    "bart": _row(
        prefix=Exact(
            "explicit concat + SDPA",
            "tests/test_hf_encdec.py::test_prefix_semantics_match_explicit_concat",
            param=None,
        ),
        adapter=Exact("formula", _PLACEMENT_ENCDEC),
        lora=Exact("peft", _PEFT_ENCDEC, method_param="method"),
        bitfit=_BITFIT_EXACT,
        prompt=Exact("peft", _PEFT_ENCDEC, method_param="method"),
        gates=Exact("formula", _PLACEMENT_ENCDEC),
    ),
    "t5": _row(
        prefix=Exact(
            "explicit concat + SDPA",
            "tests/test_hf_encdec.py::test_t5_prefix_semantics_with_relative_position_bias",
            param=None,
        ),
        adapter=Exact("formula", _PLACEMENT_ENCDEC),
        lora=Exact("peft", _PEFT_ENCDEC, method_param="method"),
        bitfit=_NO_BIAS,
        prompt=Exact("peft", _PEFT_ENCDEC, method_param="method"),
        gates=Exact("formula", _PLACEMENT_ENCDEC),
    ),
}

# The UniPELTConfig fields that turn on only one column's method (for the refusal checks).
METHOD_CONFIGS = {
    "prefix": dict(prefix=True, adapter=False, lora=False, bitfit=False),
    "adapter": dict(prefix=False, adapter=True, lora=False, bitfit=False),
    "lora": dict(prefix=False, adapter=False, lora=True, bitfit=False),
    "bitfit": dict(prefix=False, adapter=False, lora=False, bitfit=True),
    "prompt": dict(prefix=False, adapter=False, lora=False, bitfit=False, prompt=True),
    "gates": dict(prefix=True, adapter=True, lora=True, bitfit=False),
}
