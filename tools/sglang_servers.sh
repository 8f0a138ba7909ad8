#!/usr/bin/env bash
# Launch, health-wait and stop the SGLang servers megatron-opd talks to: student rollout
# workers (their weights are pushed by the trainer) and teacher scoring workers, each role
# optionally behind an sglang-router.
#
# Usage: tools/sglang_servers.sh COMMAND [ROLE...]     (ROLE: student, teacher; default both)
#   up      start the workers (and routers), wait for /health, print the endpoints
#   down    stop everything `up` started (SIGTERM to each process group, SIGKILL after a grace period)
#   wait    wait until every endpoint of the roles answers /health (or time out)
#   urls    print the endpoint(s) the trainer should use for ONE role, comma-separated:
#           student -> every worker (weight updates go to each worker directly, never a router);
#           teacher -> the router when there is one, else the worker(s)
#   status  show which started processes are alive
#   help    this text
#
# Layout: a role gets the GPUs listed in <ROLE>_GPUS and runs len(GPUS)/<ROLE>_TP workers, each on
# <ROLE>_TP consecutive GPUs of that list. Worker i listens on <ROLE>_PORT+1+i; the role's router
# (when used) on <ROLE>_PORT.
#
# Environment (default in brackets):
#   STUDENT_MODEL, TEACHER_MODEL   HF model directories to serve (needed by `up`)
#   STUDENT_GPUS [0], TEACHER_GPUS [1]           comma-separated GPU ids
#   STUDENT_TP [1], TEACHER_TP [1]               tensor-parallel size of each worker
#   STUDENT_MEM_FRACTION [0.85], TEACHER_MEM_FRACTION [0.85]   --mem-fraction-static
#   STUDENT_PORT [30000], TEACHER_PORT [31000]   router port; workers on PORT+1, PORT+2, ...
#   STUDENT_EXTRA_ARGS, TEACHER_EXTRA_ARGS [empty]   extra sglang.launch_server flags (word-split)
#   STUDENT_WEIGHT_UPDATE_ARGS [--weight-loader-disable-mmap]   flags for in-place weight updates
#                                  (no mmap: the trainer overwrites the files it hands to
#                                  /update_weights_from_disk); add --enable-memory-saver when
#                                  sharing GPUs with the trainer
#   ROUTER [auto]                  auto (router when a role has >1 worker) | always | never
#   ROUTER_POLICY [cache_aware]    sglang-router --policy
#   BIND_HOST [127.0.0.1]          address the servers listen on. Loopback by default: SGLang's
#                                  weight-loading endpoints (/update_weights_from_disk ...) have no
#                                  authentication. Set 0.0.0.0 (with a warning) only on a private
#                                  network when the trainer runs on another machine.
#   ADVERTISE_HOST [127.0.0.1 when BIND_HOST is loopback, else hostname]   host in the printed URLs
#   SGLANG_PYTHON [/opt/sglang/bin/python if present, else python3]   interpreter with sglang
#   SEED [1234]                    --random-seed of every worker
#   STATE_DIR [runs/sglang]        logs (<name>.log) and pid files of started processes
#   HEALTH_TIMEOUT [1200]          seconds to wait for all /health endpoints
#   HEALTH_INTERVAL [5]            seconds between polls
#   SHUTDOWN_TIMEOUT [30]          seconds between SIGTERM and SIGKILL on `down`
#   DRY_RUN [0]                    1: print the commands `up` would run, start nothing
set -euo pipefail

STUDENT_MODEL=${STUDENT_MODEL:-}
TEACHER_MODEL=${TEACHER_MODEL:-}
STUDENT_GPUS=${STUDENT_GPUS:-0}
TEACHER_GPUS=${TEACHER_GPUS:-1}
STUDENT_TP=${STUDENT_TP:-1}
TEACHER_TP=${TEACHER_TP:-1}
STUDENT_MEM_FRACTION=${STUDENT_MEM_FRACTION:-0.85}
TEACHER_MEM_FRACTION=${TEACHER_MEM_FRACTION:-0.85}
STUDENT_PORT=${STUDENT_PORT:-30000}
TEACHER_PORT=${TEACHER_PORT:-31000}
STUDENT_EXTRA_ARGS=${STUDENT_EXTRA_ARGS:-}
TEACHER_EXTRA_ARGS=${TEACHER_EXTRA_ARGS:-}
STUDENT_WEIGHT_UPDATE_ARGS=${STUDENT_WEIGHT_UPDATE_ARGS---weight-loader-disable-mmap}
ROUTER=${ROUTER:-auto}
ROUTER_POLICY=${ROUTER_POLICY:-cache_aware}
BIND_HOST=${BIND_HOST:-127.0.0.1}
case "$BIND_HOST" in
    127.*|localhost|::1) DEFAULT_ADVERTISE=127.0.0.1 ;;
    *) DEFAULT_ADVERTISE=$(hostname)
       echo "warning: BIND_HOST=$BIND_HOST exposes SGLang's unauthenticated weight-loading endpoints" \
            "to every machine that reaches these ports; use it only on a private network" >&2 ;;
esac
ADVERTISE_HOST=${ADVERTISE_HOST:-$DEFAULT_ADVERTISE}
SEED=${SEED:-1234}
STATE_DIR=${STATE_DIR:-runs/sglang}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-1200}
HEALTH_INTERVAL=${HEALTH_INTERVAL:-5}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-30}
DRY_RUN=${DRY_RUN:-0}
if [ -z "${SGLANG_PYTHON:-}" ]; then
    if [ -x /opt/sglang/bin/python ]; then SGLANG_PYTHON=/opt/sglang/bin/python; else SGLANG_PYTHON=python3; fi
fi

die() { echo "sglang_servers.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

# role_var ROLE NAME -> value of <ROLE>_<NAME> (e.g. role_var student TP -> $STUDENT_TP)
role_var() {
    local name
    name="$(echo "$1" | tr '[:lower:]' '[:upper:]')_$2"
    printf '%s' "${!name}"
}

# role_gpus ROLE -> GPU ids, one per line; validates the list against <ROLE>_TP
role_gpus() {
    local gpus tp count
    gpus=$(role_var "$1" GPUS)
    tp=$(role_var "$1" TP)
    [[ "$tp" =~ ^[1-9][0-9]*$ ]] || die "${1^^}_TP must be a positive integer, got '$tp'"
    [[ "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "${1^^}_GPUS must be comma-separated GPU ids, got '$gpus'"
    count=$(echo "$gpus" | tr ',' '\n' | wc -l)
    (( count % tp == 0 )) || die "${1^^}_GPUS has $count GPU(s), not a multiple of ${1^^}_TP=$tp"
    echo "$gpus" | tr ',' '\n'
}

num_workers() { echo $(( $(role_gpus "$1" | wc -l) / $(role_var "$1" TP) )); }

uses_router() {
    case "$ROUTER" in
        always) return 0 ;;
        never) return 1 ;;
        auto) (( $(num_workers "$1") > 1 )) ;;
        *) die "ROUTER must be auto, always or never, got '$ROUTER'" ;;
    esac
}

worker_port() { echo $(( $(role_var "$1" PORT) + 1 + $2 )); }

worker_urls() {
    local i n urls=()
    n=$(num_workers "$1")
    for (( i = 0; i < n; i++ )); do urls+=("http://$ADVERTISE_HOST:$(worker_port "$1" "$i")"); done
    (IFS=,; echo "${urls[*]}")
}

# trainer_urls ROLE -> what the trainer is given (see `urls` in the header)
trainer_urls() {
    if [ "$1" = teacher ] && uses_router teacher; then
        echo "http://$ADVERTISE_HOST:$TEACHER_PORT"
    else
        worker_urls "$1"
    fi
}

# worker_command ROLE INDEX -> the launch command, one word per line (for an array)
worker_command() {
    local role=$1 i=$2 tp model extra=() update=()
    tp=$(role_var "$role" TP)
    model=$(role_var "$role" MODEL)
    # several flags may sit in one variable: split on whitespace
    read -r -a extra <<< "$(role_var "$role" EXTRA_ARGS)"
    if [ "$role" = student ]; then read -r -a update <<< "$STUDENT_WEIGHT_UPDATE_ARGS"; fi
    printf '%s\n' "$SGLANG_PYTHON" -m sglang.launch_server --model-path "${model:-<${role^^}_MODEL>}" \
        --tp-size "$tp" --mem-fraction-static "$(role_var "$role" MEM_FRACTION)" \
        --host "$BIND_HOST" --port "$(worker_port "$role" "$i")" \
        --sampling-defaults openai --random-seed "$SEED" "${update[@]}" "${extra[@]}"
}

router_command() {
    local urls
    IFS=, read -r -a urls <<< "$(worker_urls "$1")"
    printf '%s\n' "$SGLANG_PYTHON" -m sglang_router.launch_router --host "$BIND_HOST" \
        --port "$(role_var "$1" PORT)" --policy "$ROUTER_POLICY" --worker-urls "${urls[@]}"
}

# worker_devices ROLE INDEX -> CUDA_VISIBLE_DEVICES of that worker
worker_devices() {
    local tp
    tp=$(role_var "$1" TP)
    role_gpus "$1" | sed -n "$(( $2 * tp + 1 )),$(( ($2 + 1) * tp ))p" | paste -sd, -
}

# launch NAME DEVICES CMD... : start CMD in its own session (so `down` can stop its whole tree)
launch() {
    local name=$1 devices=$2
    shift 2
    if [ "$DRY_RUN" = 1 ]; then
        if [ -n "$devices" ]; then printf 'CUDA_VISIBLE_DEVICES=%s ' "$devices"; fi
        printf '%q ' "$@"; printf '\n'  # shell-ready
        return
    fi
    mkdir -p "$STATE_DIR"
    CUDA_VISIBLE_DEVICES=$devices setsid "$@" > "$STATE_DIR/$name.log" 2>&1 < /dev/null &
    echo $! > "$STATE_DIR/$name.pid"
    echo "started $name (pid $!, GPUs $devices, log $STATE_DIR/$name.log)"
}

http_ok() {
    if command -v curl > /dev/null; then
        curl -sf -m 5 -o /dev/null "$1"
    else
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" 2> /dev/null
    fi
}

all_endpoints() {
    local role
    for role in "$@"; do
        worker_urls "$role" | tr ',' '\n'
        if uses_router "$role"; then echo "http://$ADVERTISE_HOST:$(role_var "$role" PORT)"; fi
    done
}

# dead_process -> name of a started process that has exited, if any
dead_process() {
    local pidfile
    for pidfile in "$STATE_DIR"/*.pid; do
        [ -e "$pidfile" ] || continue
        kill -0 "$(cat "$pidfile")" 2> /dev/null || { basename "$pidfile" .pid; return; }
    done
}

wait_healthy() {
    local deadline url pending dead
    deadline=$(( SECONDS + HEALTH_TIMEOUT ))
    while :; do
        pending=()
        for url in $(all_endpoints "$@"); do http_ok "$url/health" || pending+=("$url"); done
        [ "${#pending[@]}" -eq 0 ] && { echo "all SGLang endpoints healthy"; return 0; }
        dead=$(dead_process)
        if [ -n "$dead" ]; then
            tail -n 30 "$STATE_DIR/$dead.log" >&2 || true
            die "$dead exited before becoming healthy (log: $STATE_DIR/$dead.log)"
        fi
        (( SECONDS < deadline )) || die "timed out after ${HEALTH_TIMEOUT}s waiting for /health of: ${pending[*]}"
        sleep "$HEALTH_INTERVAL"
    done
}

start_role() {
    local role=$1 i n cmd
    [ -n "$(role_var "$role" MODEL)" ] || [ "$DRY_RUN" = 1 ] || die "${role^^}_MODEL is not set (HF model directory to serve)"
    n=$(num_workers "$role")
    for (( i = 0; i < n; i++ )); do
        mapfile -t cmd < <(worker_command "$role" "$i")
        launch "$role-$i" "$(worker_devices "$role" "$i")" "${cmd[@]}"
    done
    if uses_router "$role"; then
        mapfile -t cmd < <(router_command "$role")
        launch "$role-router" "" "${cmd[@]}"
    fi
}

stop_all() {
    local pidfile pid deadline
    for pidfile in "$STATE_DIR"/*.pid; do
        [ -e "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        # setsid made pid the group leader: signal the group so scheduler/detokenizer children stop too
        kill -TERM -- "-$pid" 2> /dev/null || true
        deadline=$(( SECONDS + SHUTDOWN_TIMEOUT ))
        while kill -0 "$pid" 2> /dev/null && (( SECONDS < deadline )); do sleep 1; done
        kill -KILL -- "-$pid" 2> /dev/null || true
        rm -f "$pidfile"
        echo "stopped $(basename "$pidfile" .pid) (pid $pid)"
    done
}

show_status() {
    local pidfile
    for pidfile in "$STATE_DIR"/*.pid; do
        [ -e "$pidfile" ] || { echo "no servers started from $STATE_DIR"; return; }
        if kill -0 "$(cat "$pidfile")" 2> /dev/null; then state=alive; else state=exited; fi
        echo "$(basename "$pidfile" .pid): $state (pid $(cat "$pidfile"))"
    done
}

main() {
    local command=${1:-help} role
    shift || true
    local roles=("$@")
    [ "${#roles[@]}" -gt 0 ] || roles=(student teacher)
    for role in "${roles[@]}"; do
        case "$role" in student|teacher) ;; *) die "unknown role '$role' (use student or teacher)" ;; esac
        role_gpus "$role" > /dev/null  # validate here: a die inside $(...) would only end a subshell
    done
    case "$command" in
        up)
            for role in "${roles[@]}"; do start_role "$role"; done
            [ "$DRY_RUN" = 1 ] || wait_healthy "${roles[@]}"
            for role in "${roles[@]}"; do echo "$role endpoints: $(trainer_urls "$role")"; done ;;
        down) stop_all ;;
        wait) wait_healthy "${roles[@]}" ;;
        urls)
            [ "${#roles[@]}" -eq 1 ] || die "urls takes exactly one role (student or teacher)"
            trainer_urls "${roles[0]}" ;;
        status) show_status ;;
        help|-h|--help) usage ;;
        *) usage >&2; die "unknown command '$command'" ;;
    esac
}

main "$@"
