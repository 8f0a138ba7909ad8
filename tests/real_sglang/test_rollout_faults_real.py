"""Faults with real SGLang servers: a worker killed with SIGKILL in the middle of a rollout, the
same worker restarted, and a worker slow past the client's timeout.

Two real servers serve the same tiny model: A (the session's shared server) and B (started here,
so it can be killed and restarted on the same port). Every batch must come back with each
(prompt, sample) slot filled exactly once, counted here independently of the client's own check.
"""

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import sglang_server

from megatron_opd.rollout.sglang_client import SGLangRolloutEngine
from megatron_opd.rollout.types import SamplingParams

NUM_PROMPTS, SAMPLES = 4, 4
PROMPTS = [[5 + i, 6 + i, 7 + i, 8 + i, 9 + i] for i in range(NUM_PROMPTS)]
# B runs one request at a time and logs aborts (debug level): the slow-server test fills it with
# long requests, and reads the log to see that timed-out attempts were aborted there.
B_ARGS = ("--max-running-requests", "1", "--log-level", "debug")


@pytest.fixture(scope="module")
def workers(real_server, tiny_hf_dir, sglang_python, tmp_path_factory):
    """(A, B-holder): B can be replaced by a restart; every B started here is stopped at the end."""
    log_dir = tmp_path_factory.mktemp("fault_worker_logs")
    started = [sglang_server.start(tiny_hf_dir, log_dir, extra_args=B_ARGS, python=sglang_python)]
    holder = {"b": started[0], "log_dir": log_dir, "python": sglang_python, "started": started}
    try:
        yield real_server, holder
    finally:
        for server in started:
            sglang_server.stop(server)


def engine_for(urls, timeout_s: float) -> SGLangRolloutEngine:
    return SGLangRolloutEngine(urls, timeout_s=timeout_s, connect_timeout_s=2.0, max_retries=6, backoff_s=0.2,
                               max_concurrency=16, seed=3)


def count_slots(samples) -> Counter:
    return Counter((s.prompt_index, s.sample_index) for s in samples)


def assert_every_slot_once(samples) -> None:
    counts = count_slots(samples)
    expected = {(i, j) for i in range(NUM_PROMPTS) for j in range(SAMPLES)}
    assert len(samples) == NUM_PROMPTS * SAMPLES, f"{len(samples)} samples for {len(expected)} slots"
    assert set(counts) == expected and set(counts.values()) == {1}, counts
    assert all(s.prompt_ids == PROMPTS[s.prompt_index] for s in samples)


def test_kill9_mid_rollout_completes_on_the_other_worker(workers):
    a, holder = workers
    b = holder["b"]
    engine = engine_for([a.url, b.url], timeout_s=60.0)
    params = SamplingParams(max_new_tokens=48, ignore_eos=True, n=SAMPLES)
    box: dict = {}
    runner = threading.Thread(target=lambda: box.update(samples=engine.generate(PROMPTS, params)))
    runner.start()
    deadline = time.monotonic() + 60
    while not any(server == b.url for server in list(engine.runner.in_flight.values())):
        assert time.monotonic() < deadline and runner.is_alive(), "B never received a request"
        time.sleep(0.01)
    in_flight_on_b = sum(server == b.url for server in list(engine.runner.in_flight.values()))
    os.killpg(b.pid, signal.SIGKILL)  # the server and its scheduler/detokenizer, mid-rollout
    runner.join(timeout=180)
    assert not runner.is_alive() and "samples" in box, "the batch did not complete after B died"
    samples = box["samples"]
    assert in_flight_on_b > 0
    assert_every_slot_once(samples)
    assert all(len(s.response_ids) == 48 for s in samples)
    assert {s.meta["server"] for s in samples} <= {a.url, b.url}
    assert any(b.url in failure for failure in engine.runner.failures), engine.runner.failures
    assert not sglang_server.health_ok(b.url)


def test_restarted_worker_rejoins(workers):
    a, holder = workers
    dead = holder["b"]
    if sglang_server.health_ok(dead.url):  # run on its own: kill B first
        os.killpg(dead.pid, signal.SIGKILL)
    restarted = sglang_server.start(dead.model_path, holder["log_dir"], port=dead.port, extra_args=B_ARGS,
                                    python=holder["python"])
    holder["started"].append(restarted)
    holder["b"] = restarted
    engine = engine_for([a.url, restarted.url], timeout_s=60.0)
    assert engine.health() == {a.url: True, restarted.url: True}
    samples = engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, n=SAMPLES))
    assert_every_slot_once(samples)
    served = Counter(s.meta["server"] for s in samples)
    assert served[restarted.url] > 0 and served[a.url] > 0, served


def test_worker_slow_past_the_timeout_is_aborted_and_failed_over(workers, tiny_hf_dir):
    a, holder = workers
    b = holder["b"]
    context = json.loads((Path(tiny_hf_dir) / "config.json").read_text())["max_position_embeddings"]
    hog = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": context - 8, "ignore_eos": True,
                                                         "temperature": 1.0}}
    # B runs one request at a time: these keep it busy far longer than the client's timeout
    hogs = [threading.Thread(target=_post_quietly, args=(b.url, {**hog, "rid": f"hog-{k}"})) for k in range(5)]
    for thread in hogs:
        thread.start()
    time.sleep(1.0)
    timeout_s = 3.0
    engine = engine_for([a.url, b.url], timeout_s=timeout_s)
    start = time.monotonic()
    samples = engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, n=SAMPLES))
    seconds = time.monotonic() - start
    assert_every_slot_once(samples)
    assert {s.meta["server"] for s in samples} == {a.url}, "B was too slow to answer anything"
    timed_out = [f for f in engine.runner.failures if "timeout" in f and b.url in f]
    assert timed_out, engine.runner.failures
    assert seconds < 4 * timeout_s + 30, f"failover took {seconds:.1f} s"
    # the timed-out attempts were aborted on B (its debug log names each aborted rid)
    rids = [f.split("for rid ")[1].split()[0] for f in timed_out]
    deadline = time.monotonic() + 10
    while not all(f"rid='{rid}'" in Path(b.log_path).read_text() for rid in rids):
        assert time.monotonic() < deadline, f"no abort of {rids} in B's log"
        time.sleep(0.2)
    httpx.post(b.url + "/abort_request", json={"abort_all": True}, timeout=10)
    for thread in hogs:
        thread.join(timeout=60)


def _post_quietly(url: str, payload: dict) -> None:
    try:
        httpx.post(url + "/generate", json=payload, timeout=300)
    except httpx.HTTPError:
        pass
