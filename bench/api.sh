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
source "$(dirname "${BASH_SOURCE[0]}")/kvm-bench-setup.sh"
exec python3 bench/api.py --aivmm "$aivmm" "${model_args[@]}" "$@"
