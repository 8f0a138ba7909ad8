#!/usr/bin/env bash
# Fetch, on a machine with network, the Python 3.12 wheels that tools/gpu_check.py needs on a GPU machine
# without network, into one folder:
#
#   bash scripts/fetch_gpu_wheels.sh [DIR]          # default DIR: .whl (3.8 MB)
#   python tools/gpu_check.py --wheels DIR ...      # on the GPU machine: installs exactly these, offline
#
# Only what the GPU image lacks (IMAGE_HAS: from the image's package list; tests/unit/test_fetch_gpu_wheels.py
# checks that every project dependency and every dependency of a fetched wheel is on one of the two lists).
# gpu_check installs them with --no-deps: the image's versions of the shared dependencies stay as they are,
# and it reports `pip check` instead of letting pip replace them.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYTHON=${PYTHON:-python3}
# name==version, one per line; megatron-core is the only one with compiled code (cp312).
WHEELS=(
    megatron-core==0.16.1
    datasets==5.2.0
    dill==0.4.1                      # datasets
    multiprocess==0.70.19            # datasets
    math-verify==0.9.0
    latex2sympy2_extended==1.11.0    # math-verify
    antlr4-python3-runtime==4.13.2   # latex2sympy2_extended
)
IMAGE_HAS=(torch transformers safetensors numpy pandas pyarrow matplotlib rich tqdm httpx psutil pyyaml
           fsspec huggingface-hub xxhash sympy filelock packaging)
mkdir -p "$DIR"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" "${WHEELS[@]}"
echo "the GPU image brings the rest: ${IMAGE_HAS[*]}"
echo "$(find "$DIR" -maxdepth 1 -type f -name "*.whl" | wc -l) wheels in $DIR ($(du -sh "$DIR" | cut -f1)); pass it as: tools/gpu_check.py --wheels $DIR"
