"""Benchmarks behind ``unipelt-fast bench`` and the pytest-benchmark suites in ``benchmarks/``.

shapes.py   the shape lists (shared by the CLI and ``benchmarks/bench_*.py``)
runners.py  inputs, the callables for each backend and peer, timing and memory measurement
floors.py   minimal bytes / FLOPs per op, and the measured bandwidth / matmul peak
models.py   the model-level run (BERT-base-like encoder, LLaMA-style decoder, BART-base)
report.py   the table, JSON, CSV, markdown and plots
"""

OPS = (
    "prefix_attention",
    "gated_adapter",
    "gated_adapter_mixed",
    "bias_only_linear",
    "bias_only_layer_norm",
)
MODELS = ("bert-base", "llama-1b-like", "bart-base")
