"""Read and write HF checkpoints: sharded safetensors + ``model.safetensors.index.json``.

Writes are atomic: everything goes into a hidden temporary sibling directory that is renamed onto
the target only once complete, so an interrupted export never leaves a directory that looks done.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
"""Files copied next to exported weights: the config and every tokenizer file that exists."""


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index_path}: corrupt safetensors index (needs a 'weight_map' object): {err}") from err
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path}: 'weight_map' must map tensor names to shard files")
    return weight_map


def _load_shard(path: Path, names: Iterable[str] | None) -> dict[str, torch.Tensor]:
    """Tensors ``names`` (all when None) of one safetensors file; errors name the file and tensor."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"safetensors shard missing: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            present = set(handle.keys())
            wanted = list(present) if names is None else list(names)
            for name in wanted:
                if name not in present:
                    raise KeyError(f"{path}: tensor {name!r} listed in the index is not in this shard")
            return {name: handle.get_tensor(name) for name in wanted}
    except SafetensorError as err:
        raise ValueError(f"{path}: corrupt safetensors file: {err}") from err


def read_hf_checkpoint(hf_dir, progress: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint directory (sharded with an index, or one ``model.safetensors``).

    Raises:
        FileNotFoundError naming the directory / shard; KeyError naming a tensor missing from its
        shard; ValueError naming a corrupt index or shard.
    """
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"HF checkpoint directory not found: {hf_dir}")
    index = hf_dir / INDEX_NAME
    if not index.is_file():
        if (hf_dir / SINGLE_NAME).is_file():
            return _load_shard(hf_dir / SINGLE_NAME, None)
        raise FileNotFoundError(f"{hf_dir}: no {INDEX_NAME} or {SINGLE_NAME} (only safetensors checkpoints "
                                "are read)")
    by_shard: dict[str, list[str]] = {}
    for name, shard in _read_index(index).items():
        by_shard.setdefault(shard, []).append(name)
    tensors = {}
    for shard in _progress(sorted(by_shard), progress, "reading shards"):
        tensors.update(_load_shard(hf_dir / shard, by_shard[shard]))
    return tensors


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="file")


def plan_shards(state_dict: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names (in order) into shards of at most ``max_shard_bytes`` (a bigger tensor is alone)."""
    shards, current, size = [], [], 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _write_shards(tmp: Path, state_dict: dict, max_shard_bytes: int, progress: bool) -> None:
    from safetensors.torch import save_file

    shards = plan_shards(state_dict, max_shard_bytes)
    weight_map, total = {}, 0
    for i, names in enumerate(_progress(shards, progress, "writing shards")):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state_dict[n].detach().contiguous().cpu() for n in names}, str(tmp / file_name),
                  metadata={"format": "pt"})
        weight_map.update({n: file_name for n in names})
        total += sum(state_dict[n].numel() * state_dict[n].element_size() for n in names)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _copy_side_files(tmp: Path, hf_config_dir: Path) -> None:
    if not (hf_config_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_config_dir}: no config.json to copy next to the weights")
    for name in HF_SIDE_FILES:
        if (hf_config_dir / name).is_file():
            shutil.copy2(hf_config_dir / name, tmp / name)


def write_hf_checkpoint(out_dir, state_dict: dict[str, torch.Tensor], hf_config_dir,
                        max_shard_bytes: int = 5 * 2**30, overwrite: bool = False, progress: bool = False) -> Path:
    """Write ``state_dict`` as sharded safetensors + index, plus config/tokenizer files from ``hf_config_dir``.

    Atomic: written into a temporary sibling, renamed onto ``out_dir`` when complete. Refuses to replace
    an existing non-empty ``out_dir`` unless ``overwrite``.
    """
    out_dir, hf_config_dir = Path(out_dir), Path(hf_config_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary directory
    try:
        _copy_side_files(tmp, hf_config_dir)
        _write_shards(tmp, state_dict, max_shard_bytes, progress)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` onto ``dst``; an existing ``dst`` is moved aside first and removed after."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
