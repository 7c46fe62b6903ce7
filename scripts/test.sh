#!/usr/bin/env bash
# Second README command: the whole test suite (unit, integration, end to end).
# Extra arguments go to pytest (e.g. -m "not e2e", -k usage, -x).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  echo "no .venv here: run 'bash scripts/install.sh' (or scripts/setup.sh) first" >&2
  exit 1
fi
.venv/bin/python -m pytest tests "$@"
status=$?
if [ "$status" = 5 ]; then
  echo "pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$status"
