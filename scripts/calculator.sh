#!/usr/bin/env bash
# The tool-use example (docs/environments.md): SmolLM2-135M-Instruct (embedded) learns a calculator tool from 64
# demonstrations (sft), then multi-turn GRPO with the Calculator environment (two seeds) and multi-turn PPO; held-out
# accuracy and tool calls before and after (runs/calculator/eval.json). Rerunning continues or skips finished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
venv=${LLMFT_VENV:-.venv}
"$venv/bin/python" -m examples.calculator.make_data data/calculator
"$venv/bin/llmft" sft examples/calculator/sft.yaml
"$venv/bin/llmft" grpo examples/calculator/grpo.yaml
"$venv/bin/llmft" grpo examples/calculator/grpo.yaml --set seed=43 --set output_dir=runs/calculator/grpo-seed43
"$venv/bin/llmft" ppo examples/calculator/ppo.yaml
"$venv/bin/llmft" eval examples/calculator/eval.yaml
