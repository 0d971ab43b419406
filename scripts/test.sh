#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, end-to-end runs on the embedded model included.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
venv=${LLMFT_VENV:-.venv}
"$venv/bin/ruff" check llmft tests scripts
"$venv/bin/python" -m pytest -m "slow or not slow" -q "$@"
