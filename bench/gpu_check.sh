#!/usr/bin/env bash
# One-shot GPU check for a lent machine (one H200): op checks on CUDA, copy bandwidth,
# op benchmarks (torch vs Triton) and training steps, in under 8 minutes.
# Writes $OUT/gpu_check.json when $OUT is set (else bench/results/gpu_check.json).
# Usage: bash bench/gpu_check.sh [extra gpu_check.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

# The lent GPU machine has python3 only (no `python`); $PYTHON overrides.
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

# Compiled Triton kernels, not the interpreter.
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
export PYTHONUNBUFFERED=1

# The packages from this checkout (no network: no dependencies, no build isolation);
# gpu_check.py falls back to loading kernels/ directly if this fails.
if ! "$PYTHON" -c "import pyramidflow, pyramidflow_kernels" >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q -e . --no-deps --no-build-isolation \
        || echo "pip install -e . failed: using the checkout directly" >&2
fi

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
exec timeout 470 "$PYTHON" bench/gpu_check.py --budget-s 400 "$@"
