# Sourced by the KVM benchmarks (bench/partition.sh, isolation.sh, api.sh)
# with the benchmark's arguments: checks /dev/kvm, fetches the default model
# unless --model is among the arguments (sets model_args), and builds the
# release binary unless AIVMM_BIN names one (sets aivmm). Leaves the shell in
# the repository root ($root).
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
if [ -n "${AIVMM_BIN:-}" ]; then
  aivmm="$AIVMM_BIN"
else
  echo "bench: cargo build --release -p aivmm" >&2
  cargo build --release -p aivmm >&2
  aivmm="${CARGO_TARGET_DIR:-$root/target}/release/aivmm"
fi
