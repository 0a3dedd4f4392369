#!/usr/bin/env bash
# API overhead of `aivmm serve` (see bench/api.py): latency the daemon adds to
# a completion beyond the guest's own time to first token, and requests/s
# with 1, 4 and 16 concurrent clients against the partition's own capacity
# measured in the same run. Loopback (Unix socket) only, bounded runs.
#
#   bench/api.sh [--requests 48] [--json OUT] [--model PATH]
#
# Fetches Gemma 3 270M (images/fetch-model.sh) unless --model is given and
# builds `cargo build --release -p aivmm` (AIVMM_BIN=path skips the build).
set -euo pipefail
root="$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"
cd "$root"
if [ ! -e /dev/kvm ]; then
  echo "bench: /dev/kvm not found: the daemon's partitions need KVM" >&2
  exit 1
fi
model_args=()
case " $* " in
  *" --model "*) ;;
  *) model_args=(--model "$(images/fetch-model.sh)") ;;
esac
if [ -n "${AIVMM_BIN:-}" ]; then
  aivmm="$AIVMM_BIN"
else
  echo "bench: cargo build --release -p aivmm" >&2
  cargo build --release -p aivmm >&2
  aivmm="$root/target/release/aivmm"
fi
exec python3 bench/api.py --aivmm "$aivmm" "${model_args[@]}" "$@"
