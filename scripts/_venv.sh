# Sourced by scripts/*.sh: create or reuse .venv/ at the repo root and activate it.
# Idempotent: the install step reruns only when setup.py or constraints.txt change.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
PYTHON_BIN="${PYTHON_BIN:-python3.11}"
if ! command -v "$PYTHON_BIN" >/dev/null 2>&1; then
  echo "error: $PYTHON_BIN not found; megatron-sed's scripts need Python 3.11 (set PYTHON_BIN)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV with $PYTHON_BIN"
  "$PYTHON_BIN" -m venv "$VENV"
fi
stamp="$VENV/.megatron-sed-install"
want="$(cat "$REPO_ROOT/setup.py" "$REPO_ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing megatron-sed and its test extras into $VENV"
  # torch first and exactly pinned: the CPU build of 2.13.0 (never let pip choose).
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$REPO_ROOT/constraints.txt" \
    torch==2.13.0 megatron-core==0.16.1
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$REPO_ROOT/constraints.txt" \
    -e "$REPO_ROOT[test]"
  echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$REPO_ROOT"
