#!/usr/bin/env bash
# The GPU check: one command, about 510 s on an H100, highest value first (docs/gpu-check.md).
#   0  env.txt, offline install, Triton cache, CUDA extension build in the background
#   A  smoke.jsonl   every op x triton/cuda x bf16/fp16/fp32 vs float64   (<= 120 s)
#   B  bench.jsonl   headline timings vs SDPA / eager / torch.compile      (<= 150 s)
#   C  models.jsonl  LLaMA- and BERT-class train and inference steps       (<= 100 s)
#   D  tests.log     pytest -m gpu -x -n 8, prefix_attention first         (what is left)
#   summary.md from all of them (also written by the watchdog shortly before the deadline)
# Usage: bash benchmarks/gpu_check.sh [OUTDIR]   (default $OUT; 7 files, legal names)
# GPU_CHECK_STAGES=A (say) reruns only that stage after stage 0; default ABCD.
# GPU_CHECK_DRY=1: every stage on CPU under the Triton interpreter, tiny shapes, fp32/fp16,
# into a temp folder when no OUTDIR is given. Python parts: unipelt_fast/bench/gpu_check.py.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
DRY=${GPU_CHECK_DRY:-0}
OUTDIR=${1:-${OUT:-}}
[ -n "$OUTDIR" ] || { [ "$DRY" = 1 ] && OUTDIR=$(mktemp -d); }
[ -n "$OUTDIR" ] || { echo "usage: bash benchmarks/gpu_check.sh OUTDIR (or set OUT)" >&2; exit 2; }
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-510}
PACK_S=${GPU_CHECK_PACK_S:-20}  # the watchdog packs this long before the deadline
WORK=$(mktemp -d)               # scratch outside OUTDIR: caches, the build, pids
STAGES=${GPU_CHECK_STAGES:-ABCD}  # e.g. A to rerun the smoke alone (stage 0 always runs)
LOG=$OUTDIR/check.log
# A rerun into the same folder starts its files afresh (only the files this script writes).
rm -f "$OUTDIR"/{env.txt,check.log,smoke.jsonl,bench.jsonl,models.jsonl,tests.log,summary.md}
# tee ignores INT/TERM: a kill of this script must not cut off its own packing's output.
exec > >(trap '' INT TERM; exec tee -a "$LOG") 2>&1
GC=("$PY" -m unipelt_fast.bench.gpu_check)

export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}  # kernels/ binds from the clone too
export PYTHONUNBUFFERED=1 GPU_CHECK_DRY=$DRY
export TRITON_CACHE_DIR=$WORK/triton UNIPELT_CUDA_CACHE=$WORK/cuda
export GPU_CHECK_CUDA_RC=$WORK/cuda_build.rc
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi

left() { echo $((BUDGET - SECONDS)); }
# stage NAME CAP CMD...: runs CMD under timeout -s INT (pytest keeps its report, Python
# stages write their last line), capped so that the pack still fits before the deadline;
# its output goes to $STAGE_OUT when set.
stage() {
  local name=$1 want=$2 cap t0 rc
  shift 2
  if [ "$name" != 0 ] && [[ $STAGES != *$name* ]]; then
    echo "gpu_check: stage $name rc=skipped seconds=0 (not in GPU_CHECK_STAGES=$STAGES)"
    return
  fi
  cap=$(($(left) - PACK_S - 5))
  ((want < cap)) && cap=$want
  if ((cap < 5)); then
    echo "gpu_check: stage $name rc=skipped seconds=0 cap=$cap (no time left)"
    return
  fi
  echo "== stage $name (cap $cap s, $(left) s left)"
  t0=$SECONDS
  if [ -n "${STAGE_OUT:-}" ]; then
    timeout -s INT -k 10 "$cap" "$@" >"$STAGE_OUT" 2>&1 &
  else
    timeout -s INT -k 10 "$cap" "$@" &
  fi
  echo $! >"$WORK/stage.pid"
  wait $!
  rc=$?
  rm -f "$WORK/stage.pid"
  echo "gpu_check: stage $name rc=$rc seconds=$((SECONDS - t0)) cap=$cap"
}

# The watchdog: shortly before the deadline, interrupt whatever runs and write summary.md.
(
  sleep $((BUDGET - PACK_S)) &
  echo $! >"$WORK/watchdog.pid"
  wait $!
  echo "gpu_check: watchdog at $((BUDGET - PACK_S)) s: interrupting and packing"
  [ -f "$WORK/stage.pid" ] && kill -INT "$(cat "$WORK/stage.pid")" 2>/dev/null
  sleep 3
  "${GC[@]}" summary "$OUTDIR"
) &
WATCHDOG=$!
stop_watchdog() {
  kill "$WATCHDOG" "$(cat "$WORK/watchdog.pid" 2>/dev/null)" 2>/dev/null
  wait "$WATCHDOG" 2>/dev/null
}
# Interrupted (INT/TERM): stop the running stage the same way, then pack what is there.
on_signal() {
  trap - INT TERM
  echo "gpu_check: interrupted at $SECONDS s: packing"
  if [ -f "$WORK/stage.pid" ]; then
    kill -INT "$(cat "$WORK/stage.pid")" 2>/dev/null
    wait "$(cat "$WORK/stage.pid")" 2>/dev/null
  fi
  stop_watchdog
  "${GC[@]}" summary "$OUTDIR"
  exit 130
}
trap on_signal INT TERM

# ---- stage 0 -------------------------------------------------------------------------------
extra=()
if [ "$DRY" != 1 ]; then
  timeout 60 "$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e . \
    >"$WORK/pip.log" 2>&1
  extra+=(--line "pip_install_rc: $? (PYTHONPATH=$REPO either way)")
  # The CUDA extension builds while stages A and B run; A's cuda cases wait for it. Its
  # output goes to a file only, so nothing it leaves running holds this script's output.
  (MAX_JOBS=${MAX_JOBS:-8} "$PY" -c "from unipelt_fast import _cuda; _cuda.extension()"
    echo $? >"$GPU_CHECK_CUDA_RC") >"$WORK/cuda_build.log" 2>&1 </dev/null &
  command -v nvidia-smi >/dev/null && extra+=(--line "nvidia-smi: $(nvidia-smi \
    --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader)")
fi
stage 0 60 "${GC[@]}" env "$OUTDIR" "${extra[@]}"
cat "$OUTDIR/env.txt" 2>/dev/null

# ---- stages A, B, C (one JSON line per case, flushed) -------------------------------------
UNIPELT_AUTOTUNE=0 UNIPELT_NAN_FILL=1 stage A 120 "${GC[@]}" smoke "$OUTDIR"
stage B 150 "${GC[@]}" bench "$OUTDIR"
stage C 100 "${GC[@]}" models "$OUTDIR"
if [ -f "$GPU_CHECK_CUDA_RC" ]; then
  echo "== CUDA extension build: exit $(cat "$GPU_CHECK_CUDA_RC"); its log's tail:"
  tail -n 15 "$WORK/cuda_build.log"
fi

# ---- stage D: the gpu tests, most valuable files first -----------------------------------
files=(tests/test_prefix_attention*.py tests/test_gated_adapter*.py tests/test_bias_only*.py)
for f in tests/test_*.py; do
  [[ " ${files[*]} " == *" $f "* ]] || files+=("$f")
done
xd=(-n 8)
if [ "$DRY" = 1 ]; then  # CI: one file shows the stage works; no xdist needed
  files=(tests/test_prefix_attention.py)
  xd=()
fi
STAGE_OUT=$OUTDIR/tests.log UNIPELT_AUTOTUNE=0 UNIPELT_NAN_FILL=1 stage D 100000 \
  "$PY" -m pytest -m gpu -x "${xd[@]}" -q -rfE -p no:cacheprovider "${files[@]}"
tail -n 3 "$OUTDIR/tests.log"

# ---- summary.md ---------------------------------------------------------------------------
stop_watchdog
"${GC[@]}" summary "$OUTDIR"
rc=$?
echo "gpu_check: done in $SECONDS s: $OUTDIR ($(ls "$OUTDIR" | tr '\n' ' '))"
exit $rc
