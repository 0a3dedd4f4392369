#!/usr/bin/env bash
# Per-token latency p50/p99 and jitter for one partition alone and two at
# once on separate cores, with and without hugepages, and the generation
# rate ratio two-at-once / alone (see bench/isolation.py).
#
#   bench/isolation.sh [--cpus 0,1] [--reps 3] [-n 256] [--ctx-size 1024]
#                      [--no-hugepages] [--cgroup] [--json OUT] [--model PATH]
#
# Fetches Gemma 3 270M (images/fetch-model.sh) unless --model is given, builds
# `cargo build --release -p aivmm` (AIVMM_BIN=path skips the build), reserves
# hugepages with tests/setup-hugepages.sh (root; skipped with --no-hugepages),
# then runs bench/isolation.py. Needs /dev/kvm and a quiet machine.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/kvm-bench-setup.sh"
case " $* " in
  *" --no-hugepages "*) ;;
  *) tests/setup-hugepages.sh 512 >&2 ;;
esac
exec python3 bench/isolation.py --aivmm "$aivmm" "${model_args[@]}" "$@"
