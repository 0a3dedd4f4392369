#!/usr/bin/env bash
# A bounded fuzz run of the GGUF reader (default 60 s), seeded with the
# committed fixture models. Needs cargo-fuzz (`cargo install cargo-fuzz`);
# the stable toolchain is enough with RUSTC_BOOTSTRAP=1 and no sanitizer.
#
#   guest/engine/fuzz/run.sh [SECONDS]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
secs="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
corpus="$here/corpus/gguf"
mkdir -p "$corpus"
cp -n "$here"/../../../tests/fixtures/models/*.gguf "$corpus"/ 2>/dev/null || true
cd "$here/.."
RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none gguf "$corpus" -- \
  -max_total_time="$secs" -max_len=4000000 -rss_limit_mb=4096
