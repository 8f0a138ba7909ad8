#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install everything.
# torch==2.13.0 goes in first: any unpinned torch requirement would otherwise pull GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q -e ".[dev]"
