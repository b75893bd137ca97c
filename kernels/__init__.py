"""Triton kernels, installed as ``unipelt_fast.kernels`` (never as a top-level ``kernels``).

One file per op (``prefix_attention.py``, ``gated_adapter.py``, ``bias_only_linear.py``),
each holding its ``@triton.jit`` kernels and the ``forward``/``backward`` launchers whose
calling convention is documented in ``unipelt_fast/ops.py``.
"""
