"""Experience layout: masks by position, and every selection keeps sequence lengths a multiple of
the TP size (sequence parallelism splits the sequence over TP ranks)."""

import torch

from megatron_opd.rollout.types import Sample
from megatron_opd.training.experience import build_experience


def sample(prompt_len, resp, stop=True):
    return Sample(prompt_ids=list(range(1, prompt_len + 1)), response_ids=resp, logprobs=[-0.5] * len(resp),
                  finish_reason="stop" if stop else "length", prompt_index=0, sample_index=0)


def test_selection_keeps_the_pad_multiple_and_trims():
    samples = [sample(3, [5, 6, 0, 7, 2]), sample(2, [5, 2]), sample(4, [9, 9, 9], stop=False)]
    exp = build_experience(samples, None, pad_id=0, special_token_ids=frozenset({2}), pad_to_multiple=4)
    assert exp.input_ids.shape[1] == 8
    # A pad id inside a response is still a response token; the special id 2 is masked out.
    assert exp.loss_mask[0].tolist() == [True, True, True, True, False]
    small = exp.select(torch.tensor([1]))
    assert small.input_ids.shape[1] == 4 and small.response_ids.shape[1] == 2
    odd = exp.select(torch.tensor([2]))  # 4 + 3 = 7 tokens, padded up to 8
    assert odd.input_ids.shape[1] == 8 and odd.select(torch.tensor([0])).input_ids.shape[1] == 8
    rows = exp.rows(torch.tensor([1, 2]))
    assert rows.input_ids.shape == (2, 8) and rows.truncated.tolist() == [False, True]
    positions = exp.response_positions()
    assert exp.input_ids[0, positions[0, 0] + 1] == 5  # the logit at prompt_len - 1 predicts token 0


def test_weight_versions_from_samples_and_none_for_sft():
    from megatron_opd.rollout.types import Sample
    from megatron_opd.training.experience import build_experience, build_sft_experience

    samples = [Sample(prompt_ids=[1], response_ids=[2, 3], logprobs=[-1.0, -1.0], finish_reason="stop",
                      prompt_index=i, sample_index=0, meta={"weight_version": v})
               for i, v in enumerate([3, "v4", None])]
    exp = build_experience(samples, None, pad_id=0)
    assert exp.weight_versions.tolist() == [3, 4, -1]
    assert build_sft_experience([[1]], [[2, 3]], pad_id=0).weight_versions is None
