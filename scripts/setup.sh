#!/usr/bin/env bash
# First README command: install everything, then start the local marketplace.
# Extra arguments go to `tokenmart up` (e.g. --port 8001).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh
printf '\n\033[1m==> tokenmart up\033[0m\n'
exec .venv/bin/tokenmart up "$@"
