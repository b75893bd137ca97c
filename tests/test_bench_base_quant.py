"""The bench's model rows on a quantized base (``--base-quant``): the base's bytes as stored.

torchao int8 weight-only runs on CPU and is cheap; bitsandbytes goes through the same
``quantize_base`` and is checked by tests/test_quantized.py's loading path.
"""

from __future__ import annotations

import pytest
import torch

from unipelt_fast.bench import models, report
from unipelt_fast.cli import main

NAME = "bert-base"  # the tiny (--quick) stand-in
CPU = torch.device("cpu")


def _once(fn):
    fn()
    return 1.0  # a timer stub: these tests check bytes, never a speed


def _row(impl: str, mode: str, how: str, base_quant: str | None) -> dict:
    r = models.run_model_row(NAME, impl, mode, how, True, CPU, torch.float32, _once, base_quant)
    assert r["available"], r.get("reason")
    return r


def test_torchao_int8_base_is_reported_smaller_than_the_dense_base():
    pytest.importorskip("torchao")
    dense, _, _ = models.build_model(NAME, True, CPU, torch.float32)
    params = {id(p): p for p in dense.parameters()}.values()
    dense_bytes = sum(p.numel() * p.element_size() for p in params)
    linear = sum(m.weight.numel() for m in dense.modules() if isinstance(m, torch.nn.Linear))
    assert dense_bytes == sum(p.numel() * 4 for p in params)  # float32 throughout

    assert _row("frozen_base", "infer", "full", None)["base_bytes"] == dense_bytes
    frozen = _row("frozen_base", "infer", "full", "torchao_int8")
    # int8 saves 3 of each linear weight's 4 bytes; its per-row scales cost far less than 1
    assert frozen["base_bytes"] < dense_bytes - 2 * linear, (frozen["base_bytes"], dense_bytes)
    assert frozen["base_quant"] == "torchao_int8"
    assert frozen["params"] == sum(p.numel() for p in params)  # logical count, as dense
    tuned = _row("unipelt_eager", "train", "unipelt:eager", "torchao_int8")
    assert tuned["base_bytes"] == frozen["base_bytes"] and tuned["trainable_params"] > 0
    table = report.model_table([{**r, "kind": "model", "op": NAME, "dtype": "float32"}
                                for r in (frozen, tuned)])  # fmt: skip
    head, rows = table[0], table[1:]
    base, mib = head.index("base"), head.index("base MiB")
    assert [r[base] for r in rows] == ["torchao_int8"] * 2
    assert rows[0][mib] == f"{frozen['base_bytes'] / 2**20:.2f}"


def test_full_fine_tuning_of_a_quantized_base_is_unavailable_with_the_reason():
    r = models.run_model_row(NAME, "full_ft", "train", "full", True, CPU, torch.float32, _once,
                             "torchao_int8")  # fmt: skip
    assert not r["available"] and "cannot train a quantized" in r["reason"]


def test_base_quant_needs_model_rows(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--quick", "--ops", "gated_adapter", "--base-quant", "torchao_int8"])
    assert "--base-quant: applies to the model rows" in capsys.readouterr().err
