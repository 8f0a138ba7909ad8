"""Token-budget micro-batches (--max-tokens-per-micro-batch) through the real trainer pieces (Megatron GPTModel,
DDP, the pipeline schedule, the sampled-token loss with block drift gates and the exact mean normalisation) on
2 gloo ranks, at DP=2, PP=2, PP=2×VPP=2 and TP=2 with sequence parallelism (lengths padded to multiples of 2):

- the finalised gradients equal those of fixed micro-batches on the same minibatch (fp32, |Δ| ≤ 1e-5 × the
  largest gradient entry), with a different number of rows and tokens per rank and micro-batches of several
  shapes;
- the step's gate scale Σm / Σmg is the same (the mean normalisation stays exact over the step);
- the log-prob recompute gives the same log-probs, and the first training step on the recompute's layout sees
  exactly zero drift;
- --max-tokens-per-micro-batch 0 is bit-exact with today's fixed micro-batches (rank rows split into blocks);
- DP ranks may even run different numbers of micro-batches (1 and 5 here; Megatron reduces gradients and token
  counts once per step), though the packer gives every rank the same number.
"""

import json

import torch

from megatron_opd.platform.spawn import run_spawned

LAYOUTS = [{}, {"pipeline_model_parallel_size": 2},
           {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2},
           {"tensor_model_parallel_size": 2, "sequence_parallel": True}]
NUM_SEQS, MICRO_BATCH, BUDGET = 8, 2, 45
GRAD_TOL, LOGPROB_TOL = 1e-5, 1e-5


def _experience(vocab: int, pad_to_multiple: int):
    from megatron_opd.training.experience import Experience

    gen = torch.Generator().manual_seed(7)
    prompt_lens = torch.randint(2, 6, (NUM_SEQS,), generator=gen)
    response_lens = torch.randint(1, 13, (NUM_SEQS,), generator=gen)
    response_lens[3] = 12  # rows of very different lengths
    seq_len, resp_len = int((prompt_lens + response_lens).max()), int(response_lens.max())
    seq_len = -(-seq_len // pad_to_multiple) * pad_to_multiple
    input_ids = torch.zeros(NUM_SEQS, seq_len, dtype=torch.long)
    response_ids = torch.zeros(NUM_SEQS, resp_len, dtype=torch.long)
    for i in range(NUM_SEQS):
        ids = torch.randint(1, vocab, (int(prompt_lens[i] + response_lens[i]),), generator=gen)
        input_ids[i, : len(ids)] = ids
        response_ids[i, : int(response_lens[i])] = ids[int(prompt_lens[i]):]
    valid = torch.arange(resp_len)[None, :] < response_lens[:, None]
    return Experience(input_ids=input_ids, prompt_lens=prompt_lens, response_lens=response_lens,
                      response_ids=response_ids, loss_mask=valid & (torch.rand(valid.shape, generator=gen) > 0.1),
                      truncated=torch.zeros(NUM_SEQS, dtype=torch.bool),
                      teacher_logprobs=-3 * torch.rand(NUM_SEQS, resp_len, generator=gen), pad_to_multiple=pad_to_multiple)


def _grads(student) -> torch.Tensor:
    return torch.cat([p.main_grad.flatten().clone() for chunk in student.model for p in chunk.module.parameters()])


def _check_layout(layout, student_dir):
    from megatron_opd.gating import DriftGateConfig
    from megatron_opd.models import read_hf_checkpoint
    from megatron_opd.platform import ParallelConfig, initialize_distributed
    from megatron_opd.training.components import _rescale_grads
    from megatron_opd.training.config import DataConfig, EngineConfig, ModelConfig, OPDConfig
    from megatron_opd.training.loss import LossSettings, MicrobatchLoss
    from megatron_opd.training.megatron_setup import build_student
    from megatron_opd.training.step import (
        _run_schedule,
        forward_backward,
        local_microbatches,
        rank_rows,
        recompute_logprobs,
        split_microbatches,
    )

    gate = DriftGateConfig(granularity="block", block_size=4, tau=1.0)
    cfg = OPDConfig(parallel=ParallelConfig(**layout), model=ModelConfig(student_hf=student_dir, teacher_hf=student_dir),
                    data=DataConfig(data_path="toy"), engines=EngineConfig(prompts_per_rollout=4, samples_per_prompt=2),
                    gate=gate)
    state = initialize_distributed(cfg.parallel)
    holder = []
    student = build_student(cfg, state, hf_weights=read_hf_checkpoint(student_dir),
                            finalize_hook=lambda model: _rescale_grads(model, holder[0], state))
    loss = MicrobatchLoss(LossSettings(objective="sampled", gate=gate, vocab_size=student.vocab_size,
                                       sequence_parallel=bool(layout.get("sequence_parallel"))),
                          state.tp_group, state.dp_cp_group)
    holder.append(loss)
    exp = _experience(student.vocab_size, state.tp_size if layout.get("sequence_parallel") else 1)
    everything = [torch.arange(NUM_SEQS)]
    fixed_logprobs = recompute_logprobs(student, exp, everything, state, MICRO_BATCH, loss=loss)
    packed_logprobs = recompute_logprobs(student, exp, everything, state, MICRO_BATCH, max_tokens=BUDGET, loss=loss)
    result = {"layout": layout, "rank": state.rank,
              "logprob_diff": (fixed_logprobs - packed_logprobs)[exp.loss_mask].abs().max().item()}

    # Zero drift on the recompute's own layout: the first training step's log-probs are bit-identical.
    exp.old_logprobs = packed_logprobs
    reports, _, _ = forward_backward(student, loss, exp, state, MICRO_BATCH, max_tokens=BUDGET)
    result["zero_drift_max"] = max((r["abs_drift_max"].item() for r in reports), default=None)

    # Drift gates that vary: the gate normalisation is not trivial.
    noise = torch.randn(exp.old_logprobs.shape, generator=torch.Generator().manual_seed(3))
    exp.old_logprobs = packed_logprobs + 0.7 * noise

    for chunk in student.model:  # today's code path, written out
        chunk.zero_grad_buffer()
    loss.normalizer.reset()
    _run_schedule(student.model, split_microbatches(exp.select(rank_rows(NUM_SEQS, state)), MICRO_BATCH), loss,
                  state.device, forward_only=False, chunked_head=loss.settings.chunked_head)
    today, today_scale = _grads(student), loss.step_gate_scale

    forward_backward(student, loss, exp, state, MICRO_BATCH, max_tokens=0)
    fixed, fixed_scale = _grads(student), loss.step_gate_scale
    forward_backward(student, loss, exp, state, MICRO_BATCH, max_tokens=BUDGET)
    packed, packed_scale = _grads(student), loss.step_gate_scale
    if state.dp_size == 2:  # Megatron itself allows different micro-batch counts per DP rank (mean gates)
        rows = [torch.arange(0, 3)] if state.dp_rank == 0 else list(torch.arange(3, NUM_SEQS).split(1))
        for chunk in student.model:
            chunk.zero_grad_buffer()
        loss.normalizer.reset()
        _run_schedule(student.model, [exp.select(r) for r in rows], loss, state.device, forward_only=False,
                      chunked_head=loss.settings.chunked_head)
        result["uneven_grad_diff"] = (fixed - _grads(student)).abs().max().item()
    multiple = state.pp_size if len(student.model) > 1 else 1
    microbatches, _, padding = local_microbatches(exp, state, MICRO_BATCH, BUDGET, multiple)
    result.update(bit_exact_with_today=bool(torch.equal(today, fixed)) and today_scale == fixed_scale,
                  grad_diff=(fixed - packed).abs().max().item(), grad_scale=fixed.abs().max().item(),
                  gate_scales=[fixed_scale, packed_scale],
                  shapes=[list(mb.input_ids.shape) for mb in microbatches], padding=padding,
                  pad_to_multiple=exp.pad_to_multiple)
    return result


def _worker(rank, student_dir, out_dir):
    from megatron_opd.platform import destroy_distributed

    results = [_check_layout(layout, student_dir) for layout in LAYOUTS]
    destroy_distributed()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(results, f)


def test_token_budget_gradients_equal_fixed_microbatches(tmp_path):
    from megatron_opd.recipes.common import ModelShape, write_initial_model

    student = write_initial_model(tmp_path / "student", ModelShape(layers=4, hidden=32, heads=4, kv_heads=2,
                                                                   head_dim=8, intermediate=64), seed=1)
    run_spawned(_worker, 2, str(student), str(tmp_path))
    results = [r for rank in range(2) for r in json.loads((tmp_path / f"rank{rank}.json").read_text())]
    assert len(results) == 2 * len(LAYOUTS)
    for r in results:
        where = f"{r['layout']} rank {r['rank']}"
        assert r["bit_exact_with_today"], f"--max-tokens-per-micro-batch 0 differs from today's path at {where}"
        assert r["grad_scale"] > 1e-4, f"trivially small gradients at {where}"
        assert r["grad_diff"] <= GRAD_TOL * r["grad_scale"], f"packed gradients differ by {r['grad_diff']} at {where}"
        fixed_scale, packed_scale = r["gate_scales"]
        assert abs(fixed_scale - 1.0) > 1e-3, f"gate scale {fixed_scale} is trivial at {where}"
        assert packed_scale == fixed_scale or abs(packed_scale / fixed_scale - 1) < 1e-6, where
        assert r["logprob_diff"] <= LOGPROB_TOL, f"recomputed log-probs differ by {r['logprob_diff']} at {where}"
        if r["zero_drift_max"] is not None:  # the last pipeline stage
            assert r["zero_drift_max"] == 0.0, f"first step after the recompute drifts at {where}"
        assert all(s[0] * s[1] <= BUDGET or s[0] == 1 for s in r["shapes"]), r["shapes"]
        assert all(s[1] % r["pad_to_multiple"] == 0 for s in r["shapes"]), r["shapes"]
        assert len({tuple(s) for s in r["shapes"]}) > 1, f"micro-batches of one shape only at {where}: {r['shapes']}"
    dp = [r for r in results if r["layout"] == {}]
    assert all(r["uneven_grad_diff"] <= GRAD_TOL * r["grad_scale"] for r in dp), dp  # 1 vs 5 micro-batches
    rows_per_rank = [sum(s[0] for s in r["shapes"]) for r in dp]
    assert sum(rows_per_rank) == NUM_SEQS and rows_per_rank[0] != rows_per_rank[1], rows_per_rank
