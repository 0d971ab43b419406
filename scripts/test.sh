#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, end-to-end runs on the embedded model included.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# the browser test (tests/annotate/test_browser.py) needs Chromium and its driver: installed here where apt-get can,
# else that test is skipped and says why
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null 2>&1 ||
    { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null 2>&1; }; } ||
    echo "note: could not install chromium and chromium-driver: the browser test will be skipped"
fi
# the vLLM engine's environment (.venv-vllm): its tests run, and fail rather than skip when it is missing
scripts/setup_vllm.sh
export LLMFT_REQUIRE_VLLM=1
venv=${LLMFT_VENV:-.venv}
"$venv/bin/ruff" check llmft tests scripts
"$venv/bin/python" -m pytest -m "slow or not slow" -q "$@"
