#!/usr/bin/env bash
# Creates .venv (or $BNSCOPE_VENV) and installs the project into it, once per change of
# pyproject.toml or this file. Sourced by scripts/serve and scripts/test.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BNSCOPE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC="${BNSCOPE_TORCH:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.bnscope-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -c1-16) $TORCH_SPEC $*"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing $TORCH_SPEC and bnscope${*:+ with extras $*}" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC" numpy
  extras="${*:+[$(IFS=,; echo "$*")]}"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT$extras"
  echo "$want" > "$stamp"
fi

export PATH="$VENV/bin:$PATH"
