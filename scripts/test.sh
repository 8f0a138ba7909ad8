#!/usr/bin/env bash
# The whole test suite: set up .venv, lint, then pytest. Exit code is non-zero when lint or
# any test fails, or when pytest collects nothing (pytest's exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest -q "$@"
