"""SGLang client vs the in-process engines, through the loopback contract server (DESIGN §4)."""

import copy
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contract_server import (  # noqa: E402
    ContractRouter,
    Int32SeedLocalEngine,
    single_thread_torch,
    start_contract_server,
)
from sglang_contract.tiny import tiny_qwen3  # noqa: E402

from megatron_opd.rollout import SamplingParams  # noqa: E402
from megatron_opd.rollout.sglang_client import SGLangRolloutEngine  # noqa: E402
from megatron_opd.teacher.sglang import SGLangTeacher  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with single_thread_torch():
        yield


VOCAB = 60
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19], [20]]
SETTINGS = {
    "greedy": SamplingParams(temperature=0.0, max_new_tokens=16, n=1, seed=1),
    "sampled": SamplingParams(temperature=1.0, max_new_tokens=20, n=3, seed=2, suppress_token_ids=(0, 1)),
    "nucleus": SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=20, n=2, seed=3),
    "renormalized": SamplingParams(temperature=1.0, top_p=0.8, max_new_tokens=20, n=2, seed=4,
                                   renormalize_logprobs=True),
}


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3(seed=0)


@pytest.fixture(scope="module")
def server(model):
    srv = start_contract_server(copy.deepcopy(model), vocab_size=VOCAB)
    yield srv
    srv.close()


def client(url, **kw):
    kw.setdefault("backoff_s", 0.01)
    return SGLangRolloutEngine(url, vocab_size=VOCAB, **kw)


def assert_same_samples(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a.prompt_index, a.sample_index) == (b.prompt_index, b.sample_index)
        assert a.response_ids == b.response_ids and a.finish_reason == b.finish_reason
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_client_matches_local_engine(model, server, setting):
    params = SETTINGS[setting]
    want = Int32SeedLocalEngine(model, vocab_size=VOCAB, seed=7).generate(PROMPTS, params)
    got = client(server.url, seed=7).generate(PROMPTS, params)
    assert_same_samples(got, want)
    assert any(s.finish_reason == "stop" for s in want) or setting == "greedy"


FAULT_CASES = [("http_500", 3), ("http_503", 2), ("malformed_json", 2), ("wrong_length", 2), ("nan_logprob", 2),
               ("wrong_rid", 1), ("abort", 1), ("delay", 1)]
DELAY_TIMEOUT_S = 3.0


def _generate_with_fault(model, server, fault: str, times: int):
    params = SETTINGS["sampled"]
    want = Int32SeedLocalEngine(model, vocab_size=VOCAB, seed=11).generate(PROMPTS, params)
    server.answered.clear()
    # A delayed request is held until the client gives up on it (delay_s is only a safety cap).
    server.inject(fault, times, delay_s=120.0)
    engine = client(server.url, seed=11, timeout_s=DELAY_TIMEOUT_S if fault == "delay" else 30.0)
    got = engine.generate(PROMPTS, params)
    assert server.faults[fault] == 0  # every injected fault was hit
    assert_same_samples(got, want)  # exactly one sample per slot, the right one
    assert len({s.meta["rid"] for s in got}) == len(want)
    return engine, want


def assert_timeouts_retried(engine, server, num_slots: int) -> None:
    """The delay fault fixes one thing: the held request outlasts the client's timeout. Whether an
    undelayed answer also outlasts it depends on how fast the server is (a loaded machine), so the
    attempts are counted from the timeouts: each one, and nothing else, costs exactly one more attempt."""
    timed_out = [f.rsplit("for rid ", 1)[-1] for f in engine.runner.failures]
    assert all(f.startswith("timeout after") for f in engine.runner.failures), engine.runner.failures
    assert engine.runner.attempts == num_slots + len(timed_out)
    assert set(server.delayed) <= set(timed_out)
    for _ in range(500):  # the server notices the hang-up within its 20 ms poll
        if set(server.delayed) <= set(server.dropped):
            break
        time.sleep(0.02)
    assert set(server.delayed) <= set(server.dropped), "the delayed request was still held after the client gave up"


@pytest.mark.parametrize("fault,times", FAULT_CASES)
def test_transient_faults_are_retried_without_loss_or_duplicates(model, server, fault, times):
    server.delayed.clear()
    engine, want = _generate_with_fault(model, server, fault, times)
    if fault == "delay":
        assert len(server.delayed) == 1
        assert_timeouts_retried(engine, server, len(want))
    else:
        assert engine.runner.attempts == len(want) + times


def test_delay_fault_on_a_slow_server(model, server, monkeypatch):
    """What load does to the delay case, by controlled time instead of load: the server's first batch
    takes longer than the client's timeout, so undelayed requests time out too. Each is retried once
    with a fresh rid; nothing is lost or duplicated."""
    sample, batches = server.engine.sample, []

    def slow_first_batch(*args, **kwargs):
        batches.append(len(args[0]))
        if len(batches) == 1:
            time.sleep(DELAY_TIMEOUT_S + 0.5)
        return sample(*args, **kwargs)

    monkeypatch.setattr(server.engine, "sample", slow_first_batch)
    server.delayed.clear()
    engine, want = _generate_with_fault(model, server, "delay", 1)
    assert len(engine.runner.failures) >= 1 + batches[0]  # the delayed request and the slow batch's
    assert_timeouts_retried(engine, server, len(want))


def _listen_queue_length(port: int) -> int:
    """Connections waiting in the accept queue of the listening socket on ``port`` (Linux /proc/net/tcp:
    rx_queue of a LISTEN socket)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no listening socket on port {port}")


def test_server_queues_a_burst_of_connections_like_a_real_server(model):
    """The client opens one connection per sample at once (up to max_concurrency = 64). With
    socketserver's default listen backlog (5) the kernel queues 6 and drops the others' handshakes;
    TCP retries them after 1 s, then 3 s: whole seconds added to undelayed answers."""
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc/net/tcp")
    srv = start_contract_server(copy.deepcopy(model), vocab_size=VOCAB)
    release, accept = threading.Event(), srv._httpd.get_request
    srv._httpd.get_request = lambda: (release.wait(), accept())[1]  # the accept thread stalls (load)
    port, sockets = srv._httpd.server_address[1], []
    try:
        for _ in range(64):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            sockets.append(sock)
        for _ in range(250):  # loopback handshakes finish at once; a dropped one stays out while none is accepted
            if _listen_queue_length(port) >= 64:
                break
            time.sleep(0.02)
        assert _listen_queue_length(port) >= 64
    finally:
        for sock in sockets:
            sock.close()
        release.set()
        srv.close()


@pytest.mark.parametrize("fault", ["http_500", "nan_logprob", "malformed_json"])
def test_persistent_fault_is_reported_with_server_and_rid(server, fault):
    server.inject(fault, 1000)
    try:
        with pytest.raises(Exception, match=rf"rid opd-\S+-p0-s0-a2 failed after 3 attempts \(last server "
                                            rf"{server.url}\)") as info:
            client(server.url, max_retries=2, max_concurrency=1).generate(PROMPTS[:1], SETTINGS["greedy"])
    finally:
        server.faults[fault] = 0
    assert type(info.value).__name__ == "SGLangError" and info.value.server == server.url


def test_bad_request_is_not_retried_and_names_the_message(server):
    engine = SGLangRolloutEngine(server.url, backoff_s=0.01)  # no vocab_size: the server rejects id 63
    with pytest.raises(Exception, match=r"HTTP 400 from .* input_ids hold ids outside \[0, 60\)"):
        engine.generate([[5, 63]], SETTINGS["greedy"])
    assert engine.runner.attempts == 1


def test_worker_dying_mid_batch_fails_over(model):
    a, b = start_contract_server(copy.deepcopy(model), vocab_size=VOCAB), start_contract_server(
        copy.deepcopy(model), vocab_size=VOCAB)
    try:
        params = SamplingParams(max_new_tokens=12, n=8, seed=5)
        want = Int32SeedLocalEngine(model, vocab_size=VOCAB).generate(PROMPTS, params)
        a.die_after_answers = 5
        got = client([a.url, b.url], max_concurrency=4).generate(PROMPTS, params)
        assert a.dead and sum(a.answered.values()) >= 5 and sum(b.answered.values()) > 0
        assert_same_samples(got, want)
    finally:
        a.close()
        b.close()


def test_router_with_one_dead_worker(model, server):
    dead = start_contract_server(copy.deepcopy(model), vocab_size=VOCAB)
    dead_url = dead.url
    dead.close()
    router = ContractRouter([dead_url, server.url]).start()
    try:
        params = SETTINGS["nucleus"]
        want = Int32SeedLocalEngine(model, vocab_size=VOCAB).generate(PROMPTS, params)
        got = client(router.url).generate(PROMPTS, params)
        assert_same_samples(got, want)
        assert router.forwarded[server.url] == len(want) and router.forwarded[dead_url] == 0
    finally:
        router.close()


def test_single_dead_server_is_reported_clearly(model):
    dead = start_contract_server(copy.deepcopy(model), vocab_size=VOCAB)
    url = dead.url
    dead.close()
    with pytest.raises(Exception, match=rf"ConnectError to {url} for rid .*-a1"):
        client(url, max_retries=1).generate(PROMPTS[:1], SETTINGS["greedy"])


def test_failed_batch_aborts_requests_in_flight(server):
    server.inject("delay", 50, delay_s=0.4)
    engine = SGLangRolloutEngine(server.url, backoff_s=0.01, max_concurrency=8)
    try:
        with pytest.raises(Exception, match="HTTP 400"):
            engine.generate([[5, 6]] * 4 + [[5, 63]], SamplingParams(max_new_tokens=4, n=1))
    finally:
        server.faults["delay"] = 0
    aborted = [body["rid"] for path, body in server.calls if path == "/abort_request"]
    assert len(aborted) >= 1 and all("-p" in rid for rid in aborted)
    assert not engine.runner.in_flight


def test_teacher_persistent_wrong_length_is_reported(server):
    server.inject("wrong_length", 1000)
    try:
        with pytest.raises(Exception, match=r"input_token_logprobs has 3 entries, expected R \+ 1 = 4"):
            SGLangTeacher(server.url, max_retries=1, backoff_s=0.01).score([[5, 6]], [[7, 8, 9]], top_k=4)
    finally:
        server.faults["wrong_length"] = 0


def test_health_and_stream_state(server):
    engine = client(server.url, seed=3)
    assert engine.health() == {server.url: True}
    params = SETTINGS["sampled"]
    engine.generate(PROMPTS, params)
    second = engine.generate(PROMPTS, params)
    resumed = client(server.url)
    resumed.load_state_dict(engine.state_dict())
    resumed.prompt_counter -= len(PROMPTS)
    assert_same_samples(resumed.generate(PROMPTS, params), second)
