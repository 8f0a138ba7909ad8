"""examples/run_block64.sh across two hosts (network namespaces, one trainer process each, gloo): TP=2 and
DP=2 spanning the hosts give bit-identical weights to the same run on one host, also through faults:
TP=2 with the defaults after host 1 is killed (kill -9 of everything in it) and the same command is
started again on both hosts; DP=2 with MAX_RESTARTS=1 after host 1's trainer process is killed (torchrun
restarts it) and then host 1 is killed and the same command started again on it alone.

Slow (each launch is ~20-40 s on a loaded 2-core box, almost all start-up); run alone with
``pytest tests/multihost``. Checkpoints live on the file system both hosts share (namespaces share the
disk), as a cluster's shared storage would.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_opd.recipes.common import ModelShape, quick_recipe, write_initial_model, write_toy_data
from megatron_opd.testing.netns import HostNet, netns_unavailable_reason

REASON = netns_unavailable_reason()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"no network namespaces: {REASON}"),
              pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "examples" / "run_block64.sh"
TINY = ModelShape(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=64)
RUN_TIMEOUT_S = 400
_ports = iter(range(29600, 29700))  # a fresh rendezvous port per launch (no TIME_WAIT surprises)


@pytest.fixture(scope="module")
def net():
    with HostNet(n_hosts=2) as hosts:
        yield hosts


@pytest.fixture(scope="module")
def launcher_env(tmp_path_factory) -> dict:
    """The launcher's variables for a tiny in-process run (rollouts and teacher: `local`)."""
    root = tmp_path_factory.mktemp("tiny")
    data = write_toy_data(root, quick_recipe())
    student = write_initial_model(root / "student", TINY, seed=1)
    teacher = write_initial_model(root / "teacher", TINY, seed=2)
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR", "PYTHONPATH")}
    return {**keep, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "MODE": "train", "ROLLOUT_URLS": "local", "TEACHER_URLS": "local", "STUDENT_HF": str(student),
            "STUDENT_MCORE": "", "TEACHER_HF": str(teacher), "DATA_PATH": str(data), "BF16": "0",
            "CHAT_TEMPLATE": "0", "EVAL_INTERVAL": "0", "TENSORBOARD": "0", "OBJECTIVE": "lsm", "TOPK": "8",
            "TRAIN_ITERS": "6", "SAVE_INTERVAL": "2", "EPOCHS_PER_ROLLOUT": "2", "MINIBATCHES_PER_ROLLOUT": "1",
            "PROMPTS_PER_ROLLOUT": "4", "SAMPLES_PER_PROMPT": "2", "MICRO_BATCH_SIZE": "4",
            "MAX_NEW_TOKENS": "24", "LR": "1e-2", "LR_WARMUP_ITERS": "2", "LR_DECAY_STYLE": "cosine"}


def run_env(base: dict, run_dir: Path, **layout) -> dict:
    return {**base, "RUN_DIR": str(run_dir), "SAVE_HF": str(run_dir / "hf"), **layout}


def one_host(env: dict, nproc: int) -> dict:
    """The launcher on this machine (root namespace, loopback) with ``nproc`` processes; final weights."""
    run_dir = Path(env["RUN_DIR"])
    env = {**env, "NNODES": "1", "NODE_RANK": "0", "GPUS_PER_NODE": str(nproc), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(next(_ports))}
    with open(run_dir.with_suffix(".log"), "w") as log:
        proc = subprocess.run(["bash", str(LAUNCHER), "--no-progress"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S, start_new_session=True)
    assert proc.returncode == 0, tail(run_dir.with_suffix(".log"))
    return final_weights(run_dir)


def start_two_hosts(net: HostNet, env: dict, run_dir: Path, port: int | None = None,
                    ranks=(0, 1)) -> list[subprocess.Popen]:
    """The same launcher command on host 0 and host 1 (NODE_RANK 0/1, MASTER_ADDR = host 0), or on ``ranks``."""
    env = {**env, "NNODES": "2", "GPUS_PER_NODE": "1", "MASTER_ADDR": net.hosts[0].addr,
           "MASTER_PORT": str(port or next(_ports))}
    procs = []
    for rank in ranks:
        log = open(log_path(run_dir, rank), "a")  # noqa: SIM115 - the child owns it; closed when it exits
        procs.append(net.popen(rank, ["bash", str(LAUNCHER), "--no-progress"], env={**env, "NODE_RANK": str(rank)},
                               stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        log.close()
    return procs


def wait_hosts(procs: list[subprocess.Popen], run_dir: Path, timeout: float = RUN_TIMEOUT_S) -> list[int]:
    """Wait for every host's launcher; a host that fails stops the others (a peer would wait for it)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            break
        time.sleep(0.2)
    codes = [p.poll() for p in procs]
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return codes


def run_two_hosts(net: HostNet, env: dict, run_dir: Path, port: int | None = None) -> dict:
    codes = wait_hosts(start_two_hosts(net, env, run_dir, port), run_dir)
    assert codes == [0, 0], f"exit codes {codes}\n" + logs(run_dir)
    return final_weights(run_dir)


def log_path(run_dir: Path, rank: int) -> Path:
    return run_dir.parent / f"{run_dir.name}.host{rank}.log"


def tail(path: Path, chars: int = 3000) -> str:
    return f"--- {path.name}\n" + (path.read_text()[-chars:] if path.exists() else "(no log)")


def logs(run_dir: Path) -> str:
    return "\n".join(tail(log_path(run_dir, rank)) for rank in (0, 1))


def final_weights(run_dir: Path) -> dict:
    weights = {}
    for shard in sorted((run_dir / "hf").glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    assert weights, f"no HF export in {run_dir / 'hf'}"
    return weights


def assert_bit_identical(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    differ = [name for name in want if not torch.equal(got[name], want[name])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def assert_trained(weights: dict, initial_dir: Path) -> None:
    """The run changed the student (so equal weights mean equal training, not two no-ops)."""
    initial = load_file(str(initial_dir / "model.safetensors"))
    assert any(not torch.equal(weights[name], initial[name]) for name in initial)


def steps_logged(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row["step"] for row in rows if "loss" in row]


def test_tp2_spanning_two_hosts_killed_host_relaunched_equals_one_host(net, launcher_env, tmp_path):
    """TP=2 across the hosts with the launcher's defaults (static rendezvous, no restarts). After
    checkpoint 2, kill -9 host 1 (everything in it): host 0 fails by itself within seconds (its peer is
    gone); the same command started again on both hosts resumes from the last checkpoint. The final weights
    equal the uninterrupted TP=2 run's on one host bit for bit (one run instead of two keeps the suite
    short; a clean run is the same minus the kill), and metrics.jsonl holds each step once."""
    run_dir = tmp_path / "two_hosts"
    env = run_env(launcher_env, run_dir, TP="2")
    port = next(_ports)
    procs = start_two_hosts(net, env, run_dir, port)
    wait_for_checkpoint(run_dir / "checkpoints", 2, procs, run_dir)
    net.kill_host(1)
    codes = wait_hosts(procs[:1], run_dir, timeout=120)  # host 0, left alone
    assert codes[0] not in (None, 0), "host 0 should fail once its peer is gone\n" + logs(run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() in ("iter_0000002", "iter_0000004")

    weights = run_two_hosts(net, env, run_dir, port)  # the same command again, on both hosts
    reference = one_host(run_env(launcher_env, tmp_path / "one_host", TP="2"), nproc=2)
    assert_trained(weights, Path(launcher_env["STUDENT_HF"]))
    assert_bit_identical(weights, reference, "TP=2 across two hosts, killed and relaunched, vs one host")
    assert steps_logged(run_dir) == [1, 2, 3, 4, 5, 6]
    for rank in (0, 1):  # each host's launcher chose its eth0 for gloo (the fix this run depends on)
        assert "GLOO_SOCKET_IFNAME=eth0" in log_path(run_dir, rank).read_text()


def _environ(pid: int) -> dict[bytes, bytes]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone meanwhile
        return {}
    return dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)


def _parent_cmdline(pid: int) -> bytes:
    try:
        parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        return Path(f"/proc/{parent}/cmdline").read_bytes()
    except (OSError, IndexError):
        return b""


def trainer_processes(net: HostNet, host: int) -> dict[int, int]:
    """{pid: torchrun restart count} of the trainer processes in ``host``: the children of its torchrun
    agent (a killed trainer's own helpers, e.g. its grading worker, outlive it for a moment)."""
    out = subprocess.run(["ip", "netns", "pids", net.hosts[host].netns], capture_output=True, text=True).stdout
    found = {}
    for pid in map(int, out.split()):
        environ = _environ(pid)
        launcher = _parent_cmdline(pid).split(b"\0")[:3]  # python .../torchrun | python -m torch.distributed.run
        if b"LOCAL_RANK" in environ and any(w.endswith(b"/torchrun") or w == b"torch.distributed.run" for w in launcher):
            found[pid] = int(environ.get(b"TORCHELASTIC_RESTART_COUNT", b"0"))
    return found


def wait_for_checkpoint(save_dir: Path, iteration: int, procs: list[subprocess.Popen], run_dir: Path) -> None:
    want = f"iter_{iteration:07d}"
    end = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < end:
        latest = save_dir / "latest"
        if latest.exists() and latest.read_text().strip() == want:
            return
        assert all(p.poll() is None for p in procs), f"a host ended before checkpoint {want}\n" + logs(run_dir)
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {want} in time\n" + logs(run_dir))


def test_dp2_across_two_hosts_with_a_restarted_trainer_and_a_relaunched_host_equals_one_host(
        net, launcher_env, tmp_path):
    """DP=2 across the hosts with MAX_RESTARTS=1 (c10d rendezvous), and two faults in the same run
    (one run instead of three keeps the suite short; a clean DP=2 run is the same minus the faults):
    1. after checkpoint 2, SIGKILL host 1's trainer process: its agent restarts it, host 0's agent
       restarts its own (a membership change, not counted), and the job resumes from checkpoint 2 by itself;
    2. after checkpoint 4, kill -9 host 1 entirely (launcher, agent, trainer): host 0's trainer fails,
       its agent restarts it and waits in the rendezvous; the same command relaunched on host 1 rejoins
       and the job resumes from checkpoint 4.
    The final weights equal the uninterrupted DP=2 run's on one host bit for bit, and metrics.jsonl holds
    each step once."""
    run_dir = tmp_path / "faults"
    save_dir = run_dir / "checkpoints"
    env = run_env(launcher_env, run_dir, TP="1", MAX_RESTARTS="1")
    port = next(_ports)
    procs = start_two_hosts(net, env, run_dir, port)
    wait_for_checkpoint(save_dir, 2, procs, run_dir)
    victims = trainer_processes(net, 1)
    assert list(victims.values()) == [0], f"expected one trainer process on host 1: {victims}\n" + logs(run_dir)
    os.kill(next(iter(victims)), signal.SIGKILL)

    wait_for_checkpoint(save_dir, 4, procs, run_dir)
    restarted = trainer_processes(net, 1)  # torchrun's agent started a new one, its restart 1
    assert list(restarted.values()) == [1] and not restarted.keys() & victims.keys(), logs(run_dir)
    # kill -9 the whole host (torchrun gives each trainer process a session of its own, so killing the
    # launcher's process group would leave the trainer running: kill everything in the namespace)
    net.kill_host(1)
    relaunched = start_two_hosts(net, env, run_dir, port, ranks=(1,))  # the same command again, on host 1
    codes = wait_hosts([procs[0], *relaunched], run_dir)
    assert codes == [0, 0], f"exit codes {codes}\n" + logs(run_dir)
    assert steps_logged(run_dir) == [1, 2, 3, 4, 5, 6]

    weights = final_weights(run_dir)
    reference = one_host(run_env(launcher_env, tmp_path / "one_host", TP="1"), nproc=2)
    assert_trained(weights, Path(launcher_env["STUDENT_HF"]))
    assert_bit_identical(weights, reference, "DP=2 across two hosts, restarted and rejoined, vs one host")
