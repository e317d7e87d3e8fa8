#!/usr/bin/env bash
# The test command behind `make test` and `.ci/run`: lint, then every test.
# pytest's exit code 5 ("no tests collected") is turned into a failure: an empty run must never pass.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
$VENV/bin/ruff check .
$VENV/bin/ruff format --check .
set +e
$VENV/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; failing" >&2
  exit 1
fi
exit "$rc"
