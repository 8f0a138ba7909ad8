#!/usr/bin/env bash
# megatron-opd: on-policy distillation with the Block64 drift gate (arXiv 2606.24084 defaults).
#
# Usage: [VAR=value ...] bash examples/run_block64.sh [--help] [extra trainer flags...]
#
# What it runs:
#   * GPU cluster (a GPU is visible, or ROLLOUT_URLS / TEACHER_URLS are set, or MODE=train):
#       torchrun ... -m megatron_opd.cli train <flags from the variables below> [extra flags]
#     on every node (same command, its own NODE_RANK), against SGLang student rollout servers and
#     teacher servers (start them with tools/sglang_servers.sh, or START_SERVERS=1 on one node).
#   * No GPU and no SGLang endpoints (or MODE=demo): the embedded CPU demo,
#       $PYTHON -m megatron_opd.cli demo [extra flags]      (e.g. --quick)
#   * DRY_RUN=1: print the cluster plan (layout, SGLang endpoints, full torchrun command) and
#     start nothing, whatever this machine has (plan a cluster run from a login node).
# Extra arguments are appended to the trainer's flags (later flags win).
#
# Environment variables (default in brackets):
#  launch / layout
#   MODE [auto]            auto | train | demo (see above)
#   DRY_RUN [0]            1: print what would run and exit
#   PYTHON [.venv/bin/python if present, else python3]   interpreter for the trainer / demo
#   TORCHRUN [torchrun beside $PYTHON, else on PATH, else $PYTHON -m torch.distributed.run]
#   NNODES [1]             number of nodes
#   NODE_RANK [0]          this node's rank, 0..NNODES-1
#   MASTER_ADDR [127.0.0.1; required when NNODES>1]      rendezvous host (node 0)
#   MASTER_PORT [29500]    rendezvous port
#   GLOO_SOCKET_IFNAME [NNODES>1: this node's interface towards MASTER_ADDR (`ip route get`; on node 0
#                          the interface that holds MASTER_ADDR)]   network interface gloo binds to (the
#                          CPU process groups; the only ones on CPU). Unset, gloo binds to the address this
#                          node's hostname resolves to, often 127.0.0.1 (/etc/hosts): the other nodes then get
#                          "Connection refused ... remote=[127.0.0.1]" and node 0 waits until the timeout.
#                          Set it when the route to MASTER_ADDR is not the network the nodes share
#   MAX_RESTARTS [0]       torchrun --max-restarts N: when a trainer process dies, every node's agent restarts
#                          its processes (up to N times) and the job resumes from its last checkpoint in
#                          SAVE_DIR by itself. N>0 switches torchrun from its static rendezvous to the c10d
#                          one (--rdzv-backend c10d --rdzv-endpoint MASTER_ADDR:MASTER_PORT, node 0 hosts it):
#                          with the static one a restarted node reads its peers' stale addresses and fails.
#                          The nodes' ranks then follow their addresses (--local-addr, the address on
#                          GLOO_SOCKET_IFNAME), not NODE_RANK. A node that dies entirely (agent included):
#                          relaunch the same command on every node; the run resumes from the last checkpoint
#   RDZV_ID [megatron-opd] rendezvous id with MAX_RESTARTS>0 (the same on every node of one job)
#   GPUS_PER_NODE [GPUs listed by nvidia-smi, else 8]    trainer processes per node
#   TRAIN_GPUS [unset]     CUDA_VISIBLE_DEVICES for the trainer (e.g. 0,1,2,3 when the other GPUs
#                          serve SGLang); sets GPUS_PER_NODE to its length when that is unset.
#                          Unset means GPUs 0..GPUS_PER_NODE-1. With START_SERVERS=1 the trainer's
#                          GPUs, STUDENT_GPUS [0] and TEACHER_GPUS [1] must be disjoint (refused otherwise)
#   RECIPE [unset]         qwen3-30b-a3b: the MoE student recipe (slime's layout for 8 GPUs): STUDENT_HF
#                          [$MODELS_DIR/Qwen3-30B-A3B], TEACHER_HF [$MODELS_DIR/Qwen3-235B-A22B], TP [4] +
#                          SP, EP [8], ETP [1], MOE_ROUTER_DTYPE [fp32], MOE_AUX_LOSS_COEFF [0]; any of these
#                          variables set explicitly wins
#  parallelism (world size NNODES*GPUS_PER_NODE must be divisible by TP*PP*CP and by ETP*EP*PP; DP is the rest)
#   TP [1]                 --tensor-model-parallel-size
#   PP [1]                 --pipeline-model-parallel-size
#   VPP [unset]            --virtual-pipeline-model-parallel-size (needs PP>1)
#   CP [1]                 --context-parallel-size
#   SP [auto]              --sequence-parallel: auto = on when TP>1; 1 = on (needs TP>1); 0 = off
#   EP [1]                 --expert-model-parallel-size (MoE students: ranks splitting the experts)
#   ETP [unset: TP]        --expert-tensor-parallel-size (MoE students: ranks splitting each expert)
#   MOE_AUX_LOSS_COEFF [unset: 0]   --moe-aux-loss-coeff (load-balancing loss; RL/OPD runs use 0 or tiny)
#   MOE_ROUTER_DTYPE [unset: fp32]  --moe-router-dtype fp32 | fp64
#   MOE_TOKEN_DISPATCHER [unset: alltoall]   --moe-token-dispatcher-type alltoall | allgather
#   DISTRIBUTED_TIMEOUT_MINUTES [unset: trainer default, 60]   --distributed-timeout-minutes (every
#                          NCCL group; must outlast rank 0's evaluation / HF export)
#  models
#   MODELS_DIR [/models]   where the model directories live (the Docker image mounts it there)
#   STUDENT_HF [$MODELS_DIR/Qwen3-1.7B]       --student-hf (HF config + tokenizer of the student)
#   STUDENT_MCORE [$STUDENT_HF-mcore]         --load: Megatron dist checkpoint of the student, made
#                          once with tools/convert_hf_to_megatron.py (resharded on load for any TP/PP);
#                          set it empty to pass no --load
#   TEACHER_HF [$MODELS_DIR/Qwen3-8B]         teacher served by SGLang (used by START_SERVERS=1, and
#                          passed as --teacher-hf when TEACHER_URLS=local)
#   BF16 [1]               --bf16
#  SGLang endpoints (comma-separated URLs, or "local" for an in-process engine)
#   ROLLOUT_URLS [every student worker from tools/sglang_servers.sh on SGLANG_HOST]   --rollout-url
#   TEACHER_URLS [teacher router, or its worker, from tools/sglang_servers.sh]        --teacher-url
#   SGLANG_HOST [$MASTER_ADDR]   host of the servers when the URLs are not given
#   ROLLOUT_WORKER_URLS [unset]  --rollout-worker-urls: the workers behind a router given as ROLLOUT_URLS
#   WEIGHT_SYNC [disk]     --weight-sync: disk (RUN_DIR must be readable by every worker) or distributed
#                          (broadcast over NCCL from rank 0 to every worker; no shared storage needed)
#   START_SERVERS [0]      1: start the servers on this node first (tools/sglang_servers.sh up; its
#                          STUDENT_GPUS / TEACHER_GPUS / *_TP / *_PORT variables apply) and stop them
#                          on exit; single-node runs only
#  data
#   DATA_PATH [/data/math_train.jsonl]        --data-path (local JSONL/Parquet or a hub dataset name)
#   PROMPT_FIELD [problem]  ANSWER_FIELD [answer]   --prompt-field / --answer-field
#   MAX_PROMPT_LENGTH [1024]                  --max-prompt-length
#   CHAT_TEMPLATE [1]      1: --chat-template, 0: --no-chat-template
#   ENABLE_THINKING [0]    1: --enable-thinking
#   SPECIAL_TOKEN_MASK [auto]                 --special-token-mask (ids or auto)
#  OPD objective
#   OBJECTIVE [sampled]    --objective sampled | lsm | sft
#   TOPK [32]              --topk (teacher top-K for LSM; the paper's K=32)
#   LSM_TAIL [0]           1: --lsm-tail (K+1 bucket with the sampled token)
#   PPO_CLIP [unset]       --ppo-clip EPS
#   EPOCHS_PER_ROLLOUT [2] --epochs-per-rollout (the gating paper reuses each rollout twice)
#   MINIBATCHES_PER_ROLLOUT [unset]           --minibatches-per-rollout
#   LOGPROB_SOURCE [recompute]                --logprob-source recompute | engine
#  drift gate (Block64)
#   GATE [block]           --gate none | token | block | span | sequence
#   GATE_BLOCK_SIZE [64]   --gate-block-size
#   GATE_TAU [unset: trainer default]         --gate-tau
#   GATE_AGGREGATION [mean]                   --gate-aggregation mean | mean_abs | k3
#   GATE_FN [exp]          --gate-fn exp | clip
#   GATE_NORMALIZATION [mean]                 --gate-normalization mean | none | clipped | residual
#  rollouts
#   PROMPTS_PER_ROLLOUT [32]   --prompts-per-rollout
#   SAMPLES_PER_PROMPT [8]     --samples-per-prompt
#   TEMPERATURE [1.0]  TOP_P [0.9]  TOP_K [unset]   sampling (the paper: top-p 0.9 at temperature 1.0)
#   MAX_NEW_TOKENS [8192]      --max-new-tokens
#  optimisation
#   TRAIN_ITERS [200]      --train-iters (the paper trains every variant for 200 steps)
#   LR [1e-6]  MIN_LR [unset]  LR_WARMUP_ITERS [10]  LR_DECAY_STYLE [constant]
#   WEIGHT_DECAY [0.0]  CLIP_GRAD [1.0]  ADAM_BETA1 [0.9]  ADAM_BETA2 [0.98]
#   MICRO_BATCH_SIZE [1]   --micro-batch-size
#   SEED [1234]            --seed
#  saving, logging, eval
#   RUN_DIR [runs/block64] --run-dir
#   SAVE_DIR [$RUN_DIR/checkpoints]   --save      SAVE_INTERVAL [50]   KEEP_LAST [2]
#   SAVE_HF [unset]        --save-hf DIR (HF export of the final student)
#   LOG_INTERVAL [1]  EVAL_INTERVAL [50]  EVAL_BENCHMARKS [aime24,aime25,math500,amc23]
#   TENSORBOARD [1]        --tensorboard      WANDB_PROJECT [unset]   --wandb-project
#   EXTRA_ARGS [unset]     more trainer flags (word-split), before the command-line arguments
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "run_block64.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

# has_gpu: nvidia-smi lists a GPU, or torch sees CUDA (host-device query)
has_gpu() {
    if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L 2> /dev/null | grep -q '^GPU'; then
        return 0
    fi
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2> /dev/null
}

count_gpus() {
    if [ -n "${TRAIN_GPUS:-}" ]; then echo "$TRAIN_GPUS" | tr ',' '\n' | grep -c .; return; fi
    if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L 2> /dev/null | grep -q '^GPU'; then
        nvidia-smi -L | grep -c '^GPU'
        return
    fi
    echo 8
}

# apply_recipe: a named recipe's defaults (variables the user set explicitly win)
apply_recipe() {
    case "${RECIPE:-}" in
        "") ;;
        qwen3-30b-a3b)
            MODELS_DIR=${MODELS_DIR:-/models}
            STUDENT_HF=${STUDENT_HF:-$MODELS_DIR/Qwen3-30B-A3B}; TEACHER_HF=${TEACHER_HF:-$MODELS_DIR/Qwen3-235B-A22B}
            TP=${TP:-4}; SP=${SP:-1}; EP=${EP:-8}; ETP=${ETP:-1}
            MOE_ROUTER_DTYPE=${MOE_ROUTER_DTYPE:-fp32}; MOE_AUX_LOSS_COEFF=${MOE_AUX_LOSS_COEFF:-0} ;;
        *) die "RECIPE must be empty or qwen3-30b-a3b, got '$RECIPE'" ;;
    esac
}

set_defaults() {
    apply_recipe
    if [ -z "${PYTHON:-}" ]; then
        if [ -x "$REPO_ROOT/.venv/bin/python" ]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
    fi
    MODE=${MODE:-auto}; DRY_RUN=${DRY_RUN:-0}; START_SERVERS=${START_SERVERS:-0}
    NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}; MASTER_PORT=${MASTER_PORT:-29500}
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; GPUS_PER_NODE=${GPUS_PER_NODE:-$(count_gpus)}
    GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-}; MAX_RESTARTS=${MAX_RESTARTS:-0}; RDZV_ID=${RDZV_ID:-megatron-opd}
    TP=${TP:-1}; PP=${PP:-1}; VPP=${VPP:-}; CP=${CP:-1}; SP=${SP:-auto}
    EP=${EP:-1}; ETP=${ETP:-}; MOE_AUX_LOSS_COEFF=${MOE_AUX_LOSS_COEFF:-}; MOE_ROUTER_DTYPE=${MOE_ROUTER_DTYPE:-}
    MOE_TOKEN_DISPATCHER=${MOE_TOKEN_DISPATCHER:-}
    DISTRIBUTED_TIMEOUT_MINUTES=${DISTRIBUTED_TIMEOUT_MINUTES:-}
    MODELS_DIR=${MODELS_DIR:-/models}; STUDENT_HF=${STUDENT_HF:-$MODELS_DIR/Qwen3-1.7B}
    STUDENT_MCORE=${STUDENT_MCORE-$STUDENT_HF-mcore}; TEACHER_HF=${TEACHER_HF:-$MODELS_DIR/Qwen3-8B}
    BF16=${BF16:-1}; SGLANG_HOST=${SGLANG_HOST:-$MASTER_ADDR}
    ROLLOUT_WORKER_URLS=${ROLLOUT_WORKER_URLS:-}; WEIGHT_SYNC=${WEIGHT_SYNC:-}
    DATA_PATH=${DATA_PATH:-/data/math_train.jsonl}; PROMPT_FIELD=${PROMPT_FIELD:-problem}
    ANSWER_FIELD=${ANSWER_FIELD:-answer}; MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-1024}
    CHAT_TEMPLATE=${CHAT_TEMPLATE:-1}; ENABLE_THINKING=${ENABLE_THINKING:-0}
    SPECIAL_TOKEN_MASK=${SPECIAL_TOKEN_MASK:-auto}
    OBJECTIVE=${OBJECTIVE:-sampled}; TOPK=${TOPK:-32}; LSM_TAIL=${LSM_TAIL:-0}; PPO_CLIP=${PPO_CLIP:-}
    EPOCHS_PER_ROLLOUT=${EPOCHS_PER_ROLLOUT:-2}; MINIBATCHES_PER_ROLLOUT=${MINIBATCHES_PER_ROLLOUT:-}
    LOGPROB_SOURCE=${LOGPROB_SOURCE:-recompute}
    GATE=${GATE:-block}; GATE_BLOCK_SIZE=${GATE_BLOCK_SIZE:-64}; GATE_TAU=${GATE_TAU:-}
    GATE_AGGREGATION=${GATE_AGGREGATION:-mean}; GATE_FN=${GATE_FN:-exp}
    GATE_NORMALIZATION=${GATE_NORMALIZATION:-mean}
    PROMPTS_PER_ROLLOUT=${PROMPTS_PER_ROLLOUT:-32}; SAMPLES_PER_PROMPT=${SAMPLES_PER_PROMPT:-8}
    TEMPERATURE=${TEMPERATURE:-1.0}; TOP_P=${TOP_P:-0.9}; TOP_K=${TOP_K:-}
    MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-8192}
    TRAIN_ITERS=${TRAIN_ITERS:-200}; LR=${LR:-1e-6}; MIN_LR=${MIN_LR:-}; LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-10}
    LR_DECAY_STYLE=${LR_DECAY_STYLE:-constant}; WEIGHT_DECAY=${WEIGHT_DECAY:-0.0}; CLIP_GRAD=${CLIP_GRAD:-1.0}
    ADAM_BETA1=${ADAM_BETA1:-0.9}; ADAM_BETA2=${ADAM_BETA2:-0.98}
    MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}; SEED=${SEED:-1234}
    RUN_DIR=${RUN_DIR:-runs/block64}; SAVE_DIR=${SAVE_DIR:-$RUN_DIR/checkpoints}
    SAVE_INTERVAL=${SAVE_INTERVAL:-50}; KEEP_LAST=${KEEP_LAST:-2}; SAVE_HF=${SAVE_HF:-}
    LOG_INTERVAL=${LOG_INTERVAL:-1}; EVAL_INTERVAL=${EVAL_INTERVAL:-50}
    EVAL_BENCHMARKS=${EVAL_BENCHMARKS:-aime24,aime25,math500,amc23}
    TENSORBOARD=${TENSORBOARD:-1}; WANDB_PROJECT=${WANDB_PROJECT:-}; EXTRA_ARGS=${EXTRA_ARGS:-}
}

require_int() {  # require_int NAME MIN
    local value=${!1}
    if ! [[ "$value" =~ ^[0-9]+$ ]] || (( value < $2 )); then die "$1 must be an integer >= $2, got '$value'"; fi
}

validate_layout() {
    local name world model_parallel expert_parallel
    for name in NNODES GPUS_PER_NODE TP PP CP EP MASTER_PORT; do require_int "$name" 1; done
    require_int NODE_RANK 0; require_int MAX_RESTARTS 0
    (( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
    if (( NNODES > 1 )) && [[ "$MASTER_ADDR" =~ ^(127\.|localhost$) ]]; then
        die "NNODES=$NNODES needs MASTER_ADDR set to node 0's address reachable from every node (got '$MASTER_ADDR')"
    fi
    world=$(( NNODES * GPUS_PER_NODE )); model_parallel=$(( TP * PP * CP ))
    (( world % model_parallel == 0 )) || die "world size $world (NNODES=$NNODES x GPUS_PER_NODE=$GPUS_PER_NODE) is not divisible by TP*PP*CP = $TP*$PP*$CP = $model_parallel; change TP, PP or CP"
    DP=$(( world / model_parallel ))
    if [ -n "$ETP" ]; then require_int ETP 1; fi
    expert_parallel=$(( ${ETP:-$TP} * EP * PP ))
    (( world % expert_parallel == 0 )) || die "world size $world is not divisible by ETP*EP*PP = ${ETP:-$TP}*$EP*$PP = $expert_parallel (ETP defaults to TP); change EP or set ETP (e.g. ETP=1)"
    if [ -n "$VPP" ]; then
        require_int VPP 1
        (( PP > 1 )) || die "VPP=$VPP needs pipeline parallelism (PP>1), got PP=$PP"
    fi
    case "$SP" in
        auto) if (( TP > 1 )); then SP=1; else SP=0; fi ;;
        1) (( TP > 1 )) || die "SP=1 (sequence parallel) needs TP>1, got TP=$TP" ;;
        0) ;;
        *) die "SP must be auto, 0 or 1, got '$SP'" ;;
    esac
}

# interface_towards ADDR -> the network interface this node reaches ADDR (a name or an IPv4 address)
# through: the interface holding ADDR when it is this node's own address (node 0; `ip route get` would say
# "lo" there), else the one `ip route get` picks. Prints nothing when it cannot tell.
interface_towards() {
    local addr=$1 dev
    command -v ip > /dev/null 2>&1 || return 0
    if ! [[ "$addr" =~ ^[0-9.]+$ ]]; then
        addr=$(getent ahostsv4 "$addr" 2> /dev/null | awk 'NR == 1 {print $1}')
        [ -n "$addr" ] || return 0
    fi
    dev=$(ip -o -4 addr show to "$addr/32" 2> /dev/null | awk 'NR == 1 {print $2}')
    if [ -z "$dev" ]; then dev=$(ip -o route get "$addr" 2> /dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p'); fi
    echo "$dev"
}

# choose_gloo_interface: on multi-node runs, gloo must bind to the network the nodes share (see
# GLOO_SOCKET_IFNAME above); keep the user's choice, else derive it from the route to MASTER_ADDR
choose_gloo_interface() {
    GLOO_IFNAME_SOURCE="set by the caller"
    if [ -n "$GLOO_SOCKET_IFNAME" ] || (( NNODES == 1 )); then return 0; fi
    GLOO_SOCKET_IFNAME=$(interface_towards "$MASTER_ADDR")
    GLOO_IFNAME_SOURCE="this node's route to MASTER_ADDR=$MASTER_ADDR; each node derives its own at launch"
    if [ -n "$GLOO_SOCKET_IFNAME" ] && [ "$DRY_RUN" != 1 ]; then
        echo "run_block64.sh: GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME (the interface towards MASTER_ADDR=$MASTER_ADDR)" >&2
    fi
    if [ -z "$GLOO_SOCKET_IFNAME" ]; then
        GLOO_IFNAME_SOURCE="not found here (no route to MASTER_ADDR=$MASTER_ADDR); gloo falls back to the address of \`hostname\`"
        if [ "$DRY_RUN" != 1 ]; then
            echo "run_block64.sh: warning: found no interface that reaches MASTER_ADDR=$MASTER_ADDR; gloo will bind to the address '$(hostname)' resolves to, and fails if that is 127.0.0.1. Set GLOO_SOCKET_IFNAME to the interface the nodes share." >&2
        fi
    fi
}

# node_address -> this node's IPv4 address on GLOO_SOCKET_IFNAME (MASTER_ADDR on one node); empty if unknown
node_address() {
    if (( NNODES == 1 )); then echo "$MASTER_ADDR"; return; fi
    [ -n "$GLOO_SOCKET_IFNAME" ] && command -v ip > /dev/null 2>&1 || return 0
    ip -o -4 addr show dev "$GLOO_SOCKET_IFNAME" 2> /dev/null | awk 'NR == 1 {split($4, a, "/"); print a[1]}'
}

# gpu_ids LIST -> one GPU id per line (LIST is comma-separated)
gpu_ids() { echo "$1" | tr ',' '\n' | grep .; }

# check_gpu_split: with START_SERVERS=1 the servers this node starts and the trainer must not share a
# GPU (the SGLang KV cache reserves most of a GPU's memory; the trainer would then run out of it)
check_gpu_split() {
    local train student teacher id shared=() free=()
    if [ -n "${TRAIN_GPUS:-}" ]; then
        [[ "$TRAIN_GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "TRAIN_GPUS must be comma-separated GPU ids, got '$TRAIN_GPUS'"
        (( $(gpu_ids "$TRAIN_GPUS" | wc -l) == GPUS_PER_NODE )) \
            || die "GPUS_PER_NODE=$GPUS_PER_NODE but TRAIN_GPUS=$TRAIN_GPUS lists $(gpu_ids "$TRAIN_GPUS" | wc -l) GPU(s); make them agree (or unset GPUS_PER_NODE)"
    fi
    [ "$START_SERVERS" = 1 ] || return 0
    train=${TRAIN_GPUS:-$(seq -s, 0 $(( GPUS_PER_NODE - 1 )))}
    student=${STUDENT_GPUS:-0}; teacher=${TEACHER_GPUS:-1}
    for id in $(gpu_ids "$student"); do
        if gpu_ids "$teacher" | grep -qx "$id"; then
            die "STUDENT_GPUS=$student and TEACHER_GPUS=$teacher share GPU $id; give each server role its own GPUs"
        fi
    done
    for id in $(gpu_ids "$train"); do
        if gpu_ids "$student,$teacher" | grep -qx "$id"; then shared+=("$id"); fi
    done
    (( ${#shared[@]} == 0 )) && return 0
    # the node's GPUs: as many as the trainer asked for, or up to the highest id any list names
    local node_gpus
    node_gpus=$(gpu_ids "$train,$student,$teacher" | sort -n | tail -1)
    node_gpus=$(( node_gpus + 1 > GPUS_PER_NODE ? node_gpus + 1 : GPUS_PER_NODE ))
    for id in $(seq 0 $(( node_gpus - 1 ))); do
        if ! gpu_ids "$student,$teacher" | grep -qx "$id"; then free+=("$id"); fi
    done
    die "the trainer's GPUs (TRAIN_GPUS=${TRAIN_GPUS:-unset: 0..$(( GPUS_PER_NODE - 1 ))}) overlap the SGLang servers' (STUDENT_GPUS=$student, TEACHER_GPUS=$teacher) on GPU(s) $(IFS=,; echo "${shared[*]}"); set TRAIN_GPUS to GPUs the servers do not use, e.g. TRAIN_GPUS=$(IFS=,; echo "${free[*]}")"
}

# server_urls ROLE -> endpoints tools/sglang_servers.sh gives the trainer for ROLE on SGLANG_HOST
server_urls() {
    ADVERTISE_HOST="$SGLANG_HOST" bash "$REPO_ROOT/tools/sglang_servers.sh" urls "$1"
}

resolve_endpoints() {
    ROLLOUT_URLS=${ROLLOUT_URLS:-$(server_urls student)}
    TEACHER_URLS=${TEACHER_URLS:-$(server_urls teacher)}
}

# flag NAME VALUE: append "--NAME VALUE" to TRAIN_ARGS unless VALUE is empty
flag() { if [ -n "$2" ]; then TRAIN_ARGS+=("--$1" "$2"); fi; }
# switch NAME VALUE: append "--NAME" when VALUE is 1
switch() { if [ "$2" = 1 ]; then TRAIN_ARGS+=("--$1"); fi; }

build_train_args() {
    TRAIN_ARGS=()
    flag tensor-model-parallel-size "$TP"; flag pipeline-model-parallel-size "$PP"
    flag virtual-pipeline-model-parallel-size "$VPP"; flag context-parallel-size "$CP"
    switch sequence-parallel "$SP"; flag distributed-timeout-minutes "$DISTRIBUTED_TIMEOUT_MINUTES"
    if (( EP > 1 )); then flag expert-model-parallel-size "$EP"; fi
    flag expert-tensor-parallel-size "$ETP"; flag moe-aux-loss-coeff "$MOE_AUX_LOSS_COEFF"
    flag moe-router-dtype "$MOE_ROUTER_DTYPE"; flag moe-token-dispatcher-type "$MOE_TOKEN_DISPATCHER"
    flag student-hf "$STUDENT_HF"; flag load "$STUDENT_MCORE"; switch bf16 "$BF16"
    if [ "$TEACHER_URLS" = local ]; then flag teacher-hf "$TEACHER_HF"; fi
    flag rollout-url "$ROLLOUT_URLS"; flag teacher-url "$TEACHER_URLS"
    flag rollout-worker-urls "$ROLLOUT_WORKER_URLS"; flag weight-sync "$WEIGHT_SYNC"
    flag data-path "$DATA_PATH"; flag prompt-field "$PROMPT_FIELD"; flag answer-field "$ANSWER_FIELD"
    flag max-prompt-length "$MAX_PROMPT_LENGTH"
    if [ "$CHAT_TEMPLATE" = 1 ]; then TRAIN_ARGS+=(--chat-template); else TRAIN_ARGS+=(--no-chat-template); fi
    switch enable-thinking "$ENABLE_THINKING"; flag special-token-mask "$SPECIAL_TOKEN_MASK"
    flag objective "$OBJECTIVE"; flag topk "$TOPK"; switch lsm-tail "$LSM_TAIL"; flag ppo-clip "$PPO_CLIP"
    flag epochs-per-rollout "$EPOCHS_PER_ROLLOUT"; flag minibatches-per-rollout "$MINIBATCHES_PER_ROLLOUT"
    flag logprob-source "$LOGPROB_SOURCE"
    flag gate "$GATE"; flag gate-block-size "$GATE_BLOCK_SIZE"; flag gate-tau "$GATE_TAU"
    flag gate-aggregation "$GATE_AGGREGATION"; flag gate-fn "$GATE_FN"
    flag gate-normalization "$GATE_NORMALIZATION"
    flag prompts-per-rollout "$PROMPTS_PER_ROLLOUT"; flag samples-per-prompt "$SAMPLES_PER_PROMPT"
    flag temperature "$TEMPERATURE"; flag top-p "$TOP_P"; flag top-k "$TOP_K"
    flag max-new-tokens "$MAX_NEW_TOKENS"
    flag train-iters "$TRAIN_ITERS"; flag lr "$LR"; flag min-lr "$MIN_LR"
    flag lr-warmup-iters "$LR_WARMUP_ITERS"; flag lr-decay-style "$LR_DECAY_STYLE"
    flag weight-decay "$WEIGHT_DECAY"; flag clip-grad "$CLIP_GRAD"
    flag adam-beta1 "$ADAM_BETA1"; flag adam-beta2 "$ADAM_BETA2"
    flag micro-batch-size "$MICRO_BATCH_SIZE"; flag seed "$SEED"
    flag run-dir "$RUN_DIR"; flag save "$SAVE_DIR"; flag save-interval "$SAVE_INTERVAL"
    flag keep-last "$KEEP_LAST"; flag save-hf "$SAVE_HF"
    flag log-interval "$LOG_INTERVAL"; flag eval-interval "$EVAL_INTERVAL"
    flag eval-benchmarks "$EVAL_BENCHMARKS"; switch tensorboard "$TENSORBOARD"
    flag wandb-project "$WANDB_PROJECT"
    local extra=()
    read -r -a extra <<< "$EXTRA_ARGS"
    TRAIN_ARGS+=("${extra[@]}")
}

build_command() {
    local launcher=()
    if [ -n "${TORCHRUN:-}" ]; then
        read -r -a launcher <<< "$TORCHRUN"
    elif [ -x "$(dirname "$PYTHON")/torchrun" ]; then
        launcher=("$(dirname "$PYTHON")/torchrun")
    elif command -v torchrun > /dev/null 2>&1; then
        launcher=(torchrun)
    else
        launcher=("$PYTHON" -m torch.distributed.run)
    fi
    COMMAND=("${launcher[@]}" --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE")
    if (( MAX_RESTARTS == 0 )); then
        COMMAND+=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
    else
        # c10d rendezvous (see MAX_RESTARTS): node 0 hosts it; each node names its own address, since a
        # hostname that resolves to 127.0.0.1 would send the other nodes to their own loopback
        local is_host=0 address
        if (( NODE_RANK == 0 )); then is_host=1; fi
        address=$(node_address)
        COMMAND+=(--max-restarts "$MAX_RESTARTS" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
                  --rdzv-id "$RDZV_ID" --rdzv-conf "is_host=$is_host")
        if [ -n "$address" ]; then COMMAND+=(--local-addr "$address"); fi
    fi
    COMMAND+=(-m megatron_opd.cli train "${TRAIN_ARGS[@]}" "$@")
}

# print_words WORD...: one shell-ready line; quotes only words that need it (printf %q would escape commas)
print_words() {
    local word out=()
    for word in "$@"; do
        if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$word"); else out+=("$(printf '%q' "$word")"); fi
    done
    echo "${out[*]}"
}

print_plan() {
    echo "# megatron-opd Block64 run plan (DRY_RUN=1: nothing was started)"
    echo "layout: NNODES=$NNODES GPUS_PER_NODE=$GPUS_PER_NODE world=$(( NNODES * GPUS_PER_NODE ))" \
         "TP=$TP PP=$PP VPP=${VPP:-none} CP=$CP SP=$SP EP=$EP ETP=${ETP:-$TP} -> DP=$DP; node rank $NODE_RANK, master $MASTER_ADDR:$MASTER_PORT"
    if (( NNODES > 1 )); then echo "gloo interface: GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-unset} ($GLOO_IFNAME_SOURCE)"; fi
    echo "rollout (student) SGLang endpoints: $ROLLOUT_URLS"
    echo "teacher SGLang endpoints: $TEACHER_URLS"
    if [ "$START_SERVERS" = 1 ]; then
        echo "servers this node would start first (tools/sglang_servers.sh up):"
        STUDENT_MODEL=$STUDENT_HF TEACHER_MODEL=$TEACHER_HF ADVERTISE_HOST=$SGLANG_HOST DRY_RUN=1 \
            bash "$REPO_ROOT/tools/sglang_servers.sh" up | sed 's/^/  /'
    fi
    echo "trainer command (run on every node with its own NODE_RANK):"
    if [ -n "${TRAIN_GPUS:-}" ]; then printf 'CUDA_VISIBLE_DEVICES=%s ' "$TRAIN_GPUS"; fi
    if [ -n "$GLOO_SOCKET_IFNAME" ]; then printf 'GLOO_SOCKET_IFNAME=%s ' "$GLOO_SOCKET_IFNAME"; fi
    if (( MAX_RESTARTS > 0 )); then printf 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 '; fi
    print_words "${COMMAND[@]}"
}

start_servers() {
    (( NNODES == 1 )) || die "START_SERVERS=1 is for single-node runs; on clusters start tools/sglang_servers.sh on the server nodes"
    export STUDENT_MODEL=$STUDENT_HF TEACHER_MODEL=$TEACHER_HF ADVERTISE_HOST=$SGLANG_HOST
    trap 'bash "$REPO_ROOT/tools/sglang_servers.sh" down' EXIT
    trap 'exit 130' INT TERM  # turn signals into an exit so the EXIT trap stops the servers
    bash "$REPO_ROOT/tools/sglang_servers.sh" up
}

check_inputs() {
    [ -d "$STUDENT_HF" ] || die "STUDENT_HF=$STUDENT_HF is not a directory (HF config + tokenizer of the student)"
    if [ -n "$STUDENT_MCORE" ] && [ ! -e "$STUDENT_MCORE" ]; then
        die "STUDENT_MCORE=$STUDENT_MCORE does not exist: convert the student once with
  $PYTHON tools/convert_hf_to_megatron.py --hf-dir $STUDENT_HF --save $STUDENT_MCORE
or set STUDENT_MCORE= to pass no --load"
    fi
}

run_train() {
    cd "$REPO_ROOT"
    "$PYTHON" -m megatron_opd.versions || true  # prints pins vs installed; the trainer warns again
    if [ "$START_SERVERS" = 1 ]; then start_servers; fi
    check_inputs
    if [ -n "${TRAIN_GPUS:-}" ]; then export CUDA_VISIBLE_DEVICES=$TRAIN_GPUS; fi
    if [ -n "$GLOO_SOCKET_IFNAME" ]; then export GLOO_SOCKET_IFNAME; fi
    # a fresh store per restart round: the shared one keeps the previous round's addresses (torch 2.13)
    if (( MAX_RESTARTS > 0 )); then export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; fi
    "${COMMAND[@]}"
}

main() {
    case "${1:-}" in -h|--help) usage; exit 0 ;; esac
    set_defaults
    case "$MODE" in
        auto|train|demo) ;;
        *) die "MODE must be auto, train or demo, got '$MODE'" ;;
    esac
    if [ "$DRY_RUN" != 1 ] && { [ "$MODE" = demo ] || { [ "$MODE" = auto ] && [ -z "${ROLLOUT_URLS:-}" ] \
            && [ -z "${TEACHER_URLS:-}" ] && ! has_gpu; }; }; then
        echo "run_block64.sh: no GPU and no SGLang endpoints: running the embedded CPU demo" >&2
        cd "$REPO_ROOT"
        exec "$PYTHON" -m megatron_opd.cli demo "$@"
    fi
    validate_layout
    choose_gloo_interface
    check_gpu_split
    resolve_endpoints
    build_train_args
    build_command "$@"
    if [ "$DRY_RUN" = 1 ]; then print_plan; else run_train; fi
}

main "$@"
