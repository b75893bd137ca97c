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
    # (a half-made venv folder is completed by venv, never replaced)
    if [ -n "${UF_SEED_VENV:-}" ] && [ "${UNIPELT_LATEST:-0}" != 1 ] &&
      [ -x "$UF_SEED_VENV/bin/python" ] && [ ! -e "$VENV" ]; then
      _uf_seed "$UF_SEED_VENV" "$VENV" "$constraints"
      _UF_SEEDED=1
    else
      "$(_uf_python)" -m venv "$VENV"
    fi
  fi
  local pins=(-c "$constraints")
  if [ "${UNIPELT_LATEST:-0}" = 1 ]; then
    pins=(-U --upgrade-strategy eager)
  fi
  "$VENV/bin/python" -m pip install -q "${pins[@]}" ${torch_spec:+"$torch_spec"} \
    -e ".[$extras]" "$@"
  if [ -n "${_UF_SEEDED:-}" ]; then
    _UF_SEEDED=
    _uf_prune ${torch_spec:+"$torch_spec"} "unipelt-fast[$extras]" "$@"
  fi
}

# _uf_prune REQUIREMENT...: uninstall from VENV every distribution that none of the
# requirements needs, directly or through dependencies (markers and extras evaluated), so a
# venv made by _uf_seed holds what a fresh one would (the seed's packages that this venv's
# constraints also list, e.g. a --no-deps extra, would otherwise stay).
_uf_prune() {
  local extra
  extra=$("$VENV/bin/python" - "$@" <<'PY'
import importlib.metadata as md
import sys

from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name as canon

dists = {canon(d.metadata["Name"]): d for d in md.distributions()}
need: dict[str, set[str]] = {}
todo = [Requirement(r) for r in sys.argv[1:]]
while todo:
    req = todo.pop()
    name = canon(req.name)
    first = name not in need
    extras = need.setdefault(name, set())
    new = set(req.extras) - extras
    if name in dists and (first or new):
        extras |= new
        for r in dists[name].requires or []:
            dep = Requirement(r)
            if dep.marker is None or any(
                dep.marker.evaluate({"extra": e}) for e in extras | {""}
            ):
                todo.append(dep)
print(" ".join(sorted(set(dists) - set(need) - {"pip", "setuptools", "wheel"})))
PY
  )
  if [ -n "$extra" ]; then
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip uninstall -q -y $extra
  fi
}

# _uf_seed SEED NEW CONSTRAINTS: make venv NEW as a copy of venv SEED (hard links where the
# file system allows), less the packages CONSTRAINTS does not list, so the pip call after it
# only installs what differs (CI builds three venvs that share torch, numpy, bitsandbytes...;
# unpacking and byte-compiling those again was most of each venv's time). Hard links are safe
# to share: pip replaces or removes a file (new inode, or unlink), never writes into one, and
# Python writes its .pyc files by rename. The scripts' #! lines and activate name NEW.
_uf_seed() {
  local seed=$1 new=$2 constraints=$3 f extra
  seed=$(cd "$seed" && pwd)
  cp -al "$seed" "$new" 2>/dev/null || { rm -rf "$new" && cp -a "$seed" "$new"; }
  new=$(cd "$new" && pwd)
  for f in "$new"/bin/* "$new/pyvenv.cfg"; do
    if [ -f "$f" ] && [ ! -L "$f" ] && grep -qsF "$seed" "$f"; then
      sed -i "s#$seed#$new#g" "$f" # sed -i writes a new file: the seed's stays as it was
    fi
  done
  # the seed's packages that this venv's constraints do not list (names compared normalized)
  extra=$("$new/bin/python" -m pip freeze --exclude-editable 2>/dev/null |
    awk -F'[ =@]+' 'NR == FNR { if ($0 !~ /^#/) keep[tolower($1)] = 1; next }
      { n = tolower($1); gsub(/[-_.]+/, "-", n); if (!(n in keep)) print $1 }' \
      <(sed -E 's/[-_.]+/-/g' "$constraints") -)
  if [ -n "$extra" ]; then
    # shellcheck disable=SC2086
    "$new/bin/python" -m pip uninstall -q -y $extra
  fi
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
