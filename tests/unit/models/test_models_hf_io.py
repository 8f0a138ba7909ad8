"""Sharded safetensors read/write: round trip, atomic output, and clear errors on bad input."""

import json

import pytest
import torch

from megatron_opd.models import hf_io
from megatron_opd.models.hf_io import read_hf_checkpoint, write_hf_checkpoint


@pytest.fixture
def config_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "qwen3"}')
    (src / "tokenizer_config.json").write_text("{}")
    (src / "merges.txt").write_text("a b\n")
    return src


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(16, 16, generator=gen) for i in range(5)}  # 1 KiB each


def test_round_trip_with_shards_and_side_files(tmp_path, config_dir):
    tensors = _tensors()
    out = write_hf_checkpoint(tmp_path / "out", tensors, config_dir, max_shard_bytes=2100)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # 2 + 2 + 1 tensors of 1024 bytes
    assert index["metadata"]["total_size"] == 5 * 1024
    assert (out / "merges.txt").read_text() == "a b\n" and (out / "config.json").is_file()
    back = read_hf_checkpoint(out)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_write_leaves_nothing_that_looks_complete(tmp_path, config_dir, monkeypatch):
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        open(path, "wb").write(b"x")

    monkeypatch.setattr("safetensors.torch.save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_hf_checkpoint(tmp_path / "out", _tensors(), config_dir, max_shard_bytes=2100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_refuses_to_overwrite_unless_asked(tmp_path, config_dir):
    out = write_hf_checkpoint(tmp_path / "out", _tensors(), config_dir)
    with pytest.raises(FileExistsError, match=r"out exists and is not empty"):
        write_hf_checkpoint(out, _tensors(), config_dir)
    write_hf_checkpoint(out, {"x": torch.ones(2)}, config_dir, overwrite=True)
    assert set(read_hf_checkpoint(out)) == {"x"}


def test_read_errors_name_file_and_tensor(tmp_path, config_dir):
    out = write_hf_checkpoint(tmp_path / "out", _tensors(), config_dir, max_shard_bytes=2100)
    index_path = out / hf_io.INDEX_NAME
    index = json.loads(index_path.read_text())
    index["weight_map"]["t_ghost"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"tensor 't_ghost' listed in the index is not in this shard"):
        read_hf_checkpoint(out)
    del index["weight_map"]["t_ghost"]
    index_path.write_text(json.dumps(index))
    (out / "model-00002-of-00003.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"model-00002-of-00003\.safetensors: corrupt safetensors file"):
        read_hf_checkpoint(out)
    (out / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard missing: .*model-00002-of-00003"):
        read_hf_checkpoint(out)
    index_path.write_text("{]")
    with pytest.raises(ValueError, match=r"corrupt safetensors index"):
        read_hf_checkpoint(out)
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors\.index\.json or model\.safetensors"):
        read_hf_checkpoint(config_dir)
