"""Qwen3-MoE on Megatron at EP=2, TP=2+SP (experts split by expert-TP), TP=2+SP×EP=2 (ETP=1) and PP=2, from
checkpoints made by ``tools/convert_hf_to_megatron.py`` (written at TP=EP=1, resharded on load).

Two tiny models: 8 experts top-2 with HF ``norm_topk_prob=False`` (Megatron's pre-softmax routing) and 16
experts top-8 with ``norm_topk_prob=True`` (Qwen3-30B-A3B's routing). At every layout: ``gather_hf_state_dict``
equals the HF checkpoint bit for bit (so conversion HF → Megatron → HF is exact at that layout) and fp32
logits match transformers' within 1e-5. A checkpoint saved at EP=2 loads bit-exactly at EP=1 (one rank, TP=2)
and one saved at EP=1 at EP=2 (checkpoint EP resharding).
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

from megatron_opd.platform.spawn import run_spawned

REPO = Path(__file__).resolve().parents[2]
MODELS = {"e8_top2": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
          "e16_top8": dict(num_experts=16, num_experts_per_tok=8, norm_topk_prob=True)}
LAYOUTS = {"ep2": dict(expert_model_parallel_size=2),
           "tp2_sp_etp2": dict(tensor_model_parallel_size=2, sequence_parallel=True),
           "tp2_sp_ep2_etp1": dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                   expert_model_parallel_size=2, expert_tensor_parallel_size=1),
           "pp2": dict(pipeline_model_parallel_size=2)}
LOGIT_TOL = 1e-5


def _hf(name):
    from megatron_opd.models.tiny import tiny_qwen3_moe_config, tiny_qwen3_moe_model

    return tiny_qwen3_moe_model(tiny_qwen3_moe_config(**MODELS[name]), seed=11)


def _compare(chunks, state, hf) -> dict:
    import torch.distributed as dist

    from megatron_opd.models import forward_logits, gather_hf_state_dict
    from megatron_opd.models.weight_mapping import split_fused_experts

    gathered = gather_hf_state_dict(chunks, hf.config)
    expected = split_fused_experts(hf.state_dict())
    out = {"exact": set(gathered) == set(expected) and all(torch.equal(gathered[k], expected[k]) for k in expected)}
    ids = torch.randint(0, 99, (2, 10), generator=torch.Generator().manual_seed(3))
    logits = forward_logits(chunks, ids)
    if logits is not None:
        parts = [torch.empty_like(logits) for _ in range(state.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=state.tp_group)  # collective over TP
        out["logit_err"] = (torch.cat(parts, -1)[..., :99] - hf(ids).logits).abs().max().item()
    return out


def _fresh(layout, hf):
    from megatron_opd.models import build_qwen3_model
    from megatron_opd.platform import ParallelConfig, initialize_distributed

    state = initialize_distributed(ParallelConfig(**layout))
    return state, build_qwen3_model(hf.config, state.config)


def _worker(rank, tmp):
    from megatron_opd.models import load_checkpoint, save_checkpoint
    from megatron_opd.platform import destroy_distributed

    out = {}
    for name in MODELS:
        hf = _hf(name)
        for layout_name, layout in LAYOUTS.items():
            state, chunks = _fresh(layout, hf)
            load_checkpoint(f"{tmp}/converted_{name}", chunks)
            out[f"{name}/{layout_name}"] = _compare(chunks, state, hf)
            if layout_name == "ep2":
                save_checkpoint(f"{tmp}/saved_ep2_{name}", chunks)
        # EP=1: every rank holds all experts
        state, chunks = _fresh(dict(tensor_model_parallel_size=2, sequence_parallel=True), hf)
        load_checkpoint(f"{tmp}/saved_ep2_{name}", chunks)
        out[f"{name}/ep2_saved_loaded_at_ep1"] = _compare(chunks, state, hf)
    destroy_distributed()
    Path(f"{tmp}/rank{rank}.json").write_text(json.dumps(out))


def _convert(tmp_path, name) -> None:
    hf_dir = tmp_path / f"hf_{name}"
    _hf(name).save_pretrained(hf_dir)
    subprocess.run([sys.executable, str(REPO / "tools/convert_hf_to_megatron.py"), "--hf-dir", str(hf_dir),
                    "--save", str(tmp_path / f"converted_{name}")], check=True, capture_output=True,
                   env={"OMP_NUM_THREADS": "1", "PATH": ""})


def test_moe_layouts_from_converted_checkpoints(tmp_path):
    for name in MODELS:
        _convert(tmp_path, name)
    run_spawned(_worker, 2, str(tmp_path))
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(out) == len(MODELS) * (len(LAYOUTS) + 1)
        for case, result in out.items():
            assert result["exact"], f"rank {rank} {case}: gathered HF tensors differ from the HF model"
            assert result.get("logit_err", 0.0) < LOGIT_TOL, f"rank {rank} {case}: {result}"
        assert any("logit_err" in r for r in out.values())
