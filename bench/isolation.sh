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
root="$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"
cd "$root"

if [ ! -e /dev/kvm ]; then
  echo "bench: /dev/kvm not found: partitions need KVM" >&2
  exit 1
fi
model_args=()
case " $* " in
  *" --model "*) ;;
  *) model_args=(--model "$(images/fetch-model.sh)") ;;
esac
case " $* " in
  *" --no-hugepages "*) ;;
  *) tests/setup-hugepages.sh 512 >&2 ;;
esac
if [ -n "${AIVMM_BIN:-}" ]; then
  aivmm="$AIVMM_BIN"
else
  echo "bench: cargo build --release -p aivmm" >&2
  cargo build --release -p aivmm >&2
  aivmm="${CARGO_TARGET_DIR:-$root/target}/release/aivmm"
fi
exec python3 bench/isolation.py --aivmm "$aivmm" "${model_args[@]}" "$@"
