#!/usr/bin/env bash
# Installs ACPICA's iasl (Debian's acpica-tools), which the ACPI test uses to
# disassemble the tables built for Linux guests, and prints its path.
# Idempotent: nothing to do once iasl is on the PATH.
set -euo pipefail
if ! command -v iasl >/dev/null 2>&1; then
    echo "tests/setup-acpica.sh: installing acpica-tools (iasl)" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "tests/setup-acpica.sh: iasl is missing and this is not root: install it (apt-get install acpica-tools)" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q acpica-tools >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q acpica-tools >&2; }
fi
command -v iasl
