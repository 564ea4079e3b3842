#!/usr/bin/env bash
# Runs the test suite. On a fresh machine it first creates .venv in the checkout and installs the
# package with its test extra into it. Extra arguments go to pytest (e.g. -k models, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# One style for the whole tree (ruff.toml): a file that is not formatted fails the run.
if ! .venv/bin/ruff format --check --quiet .; then
  echo "ruff: the files above are not formatted; run .venv/bin/ruff format ." >&2
  exit 1
fi
exec .venv/bin/python -m pytest "$@"
