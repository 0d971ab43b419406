#!/usr/bin/env bash
# The main job: set up (if needed), then fine-tune the embedded SmolLM2-135M-Instruct on the demo task.
# Rerunning continues a killed run from its last checkpoint, or reports that the run is finished.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
venv=${LLMFT_VENV:-.venv}
"$venv/bin/llmft" sft configs/sft.yaml "$@"
