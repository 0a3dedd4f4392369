#!/usr/bin/env bash
# Creates (or reuses) the llama.cpp reference environment: a Python venv with
# llama-cpp-python (llama.cpp compiled for this CPU; several minutes the first
# time), gguf and numpy. The scripts of this folder run with its python.
#
#   tests/reference/setup.sh [VENV_DIR]          (default: ~/.cache/aivmm-ref)
#
# It delegates to ../shared/bench/setup-reference.sh next to the checkout.
# CI does not need this: it only reads the committed fixtures (and
# requirements-light.txt covers scripts that do not need llama.cpp).
set -euo pipefail
root="$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"
installer="$root/../shared/bench/setup-reference.sh"
if [ ! -x "$installer" ] && [ ! -f "$installer" ]; then
  echo "setup: $installer not found (it lives in the shared folder next to the checkout)" >&2
  exit 1
fi
venv="${1:-${VENV:-$HOME/.cache/aivmm-ref}}"
bash "$installer" "$venv" >&2
echo "$venv/bin/python"
