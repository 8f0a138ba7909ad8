"""In-process rollout engine: batching invariance, log-probs vs an independent forward, stops, seeds."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sglang_contract.tiny import reference_logprobs, tiny_qwen3  # noqa: E402

from megatron_opd.rollout import LocalRolloutEngine, SamplingParams  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19], [20]]


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3(seed=0)


def test_batching_does_not_change_samples(model):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=24, n=3, seed=11)
    big = LocalRolloutEngine(model, max_batch_rows=512).generate(PROMPTS, params)
    one = LocalRolloutEngine(model, max_batch_rows=1).generate(PROMPTS, params)
    assert [s.response_ids for s in big] == [s.response_ids for s in one]
    for a, b in zip(big, one):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_independent_forward(model, temperature):
    params = SamplingParams(temperature=temperature, max_new_tokens=20, n=2, seed=3, suppress_token_ids=(0, 1))
    samples = LocalRolloutEngine(model, vocab_size=60).generate(PROMPTS, params)
    for s in samples:
        ref = reference_logprobs(model, s.prompt_ids, s.response_ids, temperature, 60, (0, 1))
        expect = ref.gather(1, torch.tensor(s.response_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(s.logprobs, dtype=torch.float64), expect, atol=1e-5)
        assert all(t < 60 and t not in (0, 1) for t in s.response_ids)


def test_greedy_matches_hf_generate(model):
    params = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    samples = LocalRolloutEngine(model).generate(PROMPTS, params)
    for s in samples:
        ids = torch.tensor([s.prompt_ids])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                             min_new_tokens=16, eos_token_id=None, pad_token_id=0)
        assert s.response_ids == ref[0, len(s.prompt_ids):].tolist()
        greedy_lp = reference_logprobs(model, s.prompt_ids, s.response_ids).max(dim=-1).values
        assert torch.allclose(torch.tensor(s.logprobs, dtype=torch.float64), greedy_lp, atol=1e-5)


@pytest.mark.parametrize("stop_kind", ["stop_token_ids", "model_eos"])
def test_stops_cut_the_free_run(model, stop_kind):
    engine = LocalRolloutEngine(model)
    base = dict(max_new_tokens=30, seed=5, n=4)
    free = engine.generate(PROMPTS, SamplingParams(ignore_eos=True, **base))
    if stop_kind == "model_eos":
        stop_id, params = model.config.eos_token_id, SamplingParams(**base)
    else:
        stop_id = free[0].response_ids[4]  # a token the first sample emits at position 4
        params = SamplingParams(ignore_eos=True, stop_token_ids=(stop_id,), **base)
    engine.prompt_counter = 0  # replay the same seeds
    out = engine.generate(PROMPTS, params)
    assert sum(stop_id in f.response_ids for f in free) >= 2  # the test exercises both branches
    for f, s in zip(free, out):
        if stop_id in f.response_ids:
            cut = f.response_ids.index(stop_id) + 1
            assert s.response_ids == f.response_ids[:cut] and s.finish_reason == "stop"
        else:
            assert s.response_ids == f.response_ids and s.finish_reason == "length"
        assert len(s.logprobs) == len(s.response_ids) <= 30


def test_padded_vocab_and_suppressed_ids_never_sampled():
    model = tiny_qwen3(seed=1)
    with torch.no_grad():
        model.lm_head.weight[60:] *= 50  # padded columns and id 7 would dominate if not excluded
        model.lm_head.weight[7] *= 50
    params = SamplingParams(max_new_tokens=20, n=8, seed=0, suppress_token_ids=(7,), ignore_eos=True)
    samples = LocalRolloutEngine(model, vocab_size=60).generate(PROMPTS, params)
    ids = {t for s in samples for t in s.response_ids}
    assert all(t < 60 for t in ids) and 7 not in ids


def test_sampling_frequencies_match_tempered_nucleus(model):
    prompt, temperature, top_p = [5, 6, 7], 1.3, 0.8
    ref = reference_logprobs(model, prompt, [0], temperature)[0]  # (V,) float64
    probs = ref.exp()
    order = torch.argsort(probs, descending=True)
    before = torch.cumsum(probs[order], 0) - probs[order]
    nucleus = order[before <= top_p]
    n = 6000
    samples = LocalRolloutEngine(model).generate(
        [prompt], SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=1, n=n, seed=1,
                                 ignore_eos=True, renormalize_logprobs=True))
    counts = torch.bincount(torch.tensor([s.response_ids[0] for s in samples]), minlength=probs.numel())
    outside = torch.ones_like(probs, dtype=torch.bool)
    outside[nucleus] = False
    assert counts[outside].sum() == 0
    expect = probs[nucleus] / probs[nucleus].sum()
    freq = counts[nucleus].double() / n
    assert torch.all((freq - expect).abs() <= 4 * torch.sqrt(expect * (1 - expect) / n) + 1e-3)
    log_mass = torch.logsumexp(ref[nucleus], 0)
    for s in samples[:50]:
        assert abs(s.logprobs[0] - (ref[s.response_ids[0]] - log_mass).item()) < 1e-5


def test_seed_stream_resumes_from_state_dict(model):
    params = SamplingParams(max_new_tokens=12, n=2, ignore_eos=True)
    engine = LocalRolloutEngine(model, seed=42)
    first, second = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert [s.response_ids for s in first] != [s.response_ids for s in second]
    resumed = LocalRolloutEngine(model, seed=0)
    replay = LocalRolloutEngine(model, seed=42)
    replay.generate(PROMPTS, params)
    resumed.load_state_dict(replay.state_dict())
    assert [s.response_ids for s in resumed.generate(PROMPTS, params)] == [s.response_ids for s in second]


def test_prompt_major_order_and_count(model):
    samples = LocalRolloutEngine(model).generate(PROMPTS, SamplingParams(max_new_tokens=3, n=3))
    assert len(samples) == 12
    assert [(s.prompt_index, s.sample_index) for s in samples] == [(i, j) for i in range(4) for j in range(3)]
    assert all(s.prompt_ids == PROMPTS[s.prompt_index] for s in samples)


def test_max_new_tokens_zero(model):
    out = LocalRolloutEngine(model).generate(PROMPTS[:1], SamplingParams(max_new_tokens=0))
    assert out[0].response_ids == [] and out[0].finish_reason == "length"


def test_bad_prompts_are_named(model):
    engine = LocalRolloutEngine(model, vocab_size=60)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[5], []], SamplingParams())
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside \[0, 60\): \[61\]"):
        engine.generate([[5, 61]], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_update_weights_from_state_dict_and_dir(model, tmp_path):
    other = tiny_qwen3(seed=9)
    engine = LocalRolloutEngine(tiny_qwen3(seed=0))
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    expect = LocalRolloutEngine(other).generate(PROMPTS, params)
    engine.update_weights({k: v.clone() for k, v in other.state_dict().items() if k != "lm_head.weight"})
    got = engine.generate(PROMPTS, params)
    assert [s.response_ids for s in got] == [s.response_ids for s in expect]
    other.save_pretrained(tmp_path)
    engine.update_weights(tiny_qwen3(seed=4).state_dict())
    engine.update_weights(tmp_path)
    assert [s.response_ids for s in engine.generate(PROMPTS, params)] == [s.response_ids for s in expect]


def test_update_weights_errors_name_tensors(model):
    engine = LocalRolloutEngine(tiny_qwen3(seed=0))
    state = dict(tiny_qwen3(seed=1).state_dict())
    state.pop("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(KeyError, match="missing \\['model.layers.0.mlp.up_proj.weight'\\]"):
        engine.update_weights(state)
    state = dict(tiny_qwen3(seed=1).state_dict())
    state["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="model.norm.weight has shape \\(3,\\)"):
        engine.update_weights(state)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        engine.update_weights("/nonexistent_dir_xyz")


def test_cached_decoding_uses_the_current_cache_argument(model, capfd):
    """No deprecation noise from transformers in the sampler: the KV cache is passed under the name
    the installed ``forward`` takes (``cache`` in transformers 5.2x, ``past_key_values`` before)."""
    import inspect
    import warnings

    from megatron_opd.rollout.local import cache_field_name

    expected = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert cache_field_name(model) == expected
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=1, seed=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = LocalRolloutEngine(model).generate(PROMPTS[:2], params)
    assert all(len(s.response_ids) == 8 for s in samples)
    noise = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    assert not noise, noise
    err = capfd.readouterr().err
    assert "deprecated" not in err, err


def test_growing_kv_cache_gives_the_default_caches_samples(model, monkeypatch):
    """The sampler's KV cache writes into a buffer grown by doubling (transformers' default
    concatenates the whole cache every step). Growing past the first capacity (64) several times
    must not change a sample or a log-prob against the model's default cache."""
    from megatron_opd.rollout import local

    cache = local.new_kv_cache()
    layer_class = local._growing_layer_class()
    if layer_class is None:  # transformers < 5: no cache layers, the default cache is used
        assert cache is None
        return
    assert cache is not None and cache.layer_class_to_replicate is layer_class
    assert local._Decoder(model, PROMPTS).cache.layer_class_to_replicate is layer_class  # the sampler's cache
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=150, n=2, seed=9, ignore_eos=True)
    grown = LocalRolloutEngine(model).generate(PROMPTS, params)
    monkeypatch.setattr(local, "new_kv_cache", lambda: None)
    default = LocalRolloutEngine(model).generate(PROMPTS, params)
    assert [s.response_ids for s in grown] == [s.response_ids for s in default]
    assert all(len(s.response_ids) == 150 for s in grown)
    for a, b in zip(grown, default):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-6)
