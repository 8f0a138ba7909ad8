"""SGLang client vs the in-process engines, through the loopback contract server (DESIGN §4)."""

import copy
import sys
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


@pytest.mark.parametrize("fault,times", FAULT_CASES)
def test_transient_faults_are_retried_without_loss_or_duplicates(model, server, fault, times):
    params = SETTINGS["sampled"]
    want = Int32SeedLocalEngine(model, vocab_size=VOCAB, seed=11).generate(PROMPTS, params)
    server.answered.clear()
    # The delayed answer outlasts the client's timeout by far, and an undelayed one stays well inside
    # it even on a loaded machine (a 0.75 s timeout also timed out undelayed answers under load).
    server.inject(fault, times, delay_s=8.0)
    engine = client(server.url, seed=11, timeout_s=3.0 if fault == "delay" else 30.0)
    got = engine.generate(PROMPTS, params)
    assert server.faults[fault] == 0  # every injected fault was hit
    assert_same_samples(got, want)  # exactly one sample per slot, the right one
    assert engine.runner.attempts == len(want) + times
    assert len({s.meta["rid"] for s in got}) == len(want)


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
    with pytest.raises(Exception, match=rf"ConnectError from {url} for rid .*-a1"):
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
