"""SGLang on other hosts behind the real sglang-router 0.3.2 (issue 16, items 3 and 4).

Four hosts (network namespaces on a bridge, ``megatron_opd.testing.netns``): two student servers on
host0 and host1, a teacher server on host2, the router on host0 in front of the two students, and
the trainer side on host3. Servers and router listen only on their host's address; every call of
the test is made from host3. The trainer generates through the router URL and syncs weights to
each worker directly, from disk and by a gloo broadcast (standing in for NCCL) across hosts.

Builds its hosts and servers once for the module (~4.8 GB while it runs): run it alone, not beside
other memory-heavy tests (``-m multihost``). The fault tests come last: they partition and freeze
hosts, and restore them before they end.
"""

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cluster
import httpx
import pytest
import sglang_server
import torch
from cluster import in_host

from megatron_opd.rollout.sglang_client import SGLangRolloutEngine
from megatron_opd.rollout.types import SamplingParams
from megatron_opd.testing.netns import HostNet, netns_unavailable_reason

pytestmark = pytest.mark.multihost
STUDENT_A, STUDENT_B, TEACHER, TRAINER = 0, 1, 2, 3
LOGPROB_ATOL = 2e-4
PROMPTS = [[5 + i, 6 + i, 7 + i, 8 + i] for i in range(4)]
# gloo (the weight-update group across hosts) must use each host's own interface: by default it
# resolves the host name, which every namespace shares with the machine.
HOST_ENV = {"GLOO_SOCKET_IFNAME": "eth0"}


class Cluster:
    def __init__(self, net, workers, teacher, router, model_dir, log_dir, python):
        self.net, self.workers, self.teacher, self.router = net, workers, teacher, router
        self.model_dir, self.log_dir, self.python = model_dir, log_dir, python

    @property
    def worker_urls(self) -> list[str]:
        return [w.url for w in self.workers]

    def call(self, fn, *args, **kwargs):
        """``fn`` run on the trainer's host."""
        return in_host(self.net, TRAINER, fn, *args, **kwargs)

    def router_workers(self) -> dict[str, bool]:
        """url -> healthy, as the router reports its workers (``GET /workers``)."""
        body = self.call(lambda: httpx.get(self.router.url + "/workers", timeout=10).json())
        return {w["url"]: bool(w["is_healthy"]) for w in body["workers"]}

    def wait_router_sees(self, want: dict[str, bool], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.router_workers() == want:
                return
            time.sleep(0.5)
        raise AssertionError(f"router reports {self.router_workers()}, expected {want}:\n{self.router.log_tail()}")


@pytest.fixture(scope="module")
def hosts(sglang_python, tiny_hf_dir, tmp_path_factory):
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    log_dir = tmp_path_factory.mktemp("cluster_logs")
    with HostNet(n_hosts=4) as net:
        # students log at debug level: their logs name each aborted rid
        started = [cluster.start_worker(net, host, tiny_hf_dir, log_dir, python=sglang_python, client_host=TRAINER,
                                        env=HOST_ENV, launch_only=True,
                                        extra_args=("--log-level", "debug") if host != TEACHER else ())
                   for host in (STUDENT_A, STUDENT_B, TEACHER)]
        try:
            for server in started:
                cluster.wait_worker(net, server, TRAINER)
            router = cluster.start_router(net, STUDENT_A, [s.url for s in started[:2]], log_dir,
                                          python=sglang_python, client_host=TRAINER)
            hosts = Cluster(net, started[:2], started[2], router, tiny_hf_dir, log_dir, sglang_python)
            hosts.wait_router_sees({s.url: True for s in started[:2]})
            yield hosts
        finally:
            for server in started:  # all stop at once (each takes up to its 15 s grace)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGTERM)
            for server in started:
                sglang_server.stop(server)


def test_servers_and_router_listen_only_on_their_host_address(hosts):
    """Every TCP listener inside a host is on that host's address or on loopback, except one per server
    that SGLang 0.5.23 itself opens on all addresses (the scheduler's torch.distributed store)."""
    net = hosts.net
    for host in (STUDENT_A, STUDENT_B, TEACHER):
        addr = net.hosts[host].addr
        listeners = cluster.listening_sockets(net, host)
        public = {(a, p) for a, p, _ in listeners if not a.startswith("127.")}
        assert (addr, str(cluster.WORKER_PORT)) in public
        if host == STUDENT_A:
            assert {(addr, str(cluster.ROUTER_PORT)), (addr, str(cluster.ROUTER_METRICS_PORT))} <= public
        wildcard = [(a, p, proc) for a, p, proc in listeners if a in ("*", "0.0.0.0", "[::]")]
        assert len(wildcard) == 1 and wildcard[0][2] == "sglang::schedul", (host, listeners)
        assert public - {(a, p) for a, p, _ in wildcard} <= {(addr, p) for _, p in public}, (host, listeners)


def served_version(url: str) -> str:
    return httpx.get(url + "/model_info", timeout=30).json()["weight_version"]


def hf_token_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0].double(), dim=-1)
    return logp[torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1), torch.tensor(response)]


def assert_served_by(model, samples) -> None:
    for s in samples:
        torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64),
                                   hf_token_logprobs(model, s.prompt_ids, s.response_ids), atol=LOGPROB_ATOL, rtol=0)


def test_trainer_generates_through_router_and_syncs_each_worker_by_disk_and_gloo(hosts, tmp_path, monkeypatch):
    """From host3: a disk sync and a distributed sync (gloo group across hosts 3, 0 and 1) go to each
    worker directly (the router has no weight endpoints: 404); every answer through the router then
    carries the new version and the new weights' log-probs (HF forward of the same weights)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")  # the trainer's side of the group, on host3's interface
    config = AutoConfig.from_pretrained(hosts.model_dir)
    base = AutoModelForCausalLM.from_pretrained(hosts.model_dir, dtype=torch.float32).eval()
    disk_model, dist_model = copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        disk_model.model.embed_tokens.weight.mul_(2.0)
        dist_model.model.norm.weight.mul_(3.0)
    dist_model.save_pretrained(tmp_path / "dist")
    named = sorted(load_file(str(tmp_path / "dist" / "model.safetensors")).items())
    engine = SGLangRolloutEngine(hosts.router.url, worker_urls=hosts.worker_urls, vocab_size=config.vocab_size,
                                 weight_sync_dir=str(tmp_path / "sync"), hf_config=config, max_retries=0)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, n=2, ignore_eos=True)

    def run():
        assert httpx.post(hosts.router.url + "/update_weights_from_disk", json={}, timeout=10).status_code == 404
        engine.update_weights(disk_model.state_dict(), weight_version="disk-1")
        assert {served_version(u) for u in hosts.worker_urls} == {"disk-1"}
        after_disk = engine.generate(PROMPTS, greedy)
        group = engine.weights.init_update_group(hosts.net.hosts[TRAINER].addr, 29650, backend="gloo",
                                                 timeout_s=120.0)
        try:
            engine.expected_weight_version = engine.weights.update_from_distributed(named, group,
                                                                                    weight_version="dist-1")
            assert {served_version(u) for u in hosts.worker_urls} == {"dist-1"}
            after_dist = engine.generate(PROMPTS, greedy)
        finally:
            torch.distributed.destroy_process_group(group)
            engine.update_weights(str(hosts.model_dir), weight_version="fixture")
        return after_disk, after_dist

    after_disk, after_dist = hosts.call(run)
    for samples, version, model in ((after_disk, "disk-1", disk_model), (after_dist, "dist-1", dist_model)):
        assert [(s.prompt_index, s.sample_index) for s in samples] == [(i, j) for i in range(4) for j in range(2)]
        assert {s.meta["weight_version"] for s in samples} == {version}
        assert_served_by(model, samples)


def test_check_sglang_passes_through_the_router(hosts, capsys):
    """tools/check_sglang.py with --url ROUTER and --worker-urls: every check passes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import check_sglang

    code = hosts.call(check_sglang.main, ["--url", hosts.router.url, "--worker-urls", ",".join(hosts.worker_urls),
                                          "--prompt-ids", "5,6,7,8,9,10,11,12", "--tol", "1e-4",
                                          "--weights-dir", str(hosts.model_dir)])
    report = capsys.readouterr().out
    rows = [line.split()[0] for line in report.splitlines() if line.strip()]
    assert code == 0 and rows and set(rows) == {"PASS"}, report


# --- the trainer (megatron-opd train) on host3 -------------------------------------------------------
def train_command(hosts, run_dir: Path, train_iters: int, unreachable_wait_s: float) -> list[str]:
    flags = {"--student-hf": hosts.model_dir, "--data-path": "toy", "--rollout-url": hosts.router.url,
             "--rollout-worker-urls": ",".join(hosts.worker_urls), "--teacher-url": hosts.teacher.url,
             "--objective": "lsm", "--topk": 4, "--gate": "block", "--epochs-per-rollout": 1,
             "--minibatches-per-rollout": 1, "--prompts-per-rollout": 2, "--samples-per-prompt": 2,
             "--micro-batch-size": 4, "--max-new-tokens": 24, "--train-iters": train_iters, "--lr": 1e-3,
             "--seed": 3, "--save": run_dir / "ckpt", "--save-interval": 1, "--run-dir": run_dir,
             "--sglang-timeout": 30, "--sglang-unreachable-wait": unreachable_wait_s,
             # the workers get weights over a gloo update group from host3 (no shared disk between hosts)
             "--weight-sync": "distributed", "--save-hf": run_dir / "final_hf"}
    args = [str(a) for flag, value in flags.items() for a in (flag, value)]
    return [sys.executable, "-m", "megatron_opd.cli", "train", *args]


def start_trainer(hosts, argv: list[str], log_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **HOST_ENV}
    with open(log_path, "w") as log:
        return hosts.net.popen(TRAINER, argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                               cwd=str(Path(__file__).resolve().parents[2]))


def wait_for_line(proc, log_path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text(errors="replace"):
        assert proc.poll() is None, f"the trainer exited ({proc.returncode}) before {text!r}:\n" \
                                    f"{log_path.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout:.0f} s:\n{log_path.read_text()[-4000:]}"
        time.sleep(0.5)


def finish(proc, log_path: Path, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    return log_path.read_text(errors="replace")


def metric_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "loss" in r]


def test_trainer_through_router_waits_for_the_teacher_host_then_stops_past_its_deadline_and_resumes(
        hosts, tmp_path):
    """``megatron-opd train`` on host3 with --rollout-url ROUTER --rollout-worker-urls W1,W2, the teacher on
    host2 and --weight-sync distributed (a gloo group from host3 to both workers). (1) The teacher host is
    cut off when the run starts: the trainer logs that it waits for the teacher's URL, continues when the
    link is back, and finishes step 2 with a checkpoint. (2) A longer
    run (4 steps) resumes from it while the teacher host is cut off again: past --sglang-unreachable-wait
    it stops, naming the teacher's URL. (3) The same command again, link back: it resumes from step 2
    and finishes; every step is trained once (metrics), and each worker serves the final weights (version
    v4, log-probs of an HF forward of the run's --save-hf export)."""
    from transformers import AutoModelForCausalLM

    teacher = hosts.teacher.url
    run_dir = tmp_path / "run"
    hosts.net.link_down(TEACHER)
    try:
        first = start_trainer(hosts, train_command(hosts, run_dir, 2, 600), tmp_path / "first.log")
        wait_for_line(first, tmp_path / "first.log", f"waiting for SGLang server {teacher}", timeout=300)
    finally:
        hosts.net.link_up(TEACHER)
    log = finish(first, tmp_path / "first.log")
    assert first.returncode == 0, log[-4000:]
    assert metric_steps(run_dir) == [1, 2]

    hosts.net.link_down(TEACHER)
    try:
        command = train_command(hosts, run_dir, 4, 8)
        stopped = start_trainer(hosts, command, tmp_path / "stopped.log")
        log = finish(stopped, tmp_path / "stopped.log")
    finally:
        hosts.net.link_up(TEACHER)
    assert stopped.returncode != 0, log[-4000:]
    assert f"SGLang server {teacher} unreachable for" in log, log[-4000:]
    assert metric_steps(run_dir) == [1, 2]

    relaunched = start_trainer(hosts, command, tmp_path / "relaunched.log")
    log = finish(relaunched, tmp_path / "relaunched.log")
    assert relaunched.returncode == 0, log[-4000:]
    assert metric_steps(run_dir) == [1, 2, 3, 4]
    versions = {url: hosts.call(served_version, url) for url in hosts.worker_urls}
    assert set(versions.values()) == {"v4"}, versions
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final_hf", dtype=torch.float32).eval()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, n=1, ignore_eos=True)
    for url in hosts.worker_urls:
        assert_served_by(final, hosts.call(SGLangRolloutEngine(url, max_retries=0).generate, PROMPTS, greedy))
    assert not (run_dir / "weight_sync").exists(), "a distributed run wrote a disk export"


# --- faults across hosts: every sample counted ------------------------------------------------------
FAULT_PROMPTS = [[5 + i, 9 + i, 13 + i] for i in range(4)]
FAULT_SAMPLES = 4


def fault_engine(hosts) -> SGLangRolloutEngine:
    return SGLangRolloutEngine(hosts.router.url, worker_urls=hosts.worker_urls, timeout_s=15.0, connect_timeout_s=2.0,
                               max_retries=8, backoff_s=0.5, max_concurrency=16, seed=3)


def generate_in_background(hosts, engine, params):
    box: dict = {}

    def run():
        try:
            box["samples"] = hosts.call(engine.generate, FAULT_PROMPTS, params)
        except BaseException as err:  # noqa: BLE001 - re-raised by the test
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def generates_served(server) -> int:
    """``/generate`` answers ``server`` finished (its access log; the router's health checks are GETs)."""
    return Path(server.log_path).read_text(errors="replace").count('"POST /generate HTTP/1.1" 200')


def decodes(server) -> int:
    return Path(server.log_path).read_text(errors="replace").count("Decode batch")


def wait_busy(server, before: int, timeout: float = 60.0) -> None:
    """Until ``server`` logged a decode batch after ``before``: requests of the batch are generating
    there (a prefill line proves nothing: the router's health checks make SGLang generate one token)."""
    deadline = time.monotonic() + timeout
    while decodes(server) <= before:
        assert time.monotonic() < deadline, f"{server.url} got no request of the batch"
        time.sleep(0.2)


def assert_every_slot_once(samples) -> None:
    slots = [(s.prompt_index, s.sample_index) for s in samples]
    want = [(i, j) for i in range(len(FAULT_PROMPTS)) for j in range(FAULT_SAMPLES)]
    assert sorted(slots) == want and len(set(slots)) == len(want), slots  # none lost, none duplicated
    assert all(s.prompt_ids == FAULT_PROMPTS[s.prompt_index] for s in samples)
    assert all(len(s.response_ids) == LONG.max_new_tokens for s in samples)


LONG = SamplingParams(temperature=1.0, max_new_tokens=300, n=FAULT_SAMPLES, ignore_eos=True)


def test_student_host_partitioned_mid_rollout_batch_completes_on_the_other_and_it_rejoins(hosts):
    """Host1 (worker B) is cut off while it runs requests of the batch: the router stops sending there
    (health checks), the client's timed-out requests are retried through the router, and the batch
    completes on worker A with every slot once. After link up the router takes B back and B serves."""
    a, b = hosts.workers
    engine = fault_engine(hosts)
    thread, box = generate_in_background(hosts, engine, LONG)
    try:
        wait_busy(b, decodes(b))
        hosts.net.link_down(STUDENT_B)
        thread.join(timeout=400)
    finally:
        hosts.net.link_up(STUDENT_B)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    assert_every_slot_once(box["samples"])
    assert any("timeout" in f for f in engine.runner.failures), engine.runner.failures
    hosts.wait_router_sees({a.url: True, b.url: True})
    before = generates_served(b)
    more = hosts.call(fault_engine(hosts).generate, FAULT_PROMPTS, SamplingParams(max_new_tokens=4, n=2))
    assert len(more) == 8 and generates_served(b) > before, "B did not serve again after the link came back"


def test_server_frozen_past_the_client_timeout_is_aborted_and_failed_over(hosts):
    """Worker B's processes are stopped (SIGSTOP) while it runs requests of the batch, longer than the
    client's timeout: the timed-out requests are retried through the router and the batch completes with
    every slot once. After SIGCONT B aborts each timed-out rid (router 0.3.2 drops its connection when the
    client gives up, and SGLang aborts a request whose client is gone) and has received the client's own
    /abort_request calls (sent to every worker: the router answers 404 to them); the router takes B back."""
    a, b = hosts.workers
    engine = fault_engine(hosts)
    aborts_before = abort_calls(b)
    thread, box = generate_in_background(hosts, engine, LONG)
    try:
        wait_busy(b, decodes(b))
        os.killpg(b.pid, signal.SIGSTOP)
        thread.join(timeout=400)
    finally:
        os.killpg(b.pid, signal.SIGCONT)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    assert_every_slot_once(box["samples"])
    timed_out = [f for f in engine.runner.failures if "timeout" in f]
    assert timed_out, engine.runner.failures
    rids = [f.split("for rid ")[1].split()[0] for f in timed_out]
    deadline = time.monotonic() + 60
    log = ""
    while not all(f"Abort running request. req.rid='{rid}'" in log for rid in rids) \
            or abort_calls(b) < aborts_before + len(rids):
        assert time.monotonic() < deadline, f"B did not abort all of {rids}, or got {abort_calls(b) - aborts_before} " \
                                            f"/abort_request calls:\n{log[-3000:]}"
        time.sleep(0.5)
        log = Path(b.log_path).read_text(errors="replace")
    hosts.wait_router_sees({a.url: True, b.url: True})


def abort_calls(server) -> int:
    return Path(server.log_path).read_text(errors="replace").count('"POST /abort_request HTTP/1.1" 200')
