#!/usr/bin/env bash
# aivmm's engine against llama.cpp, same models, prompts and thread counts, in one run.
#
#   bench/engine-vs-llamacpp.sh [--threads 1,2] [--reps 3] [--json OUT] [...]
#
# Ensures what it needs first: the llama.cpp reference venv
# (tests/reference/setup.sh), Gemma 3 270M (images/fetch-model.sh), the
# TinyLlama-shaped Q4_K_M (tests/reference/gen_models.py --tinyllama, a few
# minutes and a few GB of disk the first time) and `cargo build --release -p
# aivmm`; then runs bench/engine_vs_llamacpp.py. Extra arguments go to it.
# AIVMM_BENCH_MODELS=gemma skips the TinyLlama-shaped model.
set -euo pipefail
root="$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"
cd "$root"

python="$(tests/reference/setup.sh)"
cache="${AIVMM_CACHE:-$HOME/.cache/aivmm}"

models=(--model "gemma3-270m-q4_k_m=$(images/fetch-model.sh)")
if [ "${AIVMM_BENCH_MODELS:-gemma,tinyllama}" != "gemma" ]; then
  tinyllama="$cache/models/tinyllama-shaped-q4_k_m.gguf"
  if [ ! -f "$tinyllama" ]; then
    echo "bench: generating the TinyLlama-shaped models (once)" >&2
    "$python" tests/reference/gen_models.py --cache-dir "$cache/models" tinyllama-shaped >&2
  fi
  models+=(--model "tinyllama-shaped-q4_k_m=$tinyllama")
fi

echo "bench: cargo build --release -p aivmm" >&2
cargo build --release -p aivmm >&2
aivmm="${CARGO_TARGET_DIR:-$root/target}/release/aivmm"

exec "$python" bench/engine_vs_llamacpp.py --aivmm "$aivmm" "${models[@]}" "$@"
