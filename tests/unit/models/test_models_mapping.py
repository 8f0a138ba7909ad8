"""HF Qwen3 ⇄ Megatron mapping on full tensors: layouts checked against per-head references built by hand."""

import pytest
import torch

from megatron_opd.models.forward import causal_attention_mask, mask_vocab_padding
from megatron_opd.models.megatron_config import padded_vocab_size
from megatron_opd.models.tiny import tiny_qwen3_config, tiny_qwen3_model
from megatron_opd.models.weight_mapping import (
    canonical_name,
    check_hf_state_dict,
    hf_to_megatron_state_dict,
    megatron_to_hf_state_dict,
    merge_qkv,
)
from megatron_opd.models.weights import shard_tensor


def _qkv_reference(q, k, v, nq, nkv, d):
    """Megatron layout written out head by head: for each KV group, its query heads, then k, then v."""
    rows = []
    per_group = nq // nkv
    for g in range(nkv):
        for h in range(g * per_group, (g + 1) * per_group):
            rows.append(q[h * d:(h + 1) * d])
        rows.append(k[g * d:(g + 1) * d])
        rows.append(v[g * d:(g + 1) * d])
    return torch.cat(rows)


def test_merge_qkv_matches_per_head_layout():
    cfg = tiny_qwen3_config(num_attention_heads=6, num_key_value_heads=2, head_dim=6, hidden_size=8)
    q, k, v = torch.randn(36, 8), torch.randn(12, 8), torch.randn(12, 8)
    assert torch.equal(merge_qkv(q, k, v, cfg), _qkv_reference(q, k, v, 6, 2, 6))


@pytest.mark.parametrize("tie", [False, True])
def test_full_round_trip_is_bit_exact(tie):
    cfg = tiny_qwen3_config(tie)
    hf = tiny_qwen3_model(cfg).state_dict()
    mg = hf_to_megatron_state_dict(hf, cfg, padded_vocab=128)
    assert mg["embedding.word_embeddings.weight"].shape == (128, 64)
    assert torch.count_nonzero(mg["embedding.word_embeddings.weight"][99:]) == 0
    assert ("output_layer.weight" in mg) == (not tie)
    back = megatron_to_hf_state_dict(mg, cfg)
    expected = {k: t for k, t in hf.items() if not (tie and k == "lm_head.weight")}
    assert set(back) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


def test_fc1_tp_shard_is_gate_r_then_up_r():
    gate, up = torch.arange(8.0)[:, None].expand(8, 3), 100 + torch.arange(8.0)[:, None].expand(8, 3)
    full = torch.cat([gate, up])
    shard1 = shard_tensor("decoder.layers.0.mlp.linear_fc1.weight", full, tp_rank=1, tp_size=2)
    assert torch.equal(shard1, torch.cat([gate[4:], up[4:]]))
    proj = torch.randn(3, 8)
    assert torch.equal(shard_tensor("decoder.layers.0.self_attention.linear_proj.weight", proj, 1, 2), proj[:, 4:])
    norm = torch.randn(3)
    assert shard_tensor("decoder.layers.0.input_layernorm.weight", norm, 1, 2) is norm


def test_canonical_name_maps_te_layout_and_layer_offset():
    assert canonical_name("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", 2) == \
        "decoder.layers.3.input_layernorm.weight"
    assert canonical_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", 0) == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    assert canonical_name("embedding.word_embeddings.weight", 5) == "embedding.word_embeddings.weight"


def test_bad_hf_state_dicts_name_the_tensor():
    cfg = tiny_qwen3_config()
    good = tiny_qwen3_model(cfg).state_dict()
    missing = {k: t for k, t in good.items() if k != "model.layers.2.mlp.up_proj.weight"}
    with pytest.raises(KeyError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        check_hf_state_dict(missing, cfg)
    wrong = dict(good, **{"model.layers.1.self_attn.k_proj.weight": torch.zeros(24, 64)})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\[24, 64\].*\[48, 64\]"):
        check_hf_state_dict(wrong, cfg)
    extra = dict(good, **{"model.layers.0.mlp.experts.0.up_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.experts"):
        check_hf_state_dict(extra, cfg)


def test_padded_vocab_size_is_tp_independent_multiple():
    assert [padded_vocab_size(99, tp) for tp in (1, 2, 4, 8)] == [128] * 4
    assert padded_vocab_size(151936, 8) == 151936
    assert padded_vocab_size(100, 3) == 384  # lcm(128, 3)
    assert padded_vocab_size(128, 1) == 128


def test_mask_vocab_padding_only_hits_columns_past_the_real_vocab():
    logits = torch.randn(2, 3, 64)  # TP rank 1 of 2 over a padded vocab of 128: global ids 64..127
    masked = mask_vocab_padding(logits, vocab_size=99, tp_rank=1)
    assert torch.equal(masked[..., :35], logits[..., :35])
    assert torch.isneginf(masked[..., 35:]).all()
    assert torch.equal(mask_vocab_padding(logits, 99, tp_rank=0), logits)


def test_causal_mask_masks_the_future():
    mask = causal_attention_mask(4)
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], torch.ones(4, 4).triu(1).bool())


def test_tied_moe_export_carries_lm_head_as_a_copy_of_the_embedding():
    """SGLang 0.5.23's Qwen3-MoE ignores tie_word_embeddings: an export without lm_head is served (and kept
    across a disk weight sync) with an lm_head that is not the embedding. The export writes the copy; it
    maps back to the same Megatron tensors (the copy is ignored on the way in)."""
    from megatron_opd.models.tiny import tiny_qwen3_moe_config, tiny_qwen3_moe_model
    from megatron_opd.models.weight_mapping import split_fused_experts

    cfg = tiny_qwen3_moe_config(tie_word_embeddings=True)
    hf = split_fused_experts(tiny_qwen3_moe_model(cfg).state_dict())
    mg = hf_to_megatron_state_dict(hf, cfg, padded_vocab=128)
    back = megatron_to_hf_state_dict(mg, cfg)
    assert torch.equal(back["lm_head.weight"], hf["model.embed_tokens.weight"])
    assert back["lm_head.weight"].data_ptr() != back["model.embed_tokens.weight"].data_ptr()  # safetensors: no shared storage
    check_hf_state_dict(back, cfg)
    again = hf_to_megatron_state_dict(back, cfg, padded_vocab=128)
    assert set(again) == set(mg) and all(torch.equal(again[k], mg[k]) for k in mg)
