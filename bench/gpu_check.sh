#!/usr/bin/env bash
# The GPU check in one call (bench/gpu_check.py says what it runs and writes).
#
#   bench/gpu_check.sh          on a CUDA machine: at most 5 minutes (300 s), results to $OUT or bench/results/gpu-check/
#   bench/gpu_check.sh --dry    the same stages at toy sizes on the CPU, for CI
#
# It runs on the machine's own Python and packages (no install, no download): the
# repository is put on PYTHONPATH and the extension is built just in time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && [ "${1:-}" = "--dry" ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
