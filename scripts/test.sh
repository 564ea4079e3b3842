#!/usr/bin/env bash
# Runs the test suite. On a fresh machine it first creates .venv in the checkout and installs the
# package with its test extra into it. Extra arguments go to pytest (e.g. -k models, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
