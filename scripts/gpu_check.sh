#!/usr/bin/env bash
# One-command GPU check of megatron-sed (benchmarks/gpu_check.py): kernels vs a float64
# reference, timings, host-sync checks, the trainer on the GPU. Prints one table and
# writes it to REPORT_DIR/gpu_check.md and .json. <= 8 minutes on one H200.
#
#   scripts/gpu_check.sh --report REPORT_DIR [--sections kernels timing syncs fused engine]
#   scripts/gpu_check.sh --dry-run --report REPORT_DIR    # CPU, tiny, < 1 minute
#
# The GPU machine needs Python 3.12, torch and Triton; megatron-core (and nothing else)
# may be missing there: this script then installs the wheel carried in .whl/ of the
# working tree. Fetch it once where pip works (not committed; .whl/ is git-ignored):
#
#   python -m pip download megatron-core==0.19.2 --no-deps --only-binary=:all: \
#       --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl
#
# and send .whl/ along with the tree (docs/performance.md, "How to run on a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    shopt -s nullglob
    wheels=(.whl/megatron_core-*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "gpu_check.sh: megatron-core does not import and no .whl/megatron_core-*.whl is here (see this script's header)" >&2
        exit 2
    fi
    site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
