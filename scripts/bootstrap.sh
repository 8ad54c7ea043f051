#!/usr/bin/env bash
# Creates .venv (or $BNSCOPE_VENV) and installs the project into it, once per change of
# pyproject.toml or this file. Sourced by scripts/serve and scripts/test, which set
# BNSCOPE_EXTRAS (e.g. "test") before sourcing; their own arguments are never read here.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BNSCOPE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC="${BNSCOPE_TORCH:-torch==2.13.0}"
EXTRAS="${BNSCOPE_EXTRAS:-}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi

# The stamp names what is installed: the sources' hash, the torch spec, then the extras. An
# install with more extras than asked for serves too (the tests' install serves the server).
stamp="$VENV/.bnscope-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -c1-16) $TORCH_SPEC"
have="$(cat "$stamp" 2>/dev/null || true)"
ok=0
if [ "${have%% extras:*}" = "$want" ]; then
  ok=1
  for extra in ${EXTRAS//,/ }; do
    case ",${have#* extras:}," in *",$extra,"*) ;; *) ok=0 ;; esac
  done
fi
if [ "$ok" != 1 ]; then
  echo "bootstrap: installing $TORCH_SPEC and bnscope${EXTRAS:+[$EXTRAS]} (a minute or two, once)" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC" numpy
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  echo "$want extras:$EXTRAS" > "$stamp"
fi

export PATH="$VENV/bin:$PATH"
