"""One argument record per op: its validated arguments, carried to every backend.

Validation (``_validation.validate_<op>``) builds the record; the op (``ops/<op>.py``) hands
it, canonicalised for the kernels, to a backend's ``forward(args)`` and ``backward(args,
...)``, and passes its fields by name to the eager reference and the torch composite. A
``torch.library`` custom op cannot take a NamedTuple, so its schema is derived from the
fields here (:func:`op_schema`) and the record is rebuilt inside the op (:func:`unflatten`).

Adding a flag to an op: a field here (with a default), its check in validation, the public
function's keyword, and the reference and the kernels that implement it (docs/ops.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

Tensor = torch.Tensor


class PrefixAttentionArgs(NamedTuple):
    """Arguments of ``prefix_attention``. For the kernels (see docs/ops.md): prefix_k/v
    (T, Hkv, P, D) with an int64 (B,) prefix_index, prefix_gate None or float32 (B, 2),
    attn_bias a (B, H, Lq, P + Lk) view, softmax_scale a float, seed drawn when dropout_p > 0,
    sinks None or a dense float32 (H,)."""

    q: Tensor
    k: Tensor
    v: Tensor
    prefix_k: Tensor
    prefix_v: Tensor
    prefix_index: Tensor | None = None
    prefix_gate: Tensor | None = None
    key_padding_mask: Tensor | None = None
    causal: bool = False
    softmax_scale: float | None = None
    attn_bias: Tensor | None = None
    dropout_p: float = 0.0
    # The int64 (1,) dropout seed of a kernel call (ops.dropout_seed); None elsewhere.
    seed: Tensor | None = None
    # Logit soft-capping cap * tanh(logit / cap) (Gemma 2); None = off.
    softcap: float | None = None
    # (H,) attention-sink logits (gpt-oss): in the softmax denominator only; None = off.
    sinks: Tensor | None = None
    # Sliding window over token keys (bottom-right aligned): None = off.
    window: int | None = None


class GatedAdapterArgs(NamedTuple):
    """Arguments of ``gated_adapter``. For the kernels: x and residual (B, L, d), gate_mode
    "token" when there is no gate, adapter_index None or int64 (B,), scaling a float.
    In backward, residual is None when it was x, else an empty placeholder (not kept)."""

    x: Tensor
    w_down: Tensor
    b_down: Tensor | None
    w_up: Tensor
    b_up: Tensor | None
    residual: Tensor | None = None
    w_gate: Tensor | None = None
    b_gate: Tensor | None = None
    gate_mode: str = "token"
    gate_mask: Tensor | None = None
    activation: str = "relu"
    scaling: float = 1.0
    adapter_index: Tensor | None = None


class BiasOnlyLinearArgs(NamedTuple):
    """Arguments of ``bias_only_linear``. For the kernels: x (M, K) and an activation name
    ("identity" for none). In backward, x is an empty placeholder (x is never saved)."""

    x: Tensor
    weight: Tensor
    bias: Tensor
    activation: str | None = None


class BiasOnlyLayerNormArgs(NamedTuple):
    """Arguments of ``bias_only_layer_norm``. For the kernels: x (M, N), eps a float."""

    x: Tensor
    weight: Tensor
    bias: Tensor
    eps: float = 1e-5


# Field annotation (as written) -> torch.library schema type.
_SCHEMA_TYPE = {
    "Tensor": "Tensor",
    "Tensor | None": "Tensor?",
    "bool": "bool",
    "float": "float",
    "float | None": "float?",
    "int": "int",
    "int | None": "int?",
    "str": "str",
    "str | None": "str?",
}


def op_schema(
    record: type[NamedTuple],
    returns: int,
    *,
    before: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
) -> str:
    """The schema of a custom op taking ``(*before, *record fields, *after, backend)`` and
    returning ``returns`` tensors; ``before``/``after`` name extra tensor arguments (the
    backward's incoming gradient and saved outputs)."""
    hints = record.__annotations__
    # NamedTuple keeps a string annotation as a ForwardRef (this module defers annotations).
    text = {n: getattr(h, "__forward_arg__", h) for n, h in hints.items()}
    args = [f"Tensor {n}" for n in before]
    args += [f"{_SCHEMA_TYPE[text[n]]} {n}" for n in record._fields]
    args += [f"Tensor {n}" for n in after]
    args.append("str backend")
    return f"({', '.join(args)}) -> ({', '.join(['Tensor'] * returns)})"


def flatten(args: NamedTuple, backend: str, *, before: tuple = (), after: tuple = ()) -> tuple:
    """The positional arguments of a custom op with :func:`op_schema`'s schema."""
    return (*before, *args, *after, backend)


def unflatten(
    record: type[NamedTuple], flat: tuple, n_before: int = 0
) -> tuple[tuple, NamedTuple, tuple, str]:
    """(before, record, after, backend) back from a custom op's positional arguments."""
    n = len(record._fields)
    fields = flat[n_before : n_before + n]
    return flat[:n_before], record(*fields), tuple(flat[n_before + n : -1]), flat[-1]


def grads(args: NamedTuple, **by_field: Tensor | None) -> tuple[Tensor | None, ...]:
    """One gradient per record field (None where not named), plus None for the backend:
    what a custom op's registered backward returns."""
    unknown = set(by_field) - set(args._fields)
    if unknown:
        raise KeyError(f"not fields of {type(args).__name__}: {sorted(unknown)}")
    return (*(by_field.get(n) for n in args._fields), None)
