#!/usr/bin/env bash
# The main job: set up (if needed), fine-tune the embedded SmolLM2-135M-Instruct on the demo task, train a
# reward model, a DPO policy, a PPO policy and a GRPO policy from the SFT output, then evaluate the base model,
# SFT, DPO, PPO and GRPO on the held-out prompts (judge pass rate, reward-model score, KL to SFT, length; table +
# runs/eval/report.json).
# Rerunning continues a killed run from its last checkpoint, or skips a stage that is finished.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
venv=${LLMFT_VENV:-.venv}
"$venv/bin/llmft" sft configs/sft.yaml "$@"
"$venv/bin/llmft" reward configs/reward.yaml
"$venv/bin/llmft" dpo configs/dpo.yaml
"$venv/bin/llmft" ppo configs/ppo.yaml
"$venv/bin/llmft" grpo configs/grpo.yaml
"$venv/bin/llmft" eval configs/eval.yaml
