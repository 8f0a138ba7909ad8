"""models.hidden_head on a real Megatron GPTModel (TP=1, one gloo process): inside ``emit_hidden_states`` the
model returns its final hidden states, and ``hidden @ output_weight(model)ᵀ`` is exactly the logits it returns
otherwise, for tied embeddings (the weight is the embedding's) and untied ones (``output_layer.weight``); the
chunked head's gradients reach the same parameters as the logits path's (fp32, 1e-5 of the largest entry)."""

import torch

from megatron_opd.platform.spawn import run_spawned


def _check(tied: bool) -> None:
    from megatron_opd.models import build_qwen3_model, load_hf_weights
    from megatron_opd.models.hidden_head import emit_hidden_states, output_weight
    from megatron_opd.models.tiny import tiny_qwen3_config, tiny_qwen3_model
    from megatron_opd.ops import vocab_parallel_head_stats, vocab_parallel_stats
    from megatron_opd.platform import ParallelConfig

    config = tiny_qwen3_config(tie_word_embeddings=tied)
    (model,) = build_qwen3_model(config, ParallelConfig())
    load_hf_weights([model], tiny_qwen3_model(config).state_dict(), config)
    weight = output_weight(model)
    expected = model.embedding.word_embeddings.weight if tied else model.output_layer.weight
    assert weight is expected
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(9).expand_as(ids)
    mask = torch.triu(torch.ones(9, 9, dtype=torch.bool), diagonal=1)[None, None]
    grads = []
    for chunked in (True, False):
        model.zero_grad()
        if chunked:
            with emit_hidden_states(model) as head_weight:
                hidden = model(ids, positions, mask)  # [b, s, H]
            assert head_weight is weight and hidden.shape == (2, 9, config.hidden_size)
            stats = vocab_parallel_head_stats(hidden, head_weight, ids, vocab_size=config.vocab_size, chunk_size=4)
            with torch.no_grad():
                torch.testing.assert_close(hidden @ weight.t(), model(ids, positions, mask), rtol=1e-5, atol=1e-5)
        else:
            stats = vocab_parallel_stats(model(ids, positions, mask), ids, vocab_size=config.vocab_size)
        (stats.logprobs.sum() + stats.entropy.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    for name, grad in grads[1].items():
        assert (grads[0][name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


def _worker(rank: int) -> None:
    from megatron_opd.platform import ParallelConfig, destroy_distributed, initialize_distributed

    initialize_distributed(ParallelConfig())
    try:
        for tied in (True, False):
            _check(tied)
    finally:
        destroy_distributed()


def test_emit_hidden_states_gives_the_logits_inputs_and_their_gradients():
    run_spawned(_worker, 1)
