"""Token ids at the edges of the vocabulary against a real SGLang 0.5.23 server (issue 16).

The session's tiny Qwen3 has a tokenizer that fills its vocabulary (V = 59 ids: the 6 special
tokens 0-5, then characters; ``config.json`` vocab_size is also 59), so the last id V-1 is a real
token that prompts, responses and samples hold. SGLang reports id 0 in ``input_token_logprobs``
wherever the input holds V-1 (``logprob_result_processor.py``: ``x if x < vocab_size - 1 else 0``);
the teacher client must accept exactly that. Then random ids over the whole range (0, V-1 and
every special token included) go through teacher scoring and rollouts, and every id and log-prob
is compared with a full-vocab HF forward of the same directory.

Shares the session's server (``real_server``) with the other real-server tests.
"""

import random

import httpx
import pytest
import torch

from megatron_opd.rollout.sglang_client import SGLangRolloutEngine
from megatron_opd.rollout.types import SamplingParams
from megatron_opd.teacher.sglang import SGLangTeacher, score_payload

LOGPROB_ATOL = 2e-4  # fp32 server vs fp32 HF forward, on random (partly nonsensical) sequences
TOP_K = 8


@pytest.fixture(scope="module")
def boundary(real_server, tiny_hf_dir):
    """(server url, V, special ids, HF model): the fixture's weights on the server, whatever ran before."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    vocab = AutoConfig.from_pretrained(tiny_hf_dir).vocab_size
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    assert len(tokenizer) == vocab, "the test needs a tokenizer that fills the vocabulary"
    SGLangRolloutEngine(real_server.url).update_weights(str(tiny_hf_dir), weight_version="fixture")
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    return real_server.url, vocab, sorted(tokenizer.all_special_ids), model


def hf_next_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] float64: log softmax of the next-token logits after each prefix (fp32 forward)."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)


def random_ids(rng: random.Random, n: int, vocab: int, edges: list[int]) -> list[int]:
    """Ids over [0, V); a third of them from ``edges`` (0, V-1, V-2, the special tokens)."""
    return [rng.choice(edges) if rng.random() < 1 / 3 else rng.randrange(vocab) for _ in range(n)]


def assert_top_matches(ids: list[int], values: list[float], reference: torch.Tensor, where: str) -> None:
    """A served top-K row against the HF row: distinct ids, each with its HF log-prob, and the values
    are HF's K largest (ties between equal log-probs may order ids differently)."""
    assert len(set(ids)) == len(ids), f"{where}: repeated ids {ids}"
    served = torch.tensor(values, dtype=torch.float64)
    torch.testing.assert_close(served, reference[ids], atol=LOGPROB_ATOL, rtol=0, msg=where)
    torch.testing.assert_close(served, reference.topk(len(ids)).values, atol=LOGPROB_ATOL, rtol=0, msg=where)


def test_real_server_reports_id_0_for_the_last_input_id(boundary):
    """The quirk itself, on the raw answer: every position holding V-1 (prompt end and response)
    comes back as id 0 in input_token_logprobs, with V-1's log-prob; top-K ids and output ids are
    not clipped (V-1 is listed as itself in full-vocabulary top lists)."""
    url, vocab, _, model = boundary
    last = vocab - 1
    prompt, response = [7, 8, last], [last, 9, last, 0, last]
    body = httpx.post(url + "/generate", json=score_payload(prompt, response, vocab, "quirk-raw"), timeout=120).json()
    meta = body["meta_info"]
    reported = [entry[1] for entry in meta["input_token_logprobs"]]
    assert reported == [0, 0, 9, 0, 0, 0], reported  # sent [58 | 58, 9, 58, 0, 58]
    reference = hf_next_token_logprobs(model, prompt + response)[len(prompt) - 1:-1]
    served = torch.tensor([entry[0] for entry in meta["input_token_logprobs"][1:]], dtype=torch.float64)
    torch.testing.assert_close(served, reference[torch.arange(len(response)), response], atol=LOGPROB_ATOL, rtol=0)
    for t, row in enumerate(meta["input_top_logprobs"][1:]):
        assert sorted(entry[1] for entry in row) == list(range(vocab)), f"position {t}"


def test_teacher_scores_sequences_holding_the_last_id(boundary):
    """A teacher client with no retry scores sequences that hold V-1 (it failed every attempt before)."""
    url, vocab, _, model = boundary
    last = vocab - 1
    prompts = [[7, 8, last], [last], [5, 6]]
    responses = [[last, 9, last, 0, last], [last] * 4, [0, last - 1, last]]
    scores = SGLangTeacher(url, vocab_size=vocab, max_retries=0).score(prompts, responses, top_k=TOP_K)
    for row, (prompt, response, score) in enumerate(zip(prompts, responses, scores)):
        reference = hf_next_token_logprobs(model, prompt + response)[len(prompt) - 1:-1]
        torch.testing.assert_close(score.token_logprobs.double(), reference[torch.arange(len(response)), response],
                                   atol=LOGPROB_ATOL, rtol=0, msg=f"row {row}")
        for t in range(len(response)):
            assert_top_matches(score.topk_ids[t].tolist(), score.topk_logprobs[t].tolist(), reference[t],
                               f"row {row} position {t}")


def test_teacher_scoring_fuzz_over_the_whole_vocabulary(boundary):
    """Random prompts and responses over [0, V): token log-probs and top-K equal the HF forward; every
    edge id (0, V-1, V-2, each special token) occurs in prompts and responses."""
    url, vocab, specials, model = boundary
    edges = sorted({0, vocab - 2, vocab - 1, *specials})
    rng = random.Random(16)
    prompts = [random_ids(rng, rng.randint(1, 12), vocab, edges) for _ in range(24)]
    responses = [random_ids(rng, rng.randint(1, 24), vocab, edges) for _ in range(24)]
    prompts.append(list(edges))  # every edge id at least once on each side
    responses.append(list(reversed(edges)))
    assert set(edges) <= {t for r in responses for t in r} and set(edges) <= {p[-1] for p in prompts} | set(prompts[-1])
    scores = SGLangTeacher(url, vocab_size=vocab, max_retries=0).score(prompts, responses, top_k=TOP_K)
    for row, (prompt, response, score) in enumerate(zip(prompts, responses, scores)):
        reference = hf_next_token_logprobs(model, prompt + response)[len(prompt) - 1:-1]
        torch.testing.assert_close(score.token_logprobs.double(), reference[torch.arange(len(response)), response],
                                   atol=LOGPROB_ATOL, rtol=0, msg=f"row {row}: {prompt} | {response}")
        for t in range(len(response)):
            assert_top_matches(score.topk_ids[t].tolist(), score.topk_logprobs[t].tolist(), reference[t],
                               f"row {row} position {t}")


def greedy_prompts_reaching(model, target: int, vocab: int, edges: list[int], count: int, steps: int):
    """Random prompts (edge ids included) whose HF greedy continuation of ``steps`` tokens holds
    ``target``, each step's argmax ahead of the runner-up by a clear margin (no near-ties to flip)."""
    rng = random.Random(58)
    found = []
    for _ in range(4000):
        ids = random_ids(rng, rng.randint(1, 8), vocab, edges)
        prompt, out = list(ids), []
        with torch.no_grad():
            for _ in range(steps):
                top2 = hf_next_token_logprobs(model, ids)[-1].topk(2)
                if float(top2.values[0] - top2.values[1]) < 1e-3:
                    break
                out.append(int(top2.indices[0]))
                ids.append(out[-1])
        if len(out) == steps and target in out:
            found.append((prompt, out))
            if len(found) == count:
                return found
    raise AssertionError(f"no {count} prompts found whose greedy continuation holds id {target}")


def test_rollouts_output_the_last_id_and_special_ids(boundary):
    """Greedy rollouts that emit V-1 (chosen with an HF forward) echo it as output id and in the
    output top lists (full vocabulary); the logprobs equal HF's. Prompts hold edge ids too."""
    url, vocab, specials, model = boundary
    edges = sorted({0, vocab - 2, vocab - 1, *specials})
    cases = greedy_prompts_reaching(model, vocab - 1, vocab, edges, count=4, steps=6)
    engine = SGLangRolloutEngine(url, vocab_size=vocab, max_retries=0)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    samples = engine.generate([prompt for prompt, _ in cases], greedy)
    for (prompt, expected), sample in zip(cases, samples):
        assert sample.response_ids == expected
        reference = hf_next_token_logprobs(model, prompt + expected)[len(prompt) - 1:-1]
        torch.testing.assert_close(torch.tensor(sample.logprobs, dtype=torch.float64),
                                   reference[torch.arange(len(expected)), expected], atol=LOGPROB_ATOL, rtol=0)
    prompt, expected = cases[0]
    body = httpx.post(url + "/generate", timeout=120, json={
        "input_ids": prompt, "return_logprob": True, "top_logprobs_num": vocab, "rid": "boundary-top",
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True, "top_k": -1}}).json()
    assert body["output_ids"] == expected
    reference = hf_next_token_logprobs(model, prompt + expected)[len(prompt) - 1:-1]
    assert [entry[1] for entry in body["meta_info"]["output_token_logprobs"]] == expected
    for t, row in enumerate(body["meta_info"]["output_top_logprobs"]):
        assert sorted(entry[1] for entry in row) == list(range(vocab)), f"position {t}"
        assert_top_matches([e[1] for e in row], [e[0] for e in row], reference[t], f"output top, position {t}")


def test_sampled_rollout_fuzz_over_the_whole_vocabulary(boundary):
    """Sampled rollouts (temperature 1, nothing suppressed, EOS ignored) from random prompts over the
    whole vocabulary: every output id is in range and its log-prob equals the HF forward's."""
    url, vocab, specials, model = boundary
    edges = sorted({0, vocab - 2, vocab - 1, *specials})
    rng = random.Random(59)
    prompts = [random_ids(rng, rng.randint(1, 10), vocab, edges) for _ in range(12)] + [list(edges)]
    engine = SGLangRolloutEngine(url, vocab_size=vocab, max_retries=0)
    samples = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=16, n=2, ignore_eos=True))
    assert [(s.prompt_index, s.sample_index) for s in samples] == [(i, j) for i in range(len(prompts)) for j in range(2)]
    for sample in samples:
        assert len(sample.response_ids) == 16 and all(0 <= t < vocab for t in sample.response_ids)
        ids = sample.prompt_ids + sample.response_ids
        reference = hf_next_token_logprobs(model, ids)[len(sample.prompt_ids) - 1:-1]
        torch.testing.assert_close(torch.tensor(sample.logprobs, dtype=torch.float64),
                                   reference[torch.arange(16), sample.response_ids], atol=LOGPROB_ATOL, rtol=0,
                                   msg=f"prompt {sample.prompt_ids} response {sample.response_ids}")
