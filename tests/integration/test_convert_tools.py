"""tools/convert_hf_to_megatron.py and tools/convert_megatron_to_hf.py end to end.

HF (sharded safetensors + index) → Megatron dist-checkpoint → HF must be bit-exact tensor by tensor, for
tied and untied tiny Qwen3 models and two tiny Qwen3-MoE models (8 experts top-2; 16 experts top-8, tied);
every bad input must fail with exit code 1, a message naming the
file/tensor, and no output directory. Both tools run inside one child process per test (imports of
Megatron cost ~10 s per process on a shared 2-core machine).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"


def _run_driver(func: str, *args: str) -> dict:
    code = (f"import sys, json; sys.path[:0] = [{str(TOOLS)!r}, {str(Path(__file__).parent)!r}]; "
            f"import test_convert_tools as t; print('RESULT' + json.dumps(t.{func}(*sys.argv[1:])))")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": ""}, cwd=REPO, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def _make_hf_dir(path: Path, tie: bool, seed: int) -> None:
    from megatron_opd.models.tiny import tiny_qwen3_config, tiny_qwen3_model

    tiny_qwen3_model(tiny_qwen3_config(tie), seed=seed).save_pretrained(path, max_shard_size="200KB")
    (path / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (path / "tokenizer_config.json").write_text("{}")


MOE_MODELS = {"moe_e8_top2": dict(num_experts=8, num_experts_per_tok=2),
              "moe_e16_top8": dict(num_experts=16, num_experts_per_tok=8, tie_word_embeddings=True)}
ROUND_TRIP_CASES = [False, True, *MOE_MODELS]


def _make_moe_hf_dir(path: Path, name: str, seed: int) -> None:
    from megatron_opd.models.tiny import tiny_qwen3_moe_config, tiny_qwen3_moe_model

    tiny_qwen3_moe_model(tiny_qwen3_moe_config(**MOE_MODELS[name]), seed=seed).save_pretrained(
        path, max_shard_size="200KB")
    (path / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (path / "tokenizer_config.json").write_text("{}")


def drive_round_trip(tmp: str) -> dict:
    """Child process: HF → Megatron → HF for untied and tied dense models and two Qwen3-MoE models."""
    import convert_hf_to_megatron
    import convert_megatron_to_hf

    codes = {}
    for case in ROUND_TRIP_CASES:
        hf, mc, out = Path(tmp, f"hf{case}"), Path(tmp, f"mc{case}"), Path(tmp, f"out{case}")
        if case in MOE_MODELS:
            _make_moe_hf_dir(hf, case, seed=7)
        else:
            _make_hf_dir(hf, case, seed=7)
        codes[f"to_mcore{case}"] = convert_hf_to_megatron.main(["--hf-dir", str(hf), "--save", str(mc)])
        codes[f"to_hf{case}"] = convert_megatron_to_hf.main(["--load", str(mc), "--save", str(out), "--hf-config",
                                                            str(hf), "--max-shard-size", "0.0002"])
    return codes


def test_hf_megatron_hf_round_trip_is_bit_exact(tmp_path):
    from megatron_opd.models.hf_io import read_hf_checkpoint

    codes = _run_driver("drive_round_trip", str(tmp_path))
    assert set(codes.values()) == {0}, codes
    for case in ROUND_TRIP_CASES:
        src, out = read_hf_checkpoint(tmp_path / f"hf{case}"), read_hf_checkpoint(tmp_path / f"out{case}")
        # a tied MoE export also carries the embedding as lm_head (SGLang's Qwen3-MoE ignores the tie)
        tied_moe = MOE_MODELS.get(case, {}).get("tie_word_embeddings", False)
        assert len(src) > 1 and set(out) == set(src) | ({"lm_head.weight"} if tied_moe else set())
        if tied_moe:
            assert torch.equal(out["lm_head.weight"], src["model.embed_tokens.weight"])
        for name, tensor in src.items():
            assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor), name
        index = json.loads((tmp_path / f"out{case}" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1  # really sharded
        for side in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (tmp_path / f"out{case}" / side).read_bytes() == (tmp_path / f"hf{case}" / side).read_bytes()
        assert not list(tmp_path.glob(".out*")) and not list(tmp_path.glob("*.tmp"))


def _break_hf_dirs(tmp: Path) -> dict[str, Path]:
    """One broken copy of a good HF dir per bad-input case."""
    import shutil

    from safetensors.torch import load_file, save_file

    good = tmp / "good"
    _make_hf_dir(good, tie=False, seed=8)
    index = json.loads((good / "model.safetensors.index.json").read_text())
    cases = {}
    for name in ("arch", "missing", "shape", "corrupt", "unlisted"):
        cases[name] = tmp / name
        shutil.copytree(good, cases[name])
    config = json.loads((good / "config.json").read_text())
    (cases["arch"] / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    victim = "model.layers.1.mlp.up_proj.weight"
    shard = cases["missing"] / index["weight_map"][victim]
    save_file({k: v for k, v in load_file(shard).items() if k != victim}, str(shard), metadata={"format": "pt"})
    drop = dict(index, weight_map={k: v for k, v in index["weight_map"].items() if k != victim})
    (cases["unlisted"] / "model.safetensors.index.json").write_text(json.dumps(drop))
    shard = cases["unlisted"] / index["weight_map"][victim]
    save_file({k: v for k, v in load_file(shard).items() if k != victim}, str(shard), metadata={"format": "pt"})
    (cases["shape"] / "config.json").write_text(json.dumps(dict(config, intermediate_size=128)))
    first_shard = cases["corrupt"] / sorted(set(index["weight_map"].values()))[0]
    first_shard.write_bytes(first_shard.read_bytes()[:1000])
    return cases


def drive_bad_inputs(tmp: str) -> dict:
    """Child process: run each bad case through the CLI, capture exit code and stderr."""
    import contextlib
    import io

    import convert_hf_to_megatron
    import convert_megatron_to_hf

    cases = _break_hf_dirs(Path(tmp))
    results = {}

    def run(key, tool, argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = tool.main(argv)
        results[key] = {"code": code, "stderr": err.getvalue()}

    for name, hf in cases.items():
        run(name, convert_hf_to_megatron, ["--hf-dir", str(hf), "--save", f"{tmp}/out_{name}"])
    run("nodir", convert_hf_to_megatron, ["--hf-dir", f"{tmp}/nowhere", "--save", f"{tmp}/out_nodir"])
    run("good", convert_hf_to_megatron, ["--hf-dir", f"{tmp}/good", "--save", f"{tmp}/mc"])
    run("exists", convert_hf_to_megatron, ["--hf-dir", f"{tmp}/good", "--save", f"{tmp}/mc"])
    run("mismatch", convert_megatron_to_hf, ["--load", f"{tmp}/mc", "--save", f"{tmp}/out_mismatch",
                                             "--hf-config", f"{tmp}/shape"])
    run("not_ckpt", convert_megatron_to_hf, ["--load", f"{tmp}/good", "--save", f"{tmp}/out_not_ckpt",
                                             "--hf-config", f"{tmp}/good"])
    return results


EXPECTED = {
    "arch": r"unsupported architecture \(model_type='llama'",
    "missing": r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' listed in the index is not in this shard",
    "unlisted": r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'",
    "shape": r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[96, 64\], expected \[128, 64\]",
    "corrupt": r"model-00001-of-\d+\.safetensors: corrupt safetensors file",
    "nodir": r"HF config not found: .*nowhere",
    "exists": r"mc exists and is not empty \(pass --overwrite",
    "mismatch": r"tensor 'decoder\.layers\.mlp\.linear_fc[12]\.weight' has shape .* but the model expects",
    "not_ckpt": r"no megatron_opd_checkpoint\.json: incomplete or not a megatron-opd checkpoint",
}


def test_bad_inputs_fail_cleanly_with_named_tensor(tmp_path):
    import re

    results = _run_driver("drive_bad_inputs", str(tmp_path))
    assert results["good"]["code"] == 0, results["good"]
    for case, pattern in EXPECTED.items():
        assert results[case]["code"] == 1, (case, results[case])
        assert re.search(pattern, results[case]["stderr"]), (case, results[case]["stderr"])
        if case != "exists":
            assert not (tmp_path / f"out_{case}").exists(), f"{case} left an output directory"
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".out_*"))


@pytest.mark.parametrize("tool", ["convert_hf_to_megatron.py", "convert_megatron_to_hf.py"])
def test_help_explains_flags(tool):
    proc = subprocess.run([sys.executable, str(TOOLS / tool), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in (["--hf-dir", "--save"] if "hf_to" in tool else ["--load", "--save", "--hf-config"]):
        assert flag in proc.stdout
