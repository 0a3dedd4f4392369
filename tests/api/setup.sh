#!/usr/bin/env bash
# Sets up what the API tests drive the daemon with, and prints the Python to
# use on stdout (progress goes to stderr):
#   - curl (apt, if missing),
#   - a venv with the official `openai` client, `prometheus_client` (its
#     text-format parser judges /metrics) and `schemathesis` (fuzzes the API
#     from api/openapi.yaml), at the versions in requirements.txt.
# Idempotent and quick once done: the venv is cached in ~/.cache/aivmm/api-venv
# and rebuilt only when requirements.txt changes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${AIVMM_API_VENV:-$HOME/.cache/aivmm/api-venv}"
requirements="$here/requirements.txt"

if ! command -v curl >/dev/null 2>&1; then
    echo "tests/api/setup.sh: installing curl" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "tests/api/setup.sh: curl is missing and this is not root: install it (apt-get install curl)" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl >&2; }
fi

stamp="$venv/.requirements"
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$requirements" "$stamp"; then
    echo "tests/api/setup.sh: creating $venv (openai, prometheus_client, schemathesis)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements" >&2
    cp "$requirements" "$stamp"
fi
"$venv/bin/python" -c 'import openai, prometheus_client, schemathesis' >&2
echo "$venv/bin/python"
