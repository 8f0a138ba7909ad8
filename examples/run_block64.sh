#!/usr/bin/env bash
# Placeholder until the trainer lands: checks that the package imports and says so honestly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import megatron_opd; print('megatron_opd', megatron_opd.__version__, 'installed; the OPD trainer has not landed yet')"
