"""Megatron Qwen3 vs transformers' Qwen3ForCausalLM at TP=2, TP=2+SP, PP=2, PP=2×VPP=2 and TP=2×PP=2.

Each worker builds the same tiny random HF model (GQA, head_dim ≠ hidden/heads, padded vocab), loads it
with ``load_hf_weights``, and checks (a) fp32 logits within 1e-4 of HF on the real vocab and exactly 0 on
padded columns, (b) ``gather_hf_state_dict`` equals the HF state dict bit for bit on every rank.
"""

import json
import os

import pytest
import torch

from megatron_opd.platform.spawn import run_spawned

LAYOUTS_2 = [dict(tensor_model_parallel_size=2), dict(tensor_model_parallel_size=2, sequence_parallel=True),
             dict(pipeline_model_parallel_size=2), dict(pipeline_model_parallel_size=2,
                                                        virtual_pipeline_model_parallel_size=2)]
LAYOUTS_4 = [dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)]
TOL = 1e-4


def _check_layout(rank, layout, tie, hf, ids, ref_logits):
    import torch.distributed as dist

    from megatron_opd.models import build_qwen3_model, forward_logits, gather_hf_state_dict, load_hf_weights
    from megatron_opd.platform import ParallelConfig, initialize_distributed

    state = initialize_distributed(ParallelConfig(**layout))
    chunks = build_qwen3_model(hf.config, state.config)
    load_hf_weights(chunks, hf.state_dict(), hf.config)
    logits = forward_logits(chunks, ids)
    result = {"layout": layout, "tie": tie, "rank": rank, "has_logits": logits is not None}
    if logits is not None:
        parts = [torch.empty_like(logits) for _ in range(state.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=state.tp_group)
        full = torch.cat(parts, dim=-1)
        result["max_err"] = (full[..., :99] - ref_logits).abs().max().item()
        result["pad_max"] = full[..., 99:].abs().max().item()
        result["shape"] = list(full.shape)
    gathered = gather_hf_state_dict(chunks, hf.config)
    expected = {k: t for k, t in hf.state_dict().items() if not (tie and k == "lm_head.weight")}
    result["same_keys"] = set(gathered) == set(expected)
    result["bit_exact"] = result["same_keys"] and all(torch.equal(gathered[k], expected[k]) for k in expected)
    return result


def _worker(rank, layouts, out_dir, ties=(False, True)):
    from megatron_opd.models.tiny import tiny_qwen3_config, tiny_qwen3_model
    from megatron_opd.platform import destroy_distributed

    results = []
    for tie in ties:
        hf = tiny_qwen3_model(tiny_qwen3_config(tie), seed=1)
        ids = torch.randint(0, 99, (4, 12), generator=torch.Generator().manual_seed(2))
        ref = hf(ids).logits.detach()
        results += [_check_layout(rank, layout, tie, hf, ids, ref) for layout in layouts]
    destroy_distributed()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(results, f)


def _results(tmp_path, world):
    return [r for rank in range(world) for r in json.loads((tmp_path / f"rank{rank}.json").read_text())]


def _assert_results(results):
    for r in results:
        assert r["bit_exact"], f"gather_hf_state_dict differs from HF at {r}"
        if r["has_logits"]:
            assert r["shape"] == [4, 12, 128], r
            assert r["max_err"] < TOL, f"logits differ from HF by {r['max_err']} at {r}"
            assert r["pad_max"] == 0.0, r


def test_models_match_hf_at_tp2_sp_pp2_vpp2(tmp_path):
    run_spawned(_worker, 2, LAYOUTS_2, str(tmp_path))
    results = _results(tmp_path, 2)
    _assert_results(results)
    # every layout produced logits somewhere (last stage) for both tied and untied
    assert sum(r["has_logits"] for r in results) == 2 * (2 + 2 + 1 + 1)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEGATRON_OPD_SLOW") != "1",
                    reason="4 processes: ~30 s alone, ~80 s on a loaded 2-core box; set MEGATRON_OPD_SLOW=1")
def test_models_match_hf_at_tp2_pp2(tmp_path):
    run_spawned(_worker, 4, LAYOUTS_4, str(tmp_path), (False,))  # tied is covered at 2 ranks; 4 ranks cost ~10 s each
    results = _results(tmp_path, 4)
    _assert_results(results)
    assert sum(r["has_logits"] for r in results) == 2
