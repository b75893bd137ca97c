#!/usr/bin/env bash
# The GPU suite, in one go (fits one 10-minute device call on an H100):
#   1. the gpu-marked tests (every backend, every dtype)      -> OUTDIR/gpu_tests.log
#   2. unipelt-fast bench for every op (bf16, GPU shapes)       -> OUTDIR/ops.{json,csv,md}
#   3. unipelt-fast bench for every model (bert, llama, bart)    -> OUTDIR/models.{json,csv,md}
#   4. the torch.compile rows of every op (slow to compile,     -> OUTDIR/compile.{json,csv,md}
#      so they come last, with whatever time is left)
#   5. one combined table with device, versions and commit      -> OUTDIR/results.md
#      and the PNGs                                             -> OUTDIR/plots/
# Usage: bash benchmarks/gpu_suite.sh OUTDIR
# Each phase has a time cap (the whole run stays under UNIPELT_SUITE_BUDGET_S, default
# 570 s); a phase cut short still leaves the rows it finished (the CLI writes its JSON/CSV
# after every op task and every model row). See benchmarks/README.md for committing results.
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
BUDGET=${UNIPELT_SUITE_BUDGET_S:-570}
TESTS_CAP=${UNIPELT_SUITE_TESTS_S:-210}
MODELS_RESERVE=${UNIPELT_SUITE_MODELS_S:-130}
DTYPE=${UNIPELT_SUITE_DTYPE:-bf16}
# UNIPELT_SUITE_ARGS: extra bench options, e.g. "--quick" for a dry run of the script.
read -r -a EXTRA <<<"${UNIPELT_SUITE_ARGS:-}"
BENCH=("$PY" -m unipelt_fast.cli bench "${EXTRA[@]}")

left() { echo $((BUDGET - SECONDS)); }
cap() { local want=$1 l; l=$(left); ((want < l)) && echo "$want" || echo "$((l > 5 ? l : 5))"; }

if [ "${UNIPELT_SUITE_ALLOW_CPU:-0}" != 1 ] &&
  ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_suite.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False)" >&2
  exit 2
fi
unset TRITON_INTERPRET  # real kernels, never the interpreter

echo "== 1/5 gpu tests (cap $(cap "$TESTS_CAP") s)"
UNIPELT_NAN_FILL=1 timeout "$(cap "$TESTS_CAP")" "$PY" -m pytest -m gpu tests/ -q -rs -p no:cacheprovider \
  >"$OUT/gpu_tests.log" 2>&1
tests_rc=$?
tail -n 3 "$OUT/gpu_tests.log"
unset UNIPELT_NAN_FILL  # timings: kernel outputs must not be NaN-filled first

ops_cap=$(( $(left) - MODELS_RESERVE - 60 ))
echo "== 2/5 bench ops (cap $ops_cap s)"
timeout "$ops_cap" "${BENCH[@]}" --ops all --no-compile --dtype "$DTYPE" --warmup-ms 10 --rep-ms 50 \
  --json "$OUT/ops.json" --csv "$OUT/ops.csv" --markdown "$OUT/ops.md" \
  >"$OUT/bench_ops.log" 2>&1
ops_rc=$?
tail -n 2 "$OUT/bench_ops.log"

models_cap=$(cap "$MODELS_RESERVE")
echo "== 3/5 bench models (cap $models_cap s)"
timeout "$models_cap" "${BENCH[@]}" --model all --dtype "$DTYPE" \
  --json "$OUT/models.json" --csv "$OUT/models.csv" --markdown "$OUT/models.md" \
  >"$OUT/bench_models.log" 2>&1
models_rc=$?
tail -n 2 "$OUT/bench_models.log"

compile_cap=$(cap $(( $(left) - 15 )))
echo "== 4/5 bench torch.compile rows (cap $compile_cap s)"
timeout "$compile_cap" "${BENCH[@]}" --ops all --impls eager,compile --dtype "$DTYPE" \
  --warmup-ms 10 --rep-ms 50 \
  --json "$OUT/compile.json" --csv "$OUT/compile.csv" --markdown "$OUT/compile.md" \
  >"$OUT/bench_compile.log" 2>&1
compile_rc=$?
tail -n 2 "$OUT/bench_compile.log"

echo "== 5/5 results.md and plots"
summary=$(tail -n 1 "$OUT/gpu_tests.log")
slug=$("$PY" -m unipelt_fast.bench.report "$OUT/ops.json" "$OUT/models.json" "$OUT/compile.json" \
  --markdown "$OUT/results.md" --plot "$OUT/plots" \
  --extra "" --extra "## GPU tests" --extra "" \
  --extra "\`pytest -m gpu tests/\` (exit $tests_rc): $summary" \
  --extra "" --extra "Phase exit codes: tests $tests_rc, ops $ops_rc, models $models_rc, compile $compile_rc (124 = hit its time cap)")
echo "$slug" >"$OUT/DEVICE"
echo "done in ${SECONDS} s: $OUT (commit it under benchmarks/results/$slug/)"
for rc in "$tests_rc" "$ops_rc" "$models_rc" "$compile_rc"; do
  [ "$rc" != 0 ] && exit "$rc"
done
exit 0
