"""examples/run_block64.sh (DRY_RUN plan, --help, layout checks, CPU-demo fallback) and
tools/sglang_servers.sh (layout, endpoints, start / health-wait / stop with stand-in servers)."""

import ast
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "examples" / "run_block64.sh"
SERVERS = REPO / "tools" / "sglang_servers.sh"
ACCEPTANCE_ENV = {"DRY_RUN": "1", "NNODES": "2", "NODE_RANK": "0", "GPUS_PER_NODE": "8", "MASTER_ADDR": "node0"}
# variables a caller may have exported that would change the plan
_LAUNCH_VARS = re.compile(r"^(TP|PP|VPP|CP|SP|NNODES|NODE_RANK|MASTER_ADDR|MASTER_PORT|GPUS_PER_NODE|TRAIN_GPUS|"
                          r"ROLLOUT_URLS|TEACHER_URLS|MODE|DRY_RUN|START_SERVERS|EXTRA_ARGS|TORCHRUN|PYTHON|"
                          r"(STUDENT|TEACHER)_\w+|GATE\w*|RUN_DIR|SGLANG_\w+|ROUTER\w*|ADVERTISE_HOST|DISTRIBUTED_\w+|EP|ETP|"
                          r"MOE_\w+|RECIPE|MODELS_DIR|GLOO_SOCKET_IFNAME|MAX_RESTARTS|RDZV_ID)$")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not _LAUNCH_VARS.match(k)}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _run(script, *args, env=None, timeout=60):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env or _env(),
                          cwd=REPO, timeout=timeout)


def _plan(**extra):
    result = _run(LAUNCHER, env=_env(**{**ACCEPTANCE_ENV, **extra}))
    assert result.returncode == 0, result.stderr
    return result.stdout


def _torchrun_words(plan: str) -> list[str]:
    lines = plan.strip().splitlines()
    header = lines.index("trainer command (run on every node with its own NODE_RANK):")
    return shlex.split(lines[header + 1])


def _value(words, flag):
    assert words.count(flag) == 1, f"{flag} appears {words.count(flag)} times"
    return words[words.index(flag) + 1]


def test_acceptance_dry_run_prints_torchrun_and_endpoints():
    plan = _plan()
    words = _torchrun_words(plan)
    assert Path(words[0]).name == "torchrun" or words[1:3] == ["-m", "torch.distributed.run"]
    assert (_value(words, "--nnodes"), _value(words, "--node-rank"), _value(words, "--nproc-per-node")) == ("2", "0", "8")
    assert (_value(words, "--master-addr"), _value(words, "--master-port")) == ("node0", "29500")
    module = words.index("-m", 1 if Path(words[0]).name == "torchrun" else 3)
    assert words[module:module + 3] == ["-m", "megatron_opd.cli", "train"]
    assert (_value(words, "--tensor-model-parallel-size"), _value(words, "--pipeline-model-parallel-size"),
            _value(words, "--context-parallel-size")) == ("1", "1", "1")
    assert "world=16" in plan and "DP=16" in plan
    assert "rollout (student) SGLang endpoints: http://node0:30001" in plan
    assert "teacher SGLang endpoints: http://node0:31001" in plan
    assert _value(words, "--rollout-url") == "http://node0:30001"
    assert _value(words, "--teacher-url") == "http://node0:31001"


def test_paper_defaults():
    words = _torchrun_words(_plan())
    expected = {"--gate": "block", "--gate-block-size": "64", "--epochs-per-rollout": "2", "--top-p": "0.9",
                "--temperature": "1.0", "--topk": "32", "--train-iters": "200"}
    assert {flag: _value(words, flag) for flag in expected} == expected


def test_dry_run_starts_nothing_even_without_models(tmp_path):
    plan = _plan(MODELS_DIR=str(tmp_path / "absent"), RUN_DIR=str(tmp_path / "run"))
    assert "nothing was started" in plan and not (tmp_path / "run").exists()


def test_parallel_layout_flags_and_dp():
    plan = _plan(TP="2", PP="2", VPP="3", CP="2")
    words = _torchrun_words(plan)
    assert _value(words, "--tensor-model-parallel-size") == "2"
    assert _value(words, "--pipeline-model-parallel-size") == "2"
    assert _value(words, "--virtual-pipeline-model-parallel-size") == "3"
    assert _value(words, "--context-parallel-size") == "2"
    assert "--sequence-parallel" in words  # SP=auto turns on with TP>1
    assert "DP=2" in plan  # 16 / (2*2*2)
    assert "--sequence-parallel" not in _torchrun_words(_plan(TP="2", SP="0"))


@pytest.mark.parametrize("extra, message", [
    ({"TP": "3"}, "world size 16 (NNODES=2 x GPUS_PER_NODE=8) is not divisible by TP*PP*CP = 3*1*1 = 3"),
    ({"TP": "4", "PP": "2", "CP": "4"}, "is not divisible by TP*PP*CP = 4*2*4 = 32"),
    ({"NODE_RANK": "2"}, "NODE_RANK=2 must be below NNODES=2"),
    ({"MASTER_ADDR": "127.0.0.1"}, "NNODES=2 needs MASTER_ADDR"),
    ({"VPP": "2"}, "VPP=2 needs pipeline parallelism (PP>1)"),
    ({"SP": "1"}, "SP=1 (sequence parallel) needs TP>1"),
    ({"GPUS_PER_NODE": "eight"}, "GPUS_PER_NODE must be an integer >= 1, got 'eight'"),
    ({"MODE": "fast"}, "MODE must be auto, train or demo"),
])
def test_bad_layout_is_refused_with_a_clear_error(extra, message):
    result = _run(LAUNCHER, env=_env(**{**ACCEPTANCE_ENV, **extra}))
    assert result.returncode != 0 and "torchrun" not in result.stdout
    assert message in result.stderr


def test_qwen3_30b_a3b_recipe_layout():
    """slime's Qwen3-30B-A3B layout on 8 GPUs: TP4 + SP for attention, EP8 with unsplit experts (ETP1)."""
    env = dict(ACCEPTANCE_ENV, NNODES="1", MASTER_ADDR="127.0.0.1", RECIPE="qwen3-30b-a3b",
               ROLLOUT_URLS="http://srv0:30001", TEACHER_URLS="http://srv1:31000")
    plan = _plan(**env)
    words = _torchrun_words(plan)
    assert _value(words, "--tensor-model-parallel-size") == "4" and "--sequence-parallel" in words
    assert _value(words, "--expert-model-parallel-size") == "8"
    assert _value(words, "--expert-tensor-parallel-size") == "1"
    assert _value(words, "--student-hf") == "/models/Qwen3-30B-A3B" and "EP=8 ETP=1 -> DP=2" in plan
    assert _value(_torchrun_words(_plan(**env, EP="4")), "--expert-model-parallel-size") == "4"  # user wins
    result = _run(LAUNCHER, env=_env(**{**env, "ETP": "4"}))  # 4*8 expert ranks do not fit 8 GPUs
    assert result.returncode != 0 and "not divisible by ETP*EP*PP = 4*8*1 = 32" in result.stderr
    assert "--expert-model-parallel-size" not in _torchrun_words(_plan())  # dense default: no MoE flags


def test_multi_node_gloo_interface_is_kept_or_explained():
    # node0 does not resolve here: the plan says so (each node derives its own interface at launch)
    assert "GLOO_SOCKET_IFNAME=unset (not found here (no route to MASTER_ADDR=node0)" in _plan()
    plan = _plan(GLOO_SOCKET_IFNAME="ib0")
    assert "GLOO_SOCKET_IFNAME=ib0 (set by the caller)" in plan
    assert plan.strip().splitlines()[-1].startswith("GLOO_SOCKET_IFNAME=ib0 ")
    assert "gloo interface" not in _plan(NNODES="1", MASTER_ADDR="127.0.0.1")  # one node: gloo's default


@pytest.mark.parametrize("node_rank, is_host", [("0", "1"), ("1", "0")])
def test_max_restarts_switches_to_the_c10d_rendezvous(node_rank, is_host):
    static = _torchrun_words(_plan(NODE_RANK=node_rank))
    assert "--max-restarts" not in static and _value(static, "--node-rank") == node_rank
    plan = _plan(NODE_RANK=node_rank, MAX_RESTARTS="2", GLOO_SOCKET_IFNAME="lo")
    words = _torchrun_words(plan)
    assert plan.strip().splitlines()[-1].startswith("GLOO_SOCKET_IFNAME=lo TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 ")
    assert (_value(words, "--max-restarts"), _value(words, "--rdzv-backend"), _value(words, "--rdzv-endpoint"),
            _value(words, "--rdzv-id"), _value(words, "--rdzv-conf")) == (
        "2", "c10d", "node0:29500", "megatron-opd", f"is_host={is_host}")
    assert _value(words, "--local-addr") == "127.0.0.1"  # this node's address on GLOO_SOCKET_IFNAME
    assert "--node-rank" not in words and "--master-addr" not in words  # the rendezvous assigns the ranks
    result = _run(LAUNCHER, env=_env(**{**ACCEPTANCE_ENV, "MAX_RESTARTS": "-1"}))
    assert result.returncode != 0 and "MAX_RESTARTS must be an integer >= 0, got '-1'" in result.stderr


def test_given_endpoints_and_extra_flags_pass_through():
    urls = "http://srv0:30001,http://srv0:30002"
    words = _torchrun_words(_plan(ROLLOUT_URLS=urls, TEACHER_URLS="http://srv1:31000", EXTRA_ARGS="--lr 3e-6"))
    assert _value(words, "--rollout-url") == urls and _value(words, "--teacher-url") == "http://srv1:31000"
    assert "--weight-sync" not in words and "--rollout-worker-urls" not in words  # the trainer's defaults
    words = _torchrun_words(_plan(ROLLOUT_URLS="http://router:30100", ROLLOUT_WORKER_URLS=urls,
                                  TEACHER_URLS="http://srv1:31000", WEIGHT_SYNC="distributed"))
    assert _value(words, "--rollout-worker-urls") == urls and _value(words, "--weight-sync") == "distributed"
    result = _run(LAUNCHER, "--seed", "7", env=_env(**ACCEPTANCE_ENV))
    words = _torchrun_words(result.stdout)
    assert words[-2:] == ["--seed", "7"]  # command-line flags come last, so they win


def test_default_endpoints_follow_the_server_layout():
    plan = _plan(STUDENT_GPUS="0,1,2,3", STUDENT_TP="2", TEACHER_GPUS="4,5,6,7", TEACHER_TP="2",
                 SGLANG_HOST="srv0")
    assert "rollout (student) SGLang endpoints: http://srv0:30001,http://srv0:30002" in plan
    assert "teacher SGLang endpoints: http://srv0:31000" in plan  # two teacher workers -> router


def _trainer_flag_table() -> set[str]:
    """Keys of FLAGS in megatron_opd/training/cli.py, read without importing the trainer."""
    tree = ast.parse((REPO / "megatron_opd" / "training" / "cli.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign | ast.Assign) and "FLAGS" in ast.unparse(node.targets[0] if isinstance(node, ast.Assign) else node.target):
            return {key.value for key in node.value.keys}
    raise AssertionError("no FLAGS table in megatron_opd/training/cli.py")


def test_every_flag_is_known_to_the_trainer_cli():
    words = _torchrun_words(_plan(TP="2", PP="2", VPP="2", PPO_CLIP="0.2", GATE_TAU="1.0", TOP_K="20",
                                  MIN_LR="1e-7", MINIBATCHES_PER_ROLLOUT="2", LSM_TAIL="1", ENABLE_THINKING="1",
                                  SAVE_HF="out/hf", WANDB_PROJECT="opd", CHAT_TEMPLATE="0", EP="2", ETP="1",
                                  MOE_AUX_LOSS_COEFF="1e-3", MOE_ROUTER_DTYPE="fp64", MOE_TOKEN_DISPATCHER="allgather"))
    train_flags = words[words.index("train") + 1:]
    known = _trainer_flag_table()
    used = {w for w in train_flags if w.startswith("--")}
    unknown = sorted(f for f in used if f not in known and not (f.startswith("--no-") and "--" + f[5:] in known))
    assert len(used) > 40 and not unknown, f"flags the trainer does not define: {unknown}"
    try:
        from megatron_opd.training.cli import build_parser
    except ImportError:  # the trainer's own imports may be mid-change; the table check above still ran
        return
    build_parser().parse_args(train_flags)  # argparse exits (SystemExit) on a bad flag or value


def test_start_servers_plan_lists_server_commands():
    plan = _run(LAUNCHER, env=_env(DRY_RUN="1", START_SERVERS="1", TRAIN_GPUS="0,1,2,3", STUDENT_GPUS="4,5",
                                   TEACHER_GPUS="6,7", TEACHER_TP="2")).stdout
    assert "layout: NNODES=1 GPUS_PER_NODE=4 world=4" in plan
    assert plan.count("sglang.launch_server") == 3 and "sglang_router.launch_router" in plan
    assert "CUDA_VISIBLE_DEVICES=6,7" in plan and "CUDA_VISIBLE_DEVICES=0,1,2,3" in plan


@pytest.mark.parametrize("extra, message", [
    # the defaults: servers on GPUs 0 and 1, the trainer on all 8 -> refused, with a working suggestion
    ({}, "overlap the SGLang servers' (STUDENT_GPUS=0, TEACHER_GPUS=1) on GPU(s) 0,1; set TRAIN_GPUS to GPUs "
         "the servers do not use, e.g. TRAIN_GPUS=2,3,4,5,6,7"),
    ({"TRAIN_GPUS": "0,1,2,3", "STUDENT_GPUS": "3", "TEACHER_GPUS": "4"}, "on GPU(s) 3;"),
    ({"TRAIN_GPUS": "0,1", "STUDENT_GPUS": "4", "TEACHER_GPUS": "4,5"},
     "STUDENT_GPUS=4 and TEACHER_GPUS=4,5 share GPU 4"),
    ({"TRAIN_GPUS": "0,1", "GPUS_PER_NODE": "8", "STUDENT_GPUS": "2", "TEACHER_GPUS": "3"},
     "GPUS_PER_NODE=8 but TRAIN_GPUS=0,1 lists 2 GPU(s)"),
])
def test_servers_and_trainer_on_the_same_gpus_are_refused(extra, message):
    base = {"DRY_RUN": "1", "START_SERVERS": "1"}
    if "TRAIN_GPUS" not in extra:
        base["GPUS_PER_NODE"] = "8"  # else derived from TRAIN_GPUS
    result = _run(LAUNCHER, env=_env(**{**base, **extra}))
    assert result.returncode != 0 and "torchrun" not in result.stdout, result.stdout
    assert message in result.stderr


def test_disjoint_gpu_split_and_the_timeout_flag_pass():
    plan = _run(LAUNCHER, env=_env(DRY_RUN="1", START_SERVERS="1", TRAIN_GPUS="2,3,4,5,6,7",
                                   DISTRIBUTED_TIMEOUT_MINUTES="120"))
    assert plan.returncode == 0, plan.stderr
    words = _torchrun_words(plan.stdout)
    assert _value(words, "--distributed-timeout-minutes") == "120"
    assert "--distributed-timeout-minutes" not in _torchrun_words(_plan())  # unset: the trainer's default


def test_help_documents_every_variable():
    result = _run(LAUNCHER, "--help", env=_env())
    assert result.returncode == 0
    text = LAUNCHER.read_text()
    read = set(re.findall(r"\b([A-Z][A-Z0-9_]+)=\$\{\1[:-]", text))  # NAME=${NAME:-default} / ${NAME-...}
    read |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]+):-\}", text))  # optional ones read as ${NAME:-}
    assert len(read) > 50
    missing = sorted(name for name in read if not re.search(rf"\b{name}\b", result.stdout))
    assert not missing, f"--help does not document: {missing}"


def _stub_python(tmp_path):
    """A stand-in interpreter: prints its arguments; `-c CODE` fails (torch.cuda is unavailable)."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\nif [ "$1" = -c ]; then exit 1; fi\necho "STUB $*"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    no_gpu = tmp_path / "bin"
    no_gpu.mkdir()
    (no_gpu / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (no_gpu / "nvidia-smi").chmod(0o755)
    return stub, f"{no_gpu}:{os.environ['PATH']}"


def test_no_gpu_and_no_endpoints_runs_the_cpu_demo(tmp_path):
    stub, path = _stub_python(tmp_path)
    result = _run(LAUNCHER, "--quick", env=_env(PYTHON=str(stub), PATH=path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "STUB -m megatron_opd.cli demo --quick"
    assert "running the embedded CPU demo" in result.stderr


def test_endpoints_given_means_a_training_run_not_the_demo(tmp_path):
    stub, path = _stub_python(tmp_path)
    result = _run(LAUNCHER, env=_env(PYTHON=str(stub), PATH=path, ROLLOUT_URLS="http://h:1", TEACHER_URLS="http://h:2",
                                     MODELS_DIR=str(tmp_path)))
    assert result.returncode != 0 and "demo" not in result.stdout
    assert f"STUDENT_HF={tmp_path}/Qwen3-1.7B is not a directory" in result.stderr


# ---------------------------------------------------------------- tools/sglang_servers.sh


def test_server_layout_commands_and_urls():
    env = _env(DRY_RUN="1", STUDENT_MODEL="/m/s", TEACHER_MODEL="/m/t", STUDENT_GPUS="0,1,2,3", STUDENT_TP="2",
               TEACHER_GPUS="4,5,6,7", TEACHER_TP="4", ADVERTISE_HOST="srv0", SGLANG_PYTHON="py",
               STUDENT_EXTRA_ARGS="--context-length 16384")
    out = _run(SERVERS, "up", env=env).stdout.splitlines()
    workers = [shlex.split(line) for line in out if "sglang.launch_server" in line]
    assert [w[0] for w in workers] == ["CUDA_VISIBLE_DEVICES=0,1", "CUDA_VISIBLE_DEVICES=2,3", "CUDA_VISIBLE_DEVICES=4,5,6,7"]
    assert [_value(w, "--port") for w in workers] == ["30001", "30002", "31001"]
    assert [_value(w, "--tp-size") for w in workers] == ["2", "2", "4"]
    for w in workers:
        assert _value(w, "--sampling-defaults") == "openai" and _value(w, "--mem-fraction-static") == "0.85"
    assert "--weight-loader-disable-mmap" in workers[0] and "--weight-loader-disable-mmap" not in workers[2]
    assert _value(workers[0], "--context-length") == "16384"
    router = [shlex.split(line) for line in out if "launch_router" in line]
    assert len(router) == 1 and router[0][-2:] == ["http://srv0:30001", "http://srv0:30002"]
    assert _run(SERVERS, "urls", "student", env=env).stdout.strip() == "http://srv0:30001,http://srv0:30002"
    assert _run(SERVERS, "urls", "teacher", env=env).stdout.strip() == "http://srv0:31001"


def test_servers_bind_loopback_unless_asked():
    """SGLang's weight-loading endpoints are unauthenticated: loopback by default, a warning otherwise."""
    env = _env(DRY_RUN="1", STUDENT_MODEL="/m/s", TEACHER_MODEL="/m/t", SGLANG_PYTHON="py")
    default = _run(SERVERS, "up", env=env)
    workers = [shlex.split(line) for line in default.stdout.splitlines() if "sglang.launch_server" in line]
    assert workers and {_value(w, "--host") for w in workers} == {"127.0.0.1"}
    assert "warning" not in default.stderr
    assert _run(SERVERS, "urls", "student", env=env).stdout.strip() == "http://127.0.0.1:30001"
    exposed = _run(SERVERS, "up", env={**env, "BIND_HOST": "0.0.0.0"})
    workers = [shlex.split(line) for line in exposed.stdout.splitlines() if "sglang.launch_server" in line]
    assert {_value(w, "--host") for w in workers} == {"0.0.0.0"}
    assert "warning: BIND_HOST=0.0.0.0 exposes SGLang's unauthenticated weight-loading endpoints" in exposed.stderr


@pytest.mark.parametrize("extra, args, message", [
    ({"STUDENT_GPUS": "0,1,2", "STUDENT_TP": "2"}, ["urls", "student"], "STUDENT_GPUS has 3 GPU(s), not a multiple of STUDENT_TP=2"),
    ({"TEACHER_GPUS": "a,b"}, ["urls", "teacher"], "TEACHER_GPUS must be comma-separated GPU ids"),
    ({}, ["urls", "critic"], "unknown role 'critic'"),
    ({}, ["launch"], "unknown command 'launch'"),
    ({"ROUTER": "maybe"}, ["urls", "teacher"], "ROUTER must be auto, always or never"),
    ({}, ["up", "student"], "STUDENT_MODEL is not set"),
])
def test_server_script_errors(extra, args, message):
    result = _run(SERVERS, *args, env=_env(**extra))
    assert result.returncode != 0 and message in result.stderr


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FAKE_SERVER = """#!{python}
# Stand-in for `python -m sglang.launch_server ... --port P`: FAKE_MODE ok serves /health, hang never
# listens, crash exits at once.
import http.server, os, sys, time
mode = os.environ.get("FAKE_MODE", "ok")
if mode == "crash":
    print("fake server: CUDA out of memory", flush=True)
    sys.exit(3)
if mode == "hang":
    time.sleep(600)
port = int(sys.argv[sys.argv.index("--port") + 1])
# like SGLang's scheduler processes: a child that `down` must stop too (it signals the process group)
import subprocess
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(os.environ["FAKE_CHILD_PID"], "w").write(str(child.pid))
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Health)
server.timeout = 0.5
deadline = time.time() + 120  # never outlive a broken test
while time.time() < deadline:
    server.handle_request()
"""


def _server_env(tmp_path, mode):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_SERVER.format(python=sys.executable))
    fake.chmod(0o755)
    return _env(SGLANG_PYTHON=str(fake), FAKE_MODE=mode, STATE_DIR=str(tmp_path / "state"), ROUTER="never",
                STUDENT_MODEL="/m/s", STUDENT_GPUS="0", STUDENT_PORT=str(_free_port() - 1),
                ADVERTISE_HOST="127.0.0.1", BIND_HOST="127.0.0.1", HEALTH_INTERVAL="0.2", HEALTH_TIMEOUT="20",
                SHUTDOWN_TIMEOUT="5", FAKE_CHILD_PID=str(tmp_path / "child.pid"))


def _pid(tmp_path):
    return int((tmp_path / "state" / "student-0.pid").read_text())


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_waits_for_health_and_down_stops_the_process_group(tmp_path):
    env = _server_env(tmp_path, "ok")
    result = _run(SERVERS, "up", "student", env=env)
    try:
        assert result.returncode == 0, result.stderr
        assert "all SGLang endpoints healthy" in result.stdout
        port = int(env["STUDENT_PORT"]) + 1
        assert f"student endpoints: http://127.0.0.1:{port}" in result.stdout
        pid, child = _pid(tmp_path), int((tmp_path / "child.pid").read_text())
        assert _alive(pid) and _alive(child) and "student-0: alive" in _run(SERVERS, "status", env=env).stdout
    finally:
        down = _run(SERVERS, "down", env=env)
    assert down.returncode == 0 and "stopped student-0" in down.stdout
    deadline = time.time() + 5
    while (_alive(pid) or _alive(child)) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid) and not _alive(child), "a server process (or its child) survived `down`"


def test_crashed_server_fails_fast_with_its_log(tmp_path):
    env = _server_env(tmp_path, "crash")
    start = time.time()
    result = _run(SERVERS, "up", "student", env=env)
    _run(SERVERS, "down", env=env)
    assert result.returncode != 0 and time.time() - start < 15
    assert "student-0 exited before becoming healthy" in result.stderr
    assert "CUDA out of memory" in result.stderr  # the log tail is shown


def test_health_wait_times_out_naming_the_endpoint(tmp_path):
    env = {**_server_env(tmp_path, "hang"), "HEALTH_TIMEOUT": "2"}
    result = _run(SERVERS, "up", "student", env=env)
    pid = _pid(tmp_path)
    _run(SERVERS, "down", env=env)
    port = int(env["STUDENT_PORT"]) + 1
    assert result.returncode != 0
    assert f"timed out after 2s waiting for /health of: http://127.0.0.1:{port}" in result.stderr
    time.sleep(0.3)
    assert not _alive(pid)
