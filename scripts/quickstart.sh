#!/usr/bin/env bash
# The main job: set up (if needed), fine-tune the embedded SmolLM2-135M-Instruct on the demo task, then
# evaluate the base model and the SFT output on the held-out prompts (table + runs/eval/report.json).
# Rerunning continues a killed SFT run from its last checkpoint, or skips it when it is finished.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
venv=${LLMFT_VENV:-.venv}
"$venv/bin/llmft" sft configs/sft.yaml "$@"
"$venv/bin/llmft" eval configs/eval.yaml
