#!/usr/bin/env bash
# The one-run GPU suite, for the device tool (carry: [".wheels"]):
#   bash benchmarks/gpu_suite.sh [--commit HASH] [gpu_suite.py options]
# Runs from the checkout; graphrt is imported from it (PYTHONPATH), never pip-installed there.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
exec python3 benchmarks/gpu_suite.py "$@"
