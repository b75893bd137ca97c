#!/usr/bin/env bash
# The test command (README): on a fresh machine it makes .venv, installs CPU torch, the
# package with [test], then runs pytest with the Triton kernels under the interpreter.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_gated_adapter.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
uf_venv test

export TRITON_INTERPRET=1   # Triton kernels run on CPU tensors (numpy interpreter)
export UNIPELT_NAN_FILL=1   # kernel outputs start as NaN: unwritten elements fail parity
export PYTHONDONTWRITEBYTECODE=1
exec "$VENV/bin/python" -m pytest -q "$@"
