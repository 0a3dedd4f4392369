#!/usr/bin/env bash
# Creates (or reuses) the llama.cpp reference environment: a Python venv with
# llama-cpp-python (llama.cpp compiled for this CPU; several minutes the first
# time), gguf and numpy. Prints the venv's python on stdout (the rest goes to
# stderr), so scripts can do: PY=$(tests/reference/setup.sh)
#
#   tests/reference/setup.sh [VENV_DIR]          (default: $VENV or ~/.cache/aivmm-ref)
#
# It delegates the install to ../shared/bench/setup-reference.sh next to the
# checkout, then runs smoke_llama_cpp.py: on Intel CPUs with AMX under some
# hypervisors, the GGML_NATIVE build's AMX kernels die with SIGILL on
# quantized models; the smoke test catches that and llama-cpp-python is
# rebuilt without AMX (-mno-amx-*; everything else still native).
# CI does not need any of this: it reads the committed fixtures.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(git -C "$here" rev-parse --show-toplevel)"
installer="$root/../shared/bench/setup-reference.sh"
if [ ! -f "$installer" ]; then
  echo "setup: $installer not found (it lives in the shared folder next to the checkout)" >&2
  exit 1
fi
venv="${1:-${VENV:-$HOME/.cache/aivmm-ref}}"
bash "$installer" "$venv" >&2

smoke() { "$venv/bin/python" "$here/smoke_llama_cpp.py" >&2; }
if ! smoke; then
  version="$("$venv/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)')"
  echo "setup: llama.cpp cannot run quantized models here; rebuilding llama-cpp-python $version without AMX" \
       "(several minutes)" >&2
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  CFLAGS="$no_amx" CXXFLAGS="$no_amx" CMAKE_ARGS="-DGGML_NATIVE=ON" \
    "$venv/bin/pip" install --quiet --force-reinstall --no-deps --no-cache-dir "llama-cpp-python==$version" >&2
  if ! smoke; then
    echo "setup: llama.cpp still fails its smoke test after the rebuild; see the output above" >&2
    exit 1
  fi
fi
echo "$venv/bin/python"
