#!/usr/bin/env bash
# Build (or reuse) the real-SGLang CPU environment the real-server tests run against.
#
#   bash scripts/setup_sglang_env.sh          # prints the environment's path on its last line
#
# Location: $MEGATRON_OPD_SGLANG_ENV, default ~/.cache/megatron_opd/sglang-0.5.23. It is a venv of its
# own, never the project's .venv: sglang pins torch 2.14.1 (CUDA-only on the registry) and a dozen
# CUDA packages, so it is assembled by hand (DESIGN §4, issue 10):
#   1. torch==2.13.0 (the CPU build) first;
#   2. sglang==0.5.23 with --no-deps;
#   3. its pure-Python dependencies, every version pinned (scripts/sglang_cpu/requirements.txt), under
#      a constraint that holds torch at 2.13.0 (scripts/sglang_cpu/constraints.txt);
#   4. the torchvision fix (scripts/sglang_cpu/patch_torchvision.py): the registry's torchvision is
#      linked against CUDA torch, so its CUDA-only operator registrations are skipped;
#   5. an import-only stand-in for sgl_kernel (scripts/sglang_cpu/sgl_kernel), which has no CPU build.
# The marker file <env>/.megatron_opd_ready is written last, only once the env imports the server;
# it holds a hash of these inputs, so a changed recipe rebuilds and a complete env is reused at once.
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
SGLANG_VERSION=0.5.23
TORCH_VERSION=2.13.0
ENV_DIR=${MEGATRON_OPD_SGLANG_ENV:-$HOME/.cache/megatron_opd/sglang-$SGLANG_VERSION}
PYTHON=${PYTHON:-python3}
RECIPE=scripts/sglang_cpu
MARKER="$ENV_DIR/.megatron_opd_ready"

fingerprint() {
    cat "$SELF" "$RECIPE/requirements.txt" "$RECIPE/constraints.txt" "$RECIPE/patch_torchvision.py" \
        "$RECIPE/sgl_kernel/__init__.py" | sha256sum | cut -c1-16
}
WANT=$(fingerprint)

is_ready() { [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$WANT" ] && [ -x "$ENV_DIR/bin/python" ]; }

mkdir -p "$(dirname "$ENV_DIR")"
# Several test runs may start at once on one machine: one builds, the others wait for it.
exec 9>"$ENV_DIR.lock"
flock 9
if is_ready; then
    echo "real-SGLang env: reusing $ENV_DIR" >&2
    echo "$ENV_DIR"
    exit 0
fi

start=$(date +%s)
echo "real-SGLang env: building $ENV_DIR (sglang $SGLANG_VERSION on CPU torch $TORCH_VERSION; 2-5 min)" >&2
rm -rf "$ENV_DIR"
"$PYTHON" -m venv "$ENV_DIR"
PY="$ENV_DIR/bin/python"
# Our constraint must be in force for every install (the machine-wide pip config may name another).
export PIP_CONSTRAINT="$PWD/$RECIPE/constraints.txt"
pip_install() {  # pip's own exit status counts; only this machine's noise about missing index dirs is dropped
    set +e
    "$PY" -m pip install -q --no-warn-script-location "$@" 2>&1 | grep -v -E "is ignored: it is neither|^sglang 0.5.23 requires|dependency resolver does not currently" >&2
    local rc=${PIPESTATUS[0]}
    set -e
    return "$rc"
}
pip_install "torch==$TORCH_VERSION"
pip_install --no-deps "sglang==$SGLANG_VERSION"
pip_install -r "$RECIPE/requirements.txt"
"$PY" "$RECIPE/patch_torchvision.py" >&2
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf "$SITE/sgl_kernel"
cp -r "$RECIPE/sgl_kernel" "$SITE/sgl_kernel"

# The torch must still be the CPU build we started from, and the server's modules must import.
"$PY" - "$TORCH_VERSION" "$SGLANG_VERSION" <<'EOF' >&2
import sys
import torch
import torchvision.transforms  # noqa: F401  (fails without the torchvision fix)
import sglang
import sglang.srt.entrypoints.http_server  # noqa: F401
import sglang.srt.managers.scheduler  # noqa: F401
import sglang_router.launch_router  # noqa: F401  (the router in front of remote workers)
import sglang_router
want_torch, want_sglang = sys.argv[1:]
assert torch.__version__.split("+")[0] == want_torch and not torch.version.cuda, torch.__version__
assert sglang.__version__ == want_sglang, sglang.__version__
assert sglang_router.__version__ == "0.3.2", sglang_router.__version__
print(f"real-SGLang env ok: sglang {sglang.__version__}, torch {torch.__version__}")
EOF
echo "$WANT" > "$MARKER"
echo "real-SGLang env: built in $(( $(date +%s) - start )) s, $(du -sh "$ENV_DIR" | cut -f1)" >&2
echo "$ENV_DIR"
