#!/usr/bin/env bash
# The engine inside a KVM partition against the same engine on the host, on
# the same CPUs, model and prompt, in one run (see bench/partition.py).
#
#   bench/partition.sh [--cpus 0,1] [--reps 3] [--n1 16] [--n2 128] [--ctx-size 0]
#                      [--hugepages] [--json OUT] [--model PATH]
#
# Fetches Gemma 3 270M (images/fetch-model.sh) unless --model is given, builds
# `cargo build --release -p aivmm` (AIVMM_BIN=path skips the build), then runs
# bench/partition.py. Needs /dev/kvm. Run it on a quiet machine: both sides
# spin their workers between jobs, and a core taken by something else slows
# both down by much more than its share.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/kvm-bench-setup.sh"
exec python3 bench/partition.py --aivmm "$aivmm" "${model_args[@]}" "$@"
