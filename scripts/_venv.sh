# Sourced by scripts/test.sh and scripts/bench.sh (not run on its own): makes .venv on a
# fresh machine, or reuses it, and installs CPU torch and the package into it, so either
# command works first, in a fresh shell, with nothing activated.
#   uf_venv EXTRAS CONSTRAINTS [PIP_ARGS...]   e.g. uf_venv test,bench constraints/main.txt
#   (PIP_ARGS are installed in the same pip call; UNIPELT_VENV picks another venv dir)
# Every package version comes from the committed CONSTRAINTS file (the versions the suite
# last passed with), so a new upstream release cannot turn main red overnight.
# UNIPELT_LATEST=1 ignores it and upgrades everything to the newest releases instead (then
# scripts/test.sh rewrites the constraints files after a green run: commit them).
# Sets VENV. PYTHON picks the interpreter that makes the venv (default: the first python3
# >= 3.11 on PATH, then a few usual places).

_uf_python() {
  local c
  for c in ${PYTHON:-} python3 python3.12 python3.11 /usr/local/bin/python3 /usr/bin/python3 \
    "$HOME/.pyenv/shims/python3"; do
    if command -v "$c" >/dev/null 2>&1 &&
      "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$c"
      return 0
    fi
  done
  echo "no python3 >= 3.11 found; set PYTHON=/path/to/python3" >&2
  return 1
}

uf_venv() {
  VENV=${UNIPELT_VENV:-.venv}
  # The CPU wheel that lies on CI's disk. Never a bare `torch` here: that pulls a CUDA build
  # of several GB. Set UNIPELT_TORCH_SPEC="" to keep whatever torch the venv already has.
  local torch_spec=${UNIPELT_TORCH_SPEC-torch==2.13.0}
  local extras=$1 constraints=$2
  shift 2
  if [ ! -x "$VENV/bin/python" ]; then
    "$(_uf_python)" -m venv "$VENV"
  fi
  local pins=(-c "$constraints")
  if [ "${UNIPELT_LATEST:-0}" = 1 ]; then
    pins=(-U --upgrade-strategy eager)
  fi
  "$VENV/bin/python" -m pip install -q "${pins[@]}" ${torch_spec:+"$torch_spec"} \
    -e ".[$extras]" "$@"
}

# uf_freeze CONSTRAINTS: write VENV's versions (less this package) to CONSTRAINTS, atomically.
# torch's local label (+cpu) is dropped: the spec torch==2.13.0 then still picks the CPU wheel
# on CI's disk, as scripts/test.sh always did.
uf_freeze() {
  local out=$1 tmp
  tmp=$(mktemp "$out.XXXXXX")
  {
    echo "# Written by scripts/test.sh (UNIPELT_LATEST=1) after a green run on $(date -u +%F)."
    "$VENV/bin/python" -m pip freeze --exclude-editable 2>/dev/null |
      grep -v -i '^unipelt[-_]fast' | sed -E 's/^(torch==[^+]*)\+.*/\1/'
  } >"$tmp"
  mv -f "$tmp" "$out"
}
