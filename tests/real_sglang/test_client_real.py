"""The SGLang client against a real SGLang 0.5.23 server (CPU): every mismatch between the client's
reading of the API and the real server, each shown on the real server (issue 10).

The weight-changing tests restore the fixture's weights before they end: the session shares one
server with other test files.
"""

import copy
import sys
from pathlib import Path

import httpx
import pytest
import torch
from test_server_fixture import hf_logprobs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contract_server import start_contract_server  # noqa: E402

from megatron_opd.rollout.sglang_client import SGLangRolloutEngine  # noqa: E402
from megatron_opd.rollout.sglang_http import RequestRunner, RetryPolicy, SGLangError, WorkerPool, run_sync  # noqa: E402
from megatron_opd.rollout.types import SamplingParams  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
LOGPROB_ATOL = 1e-5  # fp32 server vs fp32 HF forward


def served_version(url: str) -> str:
    return httpx.get(url + "/model_info", timeout=30).json()["weight_version"]


def test_check_sglang_passes_every_check(real_server, tiny_hf_dir, capsys):
    """tools/check_sglang.py: before the fixes it reported 3 FAIL and 1 WARN on this server."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import check_sglang

    code = check_sglang.main(["--url", real_server.url, "--prompt-ids", "5,6,7,8,9,10,11,12", "--tol", "1e-4",
                              "--weights-dir", str(tiny_hf_dir)])
    report = capsys.readouterr().out
    rows = [line.split()[0] for line in report.splitlines() if line.strip()]
    assert code == 0 and rows and set(rows) == {"PASS"}, report


def test_weight_sync_loads_flushes_and_prunes(real_server, tiny_hf_dir, tmp_path):
    """Disk sync into a real server: /flush_cache answers plain text (the client decoded it as JSON
    and raised after the weights were loaded), the served log-probs are the new weights', and only
    the last two exports stay on disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    config = AutoConfig.from_pretrained(tiny_hf_dir)
    engine = SGLangRolloutEngine(real_server.url, weight_sync_dir=str(tmp_path / "sync"), hf_config=config,
                                 vocab_size=config.vocab_size, backoff_s=0.05)
    try:
        for step in range(3):
            model = copy.deepcopy(base)
            with torch.no_grad():
                model.model.embed_tokens.weight.mul_(1.5 + step)  # a visibly different model per sync
            version = engine.update_weights(model.state_dict(), weight_version=f"sync-test-{step}")
            assert served_version(real_server.url) == version
        exports = sorted(p.name for p in (tmp_path / "sync").iterdir())
        assert exports == ["sync-test-1", "sync-test-2"], exports
        greedy = SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True)
        sample = engine.generate(PROMPTS[:1], greedy)[0]
        assert sample.meta["weight_version"] == "sync-test-2"
        model.save_pretrained(tmp_path / "last")
        reference = hf_logprobs(tmp_path / "last", sample.prompt_ids + sample.response_ids)
        expected = [float(reference[len(sample.prompt_ids) - 1 + i, t]) for i, t in enumerate(sample.response_ids)]
        torch.testing.assert_close(torch.tensor(sample.logprobs, dtype=torch.float64),
                                   torch.tensor(expected, dtype=torch.float64), atol=LOGPROB_ATOL, rtol=0)
    finally:
        engine.update_weights(str(tiny_hf_dir), weight_version="fixture")


def test_validation_error_message_names_server_and_field(real_server):
    """0.5.23 answers {"error": {"message": ...}}; the error names the server and carries the message."""
    runner = RequestRunner(WorkerPool([real_server.url]), RetryPolicy(max_retries=0), max_concurrency=1)
    job = (lambda attempt: ("bad-top-k", {"input_ids": [5, 6], "rid": "bad-top-k",
                                          "sampling_params": {"top_k": 0, "max_new_tokens": 2}}),
           lambda body, rid, server: body)
    with pytest.raises(SGLangError) as info:
        run_sync(runner.run_all([job]))
    assert str(info.value) == (f"HTTP 400 from {real_server.url} for rid bad-top-k: "
                               "top_k must be -1 (disable) or at least 1, got 0.")


def test_seed_is_not_sent_where_it_takes_no_effect(real_server):
    """The CPU server runs without --enable-deterministic-inference (0.5.23 allows it only with
    GPU attention backends), so sampling_seed would be ignored: the client leaves it out."""
    info = httpx.get(real_server.url + "/get_server_info", timeout=30).json()
    assert info["enable_deterministic_inference"] is False
    engine = SGLangRolloutEngine(real_server.url, seed=3)
    assert engine.seeds_take_effect() is False
    make, _ = engine._job(PROMPTS[0], SamplingParams(max_new_tokens=2), seed=2**62, i=0, j=0, rid_base="r",
                          send_seed=engine.seeds_take_effect())
    assert "sampling_seed" not in make(0)[1]["sampling_params"]


def test_stale_worker_is_rejected_retried_and_cooled_down(real_server, tiny_hf_dir):
    """Two workers given as one comma-separated --rollout-url, one on old weights (a contract
    server standing in for a worker that missed the sync): every sample comes from the real server
    at the expected version, the stale worker sees one request and then sits out its cooldown."""
    from transformers import AutoModelForCausalLM

    stale = start_contract_server(AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval())
    try:
        engine = SGLangRolloutEngine(f"{stale.url},{real_server.url}", backoff_s=0.01, max_concurrency=1)
        engine.runner.pool.cooldown_s = 600.0  # longer than the batch takes, even on a loaded machine
        assert engine.urls == [stale.url, real_server.url]
        engine.expected_weight_version = served_version(real_server.url)  # as after a sync
        samples = engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, n=2))
        assert len(samples) == 6 and {s.meta["server"] for s in samples} == {real_server.url}
        assert {s.meta["weight_version"] for s in samples} == {engine.expected_weight_version}
        assert sum(stale.counts.values()) == 1, stale.counts  # the first request only: then cooldown
        assert any("stale answer" in f for f in engine.runner.failures)
    finally:
        stale.close()


def test_teacher_scores_and_greedy_rollouts_equal_hf_forward(real_server, tiny_hf_dir):
    """Teacher scoring (max_new_tokens 0, logprob_start_len P-1, the [1:] alignment, top-K) and
    greedy rollouts on the real server against a full-vocab HF forward of the same directory.
    (Moved here from the contract server: a real server shows it.)"""
    from transformers import AutoConfig

    from megatron_opd.teacher.sglang import SGLangTeacher

    vocab = AutoConfig.from_pretrained(tiny_hf_dir).vocab_size
    engine = SGLangRolloutEngine(real_server.url, vocab_size=vocab)
    engine.update_weights(str(tiny_hf_dir), weight_version="fixture")  # whatever ran before, these weights
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True))
    responses = [s.response_ids for s in greedy] + [[]]
    scores = SGLangTeacher(real_server.url, vocab_size=vocab).score(PROMPTS + [[20]], responses, top_k=8)
    assert scores[-1].token_logprobs.shape == (0,)
    for sample, score in zip(greedy, scores):
        p, r = sample.prompt_ids, sample.response_ids
        ref = hf_logprobs(tiny_hf_dir, p + r)[len(p) - 1: len(p) + len(r) - 1]
        token_ref = ref.gather(1, torch.tensor(r)[:, None])[:, 0]
        assert r == ref.argmax(-1).tolist()  # greedy = HF argmax
        torch.testing.assert_close(torch.tensor(sample.logprobs, dtype=torch.float64), token_ref,
                                   atol=LOGPROB_ATOL, rtol=0)
        torch.testing.assert_close(score.token_logprobs.double(), token_ref, atol=LOGPROB_ATOL, rtol=0)
        top = ref.topk(8)
        assert torch.equal(score.topk_ids, top.indices)
        torch.testing.assert_close(score.topk_logprobs.double(), top.values, atol=LOGPROB_ATOL, rtol=0)
