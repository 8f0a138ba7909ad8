#!/usr/bin/env bash
# The whole test suite: set up .venv and the real-SGLang environment, lint, then pytest. Exit code is
# non-zero when lint or any test fails, or when pytest collects nothing (pytest's exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The real-SGLang CPU environment the tests in tests/real_sglang serve from (cached; minutes when new).
sglang_start=$(date +%s)
bash scripts/setup_sglang_env.sh >/dev/null
echo "real-SGLang environment ready in $(( $(date +%s) - sglang_start )) s"
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest -q --durations=30 "$@"  # the slowest tests, for keeping the suite short
