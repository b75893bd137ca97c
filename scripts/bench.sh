#!/usr/bin/env bash
# The main job (README): `bash scripts/bench.sh --quick`. Makes or reuses the same .venv as
# scripts/test.sh (so it works first on a fresh machine too), then runs the bench.
# Arguments go to `unipelt-fast bench`, e.g. `bash scripts/bench.sh --ops gated_adapter`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
uf_venv test,bench constraints/main.txt

exec "$VENV/bin/unipelt-fast" bench "$@"
