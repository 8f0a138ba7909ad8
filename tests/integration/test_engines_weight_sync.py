"""SGLang weight sync from disk against the contract server: version check, probe, flush retry."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contract_server import Int32SeedLocalEngine, single_thread_torch, start_contract_server  # noqa: E402
from sglang_contract.tiny import reference_logprobs, tiny_qwen3  # noqa: E402

from megatron_opd.rollout import SamplingParams  # noqa: E402
from megatron_opd.rollout.sglang_client import SGLangRolloutEngine  # noqa: E402
from megatron_opd.rollout.sglang_http import SGLangError  # noqa: E402

PROMPTS = [[5, 6, 7], [8, 9, 10, 11]]
PARAMS = SamplingParams(temperature=1.0, max_new_tokens=10, n=2, seed=1)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with single_thread_torch():
        yield


def _probe(model):
    prompt, response = [5, 6, 7], [8, 9, 10]
    ref = reference_logprobs(model, prompt, response).gather(1, torch.tensor(response)[:, None])[:, 0]
    return prompt, response, ref.tolist()


@pytest.fixture()
def setup(tmp_path):
    old, new = tiny_qwen3(seed=0), tiny_qwen3(seed=5)
    server = start_contract_server(copy.deepcopy(old))
    engine = SGLangRolloutEngine(server.url, weight_sync_dir=str(tmp_path / "sync"), hf_config=new.config,
                                 backoff_s=0.01)
    yield server, engine, old, new
    server.close()


def test_sync_from_state_dict_checks_version_probe_and_flushes(setup):
    server, engine, _, new = setup
    server.inject("flush_busy", 2)
    version = engine.update_weights(new.state_dict(), probe=_probe(new))
    assert version == "v1" and server.weight_version == "v1"
    assert [p for p, _ in server.calls].count("/flush_cache") == 3  # two busy answers, then success
    want = Int32SeedLocalEngine(new).generate(PROMPTS, PARAMS)
    got = engine.generate(PROMPTS, PARAMS)
    assert [s.response_ids for s in got] == [s.response_ids for s in want]


def test_sync_from_directory(setup, tmp_path):
    server, engine, _, new = setup
    new.save_pretrained(tmp_path / "export")
    assert engine.update_weights(tmp_path / "export", weight_version="step-7") == "step-7"
    body = [b for p, b in server.calls if p == "/update_weights_from_disk"][-1]
    assert body == {"model_path": str(tmp_path / "export"), "load_format": "auto", "flush_cache": True,
                    "weight_version": "step-7"}


def test_stale_weights_fail_the_probe(setup):
    _, engine, old, new = setup
    with pytest.raises(SGLangError, match="weight probe log-probs differ .* the new weights are not in use"):
        engine.update_weights(new.state_dict(), probe=_probe(old))


def test_failed_load_names_the_worker(setup, tmp_path):
    server, engine, _, _ = setup
    (tmp_path / "empty").mkdir()
    with pytest.raises(SGLangError, match=rf"/update_weights_from_disk on {server.url}: HTTP 400: failed to load"):
        engine.update_weights(tmp_path / "empty")
    with pytest.raises(ValueError, match="needs weight_sync_dir"):
        SGLangRolloutEngine(server.url).update_weights({})
