#!/usr/bin/env bash
# The test suite (README's second command). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
# Triton kernels run on CPU tensors in the interpreter.
export TRITON_INTERPRET=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest tests "$@"
