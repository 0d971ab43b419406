#!/usr/bin/env bash
# The fast tests against the newest releases of llmft's dependencies (within pyproject.toml's ranges), in a fresh
# virtual environment of their own, so that the next incompatible release is found here before a user finds it.
#   scripts/test_latest.sh            → prints what differs from constraints.txt, then runs ruff + the fast tests
#   scripts/test_latest.sh --update   → and, when they pass, makes the newest set the tested one (constraints.txt)
# Extra arguments go to pytest. torch stays at the tested version (LLMFT_TORCH to try another build: PyPI's own
# newer torch is a CUDA build of several GB). The venv is .venv-latest (LLMFT_LATEST_VENV overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
update=false
if [ "${1:-}" = "--update" ]; then update=true; shift; fi
venv=${LLMFT_LATEST_VENV:-.venv-latest}
rm -rf "$venv"
LLMFT_VENV=$venv LLMFT_CONSTRAINTS=none LLMFT_TORCH=${LLMFT_TORCH:-$(python3 scripts/constraints.py torch constraints.txt)} \
  scripts/setup.sh
"$venv/bin/python" -m pip freeze --exclude-editable > "$venv/freeze.txt"
echo "newest releases against constraints.txt:"
python3 scripts/constraints.py diff constraints.txt "$venv/freeze.txt" | sed 's/^/  /'
status=0
"$venv/bin/ruff" check llmft tests scripts || status=$?
[ $status = 0 ] && { "$venv/bin/python" -m pytest -m "not slow" -q -p no:cacheprovider "$@" || status=$?; }
if [ $status = 0 ]; then
  echo "the newest releases pass the fast tests"
  if $update; then
    "$venv/bin/python" scripts/constraints.py write constraints.txt "$venv/freeze.txt"  # the venv's Python
    echo "constraints.txt now holds them: run scripts/test.sh (the whole suite) before committing it"
  fi
else
  echo "the newest releases FAIL the fast tests (exit $status): constraints.txt is unchanged" >&2
fi
exit $status
