#!/usr/bin/env bash
# The paper's six-variant comparison (base, sampled, sampled+Block64, LSM, LSM+Block64,
# LSM+newline spans), each trained from the same student with the same step budget and seeds,
# then evaluated; writes RUN_DIR/variants.md (mean ± std over seeds) and the gate statistics.
#
# Usage: [VAR=value ...] bash examples/run_variants.sh [extra megatron-opd variants flags]
#   CPU (default): the embedded toy task of `megatron-opd demo` (teacher/student cached).
#   GPU: BASE_FLAGS=flags.json STUDENT_HF=/models/Qwen3-1.7B BENCHMARKS=aime24,aime25,math500,amc23
#        TRAIN_ITERS=200 NPROC=8 bash examples/run_variants.sh
#
# Environment variables (default in brackets):
#   PYTHON [.venv/bin/python if present, else python3]
#   RUN_DIR [runs/variants]   output directory
#   SEEDS [1,2,3]             comma-separated seeds
#   VARIANTS [unset]          JSON list of {"name", "flags"} (flags null = untrained student)
#   BASE_FLAGS [unset]        JSON of trainer flags for real runs (student/teacher/URLs/data)
#   STUDENT_HF [unset]        with BASE_FLAGS: the student every variant starts from
#   BENCHMARKS [toy]          benchmarks to evaluate on
#   DATA_DIR [unset]          local benchmark JSONL copies
#   TRAIN_ITERS [unset]       step budget override (the paper: 200)
#   NPROC [2]                 processes per training run
#   QUICK [0]                 1: tiny settings (pipeline check)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
args=(--workdir "${RUN_DIR:-runs/variants}" --seeds "${SEEDS:-1,2,3}" --benchmarks "${BENCHMARKS:-toy}"
      --nproc "${NPROC:-2}")
[ -n "${VARIANTS:-}" ] && args+=(--variants "$VARIANTS")
[ -n "${BASE_FLAGS:-}" ] && args+=(--base-flags "$BASE_FLAGS" --student-hf "${STUDENT_HF:?STUDENT_HF is required with BASE_FLAGS}")
[ -n "${DATA_DIR:-}" ] && args+=(--data-dir "$DATA_DIR")
[ -n "${TRAIN_ITERS:-}" ] && args+=(--train-iters "$TRAIN_ITERS")
[ "${QUICK:-0}" = "1" ] && args+=(--quick)
exec "$PYTHON" -m megatron_opd.cli variants "${args[@]}" "$@"
