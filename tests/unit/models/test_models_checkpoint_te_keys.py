"""Checkpoints written with the local layer spec (CPU: tools/convert_hf_to_megatron.py, CPU training) load into
a model with the Transformer Engine spec's key set, and back.

TE cannot be imported here, so the child process builds a "TE-keyed" model: the local spec with its q/k and
final RMSNorms replaced by a torch RMSNorm that carries an ``_extra_state`` exactly as TE's RMSNorm does
(TE 2.9 ``transformer_engine/pytorch/ops/op.py`` ``BasicOperation.get_extra_state``: an empty uint8 tensor
without FP8; ``set_extra_state`` returns on None or an empty tensor). Megatron's own sharded-state-dict code then
produces the TE spec's ``_extra_state`` ShardedObjects. The key set is checked against the TE spec of
megatron-core 0.16.1 (``get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)``): TELayerNormColumnParallelLinear
(linear_qkv, linear_fc1) and TERowParallelLinear (linear_proj, linear_fc2) — their local counterparts also carry
one —, TENorm (q_layernorm, k_layernorm, the block's final_layernorm); TEDotProductAttention's sharded state dict
is empty without a learnable softmax offset.
"""

import json
import subprocess
import sys

TE_EXTRA_STATE_KEYS = sorted(
    [f"decoder.layers.{m}._extra_state" for m in ("self_attention.linear_qkv", "self_attention.linear_proj",
                                                  "self_attention.q_layernorm", "self_attention.k_layernorm",
                                                  "mlp.linear_fc1", "mlp.linear_fc2")]
    + ["decoder.final_layernorm._extra_state"])

CHILD = r"""
import json, sys, torch
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron_opd.platform import ParallelConfig, initialize_distributed, destroy_distributed
from megatron_opd.models import build_qwen3_model, load_hf_weights, load_checkpoint, save_checkpoint
from megatron_opd.models import checkpoint as ckpt_mod, provider
from megatron_opd.models.tiny import tiny_qwen3_config, tiny_qwen3_model

class TEStyleRMSNorm(provider.TorchRMSNorm):
    received = []
    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)
    def set_extra_state(self, state):
        TEStyleRMSNorm.received.append(None if state is None else tuple(state.shape))

def te_keyed(build):
    local_spec, block_spec = provider._local_layer_spec, provider._block_spec
    def layer_spec(num_experts=None):
        spec = local_spec(num_experts)
        spec.submodules.self_attention.submodules.q_layernorm = TEStyleRMSNorm
        spec.submodules.self_attention.submodules.k_layernorm = TEStyleRMSNorm
        return spec
    def block(*args, **kwargs):
        sub = block_spec(*args, **kwargs)
        sub.layer_norm = TEStyleRMSNorm
        return sub
    provider._local_layer_spec, provider._block_spec = layer_spec, block
    try:
        return build()
    finally:
        provider._local_layer_spec, provider._block_spec = local_spec, block_spec

def params(chunks):
    return {n: p.detach().clone() for n, p in chunks[0].named_parameters()}

def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)

tmp = sys.argv[1]
state = initialize_distributed(ParallelConfig())
hf = tiny_qwen3_model(tiny_qwen3_config(False), seed=5)
build = lambda: build_qwen3_model(hf.config, state.config)
out = {}
local = build()
load_hf_weights(local, hf.state_dict(), hf.config)
save_checkpoint(f"{tmp}/local", local, extra_state={"source": "local spec"}, save_rng=False)

te = te_keyed(build)
out["te_extra_keys"] = sorted({v.key for v in te[0].sharded_state_dict().values()
                               if isinstance(v, ShardedObject) and v.key.endswith("_extra_state")})
out["local_extra_keys"] = sorted({v.key for v in local[0].sharded_state_dict().values()
                                  if isinstance(v, ShardedObject) and v.key.endswith("_extra_state")})
out["te_differs_before_load"] = not same(params(te), params(local))
load_checkpoint(f"{tmp}/local", te)  # local-spec checkpoint -> TE key set
out["te_equal_after_load"] = same(params(te), params(local))
out["te_norms_got_own_state"] = (sorted(set(TEStyleRMSNorm.received)) == [(0,)]
                                 and len(TEStyleRMSNorm.received) == 2 * hf.config.num_hidden_layers + 1)

save_checkpoint(f"{tmp}/te", te, save_rng=False)  # TE key set -> local spec, and back into the TE key set
local2 = build()
load_checkpoint(f"{tmp}/te", local2)
out["local_equal_after_te_load"] = same(params(local2), params(local))
te2 = te_keyed(build)
template = {"model0": te2[0].sharded_state_dict()}
out["kept_from_te_ckpt"] = ckpt_mod._keep_absent_extra_states(template, 1, ckpt_mod.Path(f"{tmp}/te"))
load_checkpoint(f"{tmp}/te", te2)
out["te2_equal"] = same(params(te2), params(local))

# Only _extra_state objects are kept at the module's value; any other absent object stays a load request.
template = {"model0": te_keyed(build)[0].sharded_state_dict()}
template["model0"]["decoder.bogus"] = ShardedObject("decoder.bogus", None, (1,), (0,), replica_id=0)
kept = ckpt_mod._keep_absent_extra_states(template, 1, ckpt_mod.Path(f"{tmp}/local"))
out["kept_from_local_ckpt"] = kept
out["bogus_still_requested"] = isinstance(template["model0"]["decoder.bogus"], ShardedObject)
destroy_distributed()
print("RESULT" + json.dumps(out))
"""


def test_local_spec_checkpoints_load_with_the_te_key_set_and_back(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1][len("RESULT"):])
    assert out["te_extra_keys"] == TE_EXTRA_STATE_KEYS  # the stand-in produces the TE spec's key set
    missing_on_cpu = ["decoder.final_layernorm._extra_state", "decoder.layers.self_attention.k_layernorm._extra_state",
                      "decoder.layers.self_attention.q_layernorm._extra_state"]
    assert sorted(set(TE_EXTRA_STATE_KEYS) - set(out["local_extra_keys"])) == missing_on_cpu
    assert out["te_differs_before_load"] and out["te_equal_after_load"]
    assert out["te_norms_got_own_state"]  # every layer's q and k norm and the final norm: their own empty state
    assert out["local_equal_after_te_load"] and out["te2_equal"]
    assert out["kept_from_te_ckpt"] == []  # a TE-keyed checkpoint has them all
    assert out["kept_from_local_ckpt"] == missing_on_cpu
    assert out["bogus_still_requested"]
