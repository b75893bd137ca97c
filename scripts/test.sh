#!/usr/bin/env bash
# The test command (README): on a fresh machine it makes .venv, installs CPU torch, the
# package with [test], then runs pytest with the Triton kernels under the interpreter.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_gated_adapter.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${UNIPELT_VENV:-.venv}
# The CPU wheel that lies on CI's disk. Never a bare `torch` here: that pulls a CUDA build
# of several GB. Set UNIPELT_TORCH_SPEC="" to keep whatever torch the venv already has.
TORCH_SPEC=${UNIPELT_TORCH_SPEC-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ -n "$TORCH_SPEC" ]; then
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"

export TRITON_INTERPRET=1   # Triton kernels run on CPU tensors (numpy interpreter)
export UNIPELT_NAN_FILL=1   # kernel outputs start as NaN: unwritten elements fail parity
export PYTHONDONTWRITEBYTECODE=1
exec "$VENV/bin/python" -m pytest -q "$@"
