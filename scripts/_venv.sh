# Sourced by scripts/test.sh and scripts/bench.sh (not run on its own): makes .venv on a
# fresh machine, or reuses it, and installs CPU torch and the package into it, so either
# command works first, in a fresh shell, with nothing activated.
#   uf_venv EXTRAS [PIP_ARGS...]   e.g. uf_venv test  ->  pip install -e ".[test]"
#   (PIP_ARGS are installed in the same pip call; UNIPELT_VENV picks another venv dir)
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
  if [ ! -x "$VENV/bin/python" ]; then
    "$(_uf_python)" -m venv "$VENV"
  fi
  if [ -n "$torch_spec" ]; then
    "$VENV/bin/python" -m pip install -q "$torch_spec"
  fi
  local extras=$1
  shift
  "$VENV/bin/python" -m pip install -q -e ".[$extras]" "$@"
}
