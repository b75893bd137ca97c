#!/usr/bin/env bash
# The test command (README): on a fresh machine it makes .venv, installs CPU torch, the
# package with [test], then runs pytest with the Triton kernels under the interpreter.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_gated_adapter.py -x`.
# Without arguments it then runs the adapters-library tests in a second venv (below).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
uf_venv test
MAIN_VENV=$VENV

export TRITON_INTERPRET=1   # Triton kernels run on CPU tensors (numpy interpreter)
export UNIPELT_NAN_FILL=1   # kernel outputs start as NaN: unwritten elements fail parity
export PYTHONDONTWRITEBYTECODE=1
rc=0
"$MAIN_VENV/bin/python" -m pytest -q "$@" || rc=$?

# ---- second venv: the adapters library (interop, issue 15) ------------------------------
# adapters 1.3 pins transformers ~=4.57.6, so its tests get their own venv with the same CPU
# torch, transformers 4.57.6, adapters 1.3.0, peft and this package; it also runs the HF
# model tests on transformers 4.57 (the oldest supported), BERT's copy/pickle tests
# included (its 4.x attention is a replaced forward, hf/inject.py). Runs when no pytest
# arguments were given, or with UNIPELT_ADAPTERS_TESTS=1; UNIPELT_ADAPTERS_TESTS=0 skips
# it. Both pytest exit statuses decide this script's.
if [ "${UNIPELT_ADAPTERS_TESTS:-$([ $# -eq 0 ] && echo 1 || echo 0)}" = 1 ]; then
  UNIPELT_VENV=${UNIPELT_ADAPTERS_VENV:-.venv-adapters} \
    uf_venv test "adapters==1.3.0" "transformers==4.57.6" "peft==0.21.0"
  arc=0
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_interop_adapters.py tests/test_interop_peft.py tests/test_hf_placements.py \
    tests/test_hf_models.py tests/test_hf_checkpoint.py tests/test_hf_ddp.py \
    "tests/test_hf_copy.py::test_deepcopy_is_the_same_model[bert-block_output-prompt]" \
    "tests/test_hf_copy.py::test_whole_model_pickle_round_trips[bert-block_output-prompt]" \
    || arc=$?
  [ "$rc" -ne 0 ] || rc=$arc
fi
exit "$rc"
