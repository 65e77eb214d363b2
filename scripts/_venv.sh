# Sourced by scripts/*.sh: create or reuse a virtualenv at the repo root and activate it.
#
#   .venv         (default)        Python 3.12, torch 2.13.0, megatron-core[training] 0.19.2:
#                                  the engine (Megatron's pretrain loop), everything
#   .venv-compat  (VENV=compat)    Python 3.11, torch 2.13.0 (CPU build), megatron-core 0.16.1:
#                                  the compatibility leg (loss op, Megatron-LM patch glue)
#
# Versions are pinned in constraints.txt / constraints-compat.txt. Idempotent: the install
# step reruns only when setup.py or the constraints change. PYTHON_BIN overrides the
# interpreter; otherwise pythonX.Y on PATH, then pyenv's newest X.Y, is used.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${VENV:-main}" in
  main)   PY_VERSION=3.12; VENV_DIR="$REPO_ROOT/.venv";        CONSTRAINTS="$REPO_ROOT/constraints.txt";        EXTRA="test,training" ;;
  compat) PY_VERSION=3.11; VENV_DIR="$REPO_ROOT/.venv-compat"; CONSTRAINTS="$REPO_ROOT/constraints-compat.txt"; EXTRA="test" ;;
  *) echo "error: VENV must be main or compat, got '${VENV}'" >&2; exit 1 ;;
esac

_find_python() {  # _find_python 3.12 -> path of a python3.12
  if [ -n "${PYTHON_BIN:-}" ]; then echo "$PYTHON_BIN"; return; fi
  if command -v "python$1" >/dev/null 2>&1 && "python$1" -c 'pass' 2>/dev/null; then
    command -v "python$1"; return
  fi
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v="$(pyenv versions --bare 2>/dev/null | grep -E "^$1(\.[0-9]+)?$" | sort -V | tail -n 1)"
    if [ -n "$v" ] && [ -x "$(pyenv root)/versions/$v/bin/python$1" ]; then
      echo "$(pyenv root)/versions/$v/bin/python$1"; return
    fi
  fi
  echo "error: Python $1 not found (needed for $VENV_DIR); install it or set PYTHON_BIN" >&2
  return 1
}

if [ ! -x "$VENV_DIR/bin/python" ]; then
  PY="$(_find_python "$PY_VERSION")"
  echo "== creating $VENV_DIR with $PY"
  "$PY" -m venv "$VENV_DIR"
fi
stamp="$VENV_DIR/.megatron-sed-install"
want="$(cat "$REPO_ROOT/setup.py" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing megatron-sed[$EXTRA] into $VENV_DIR (pins: $(basename "$CONSTRAINTS"))"
  pip_install() { "$VENV_DIR/bin/python" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "$@"; }
  # torch first and exactly pinned, so nothing else gets to choose a build.
  pip_install "torch==$(sed -n 's/^torch==//p' "$CONSTRAINTS")"
  pip_install -e "$REPO_ROOT[$EXTRA]"
  echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source "$VENV_DIR/bin/activate"
cd "$REPO_ROOT"
