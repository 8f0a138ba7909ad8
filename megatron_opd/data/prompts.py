"""Prompt datasets for OPD: a hub dataset by name (real users), a local JSONL/Parquet file, or the
embedded toy task; rendered with the student's chat template and filtered by prompt length.

Every malformed row raises ``DataError`` naming the file and the row, before training starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file (or dataset) and the row."""


@dataclass(kw_only=True)
class PromptRecord:
    """One training prompt: the rendered prompt ids plus what grading and SFT need."""

    index: int
    prompt_ids: list[int]
    answer: str
    solution: str | None = None


def read_records(path: str, split: str = "train") -> tuple[list[dict], str]:
    """Rows of a local JSONL/Parquet file, or of a hub dataset when ``path`` is not a file.

    Returns (rows, source name used in error messages).
    """
    if path == "toy":
        from megatron_opd.data.toy_task import generate_toy_problems

        return generate_toy_problems(4096, seed=0, split="train"), "toy task (train split)"
    file = Path(path)
    if file.suffix == ".jsonl" or file.suffix == ".json":
        return _read_jsonl(file), str(file)
    if file.suffix == ".parquet":
        if not file.exists():
            raise DataError(f"{file}: no such file")
        import datasets

        return list(datasets.Dataset.from_parquet(str(file))), str(file)
    if file.exists():
        raise DataError(f"{file}: unsupported file type {file.suffix!r} (use .jsonl or .parquet)")
    import datasets  # a hub dataset name: real users, network needed

    try:
        return list(datasets.load_dataset(path, split=split)), f"hub dataset {path}[{split}]"
    except Exception as err:  # noqa: BLE001 - re-raised with the name of what failed
        raise DataError(f"could not load {path!r}: not a local file, and the hub dataset failed: {err}") from err


def _read_jsonl(file: Path) -> list[dict]:
    if not file.exists():
        raise DataError(f"{file}: no such file")
    rows = []
    with file.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{file}, row {line_no}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DataError(f"{file}, row {line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise DataError(f"{file}: no rows")
    return rows


def render_prompt(tokenizer, problem: str, *, chat_template: bool, enable_thinking: bool, instruction: str) -> list[int]:
    """Prompt ids as the student sees them: the chat template (generation prompt added) or raw text."""
    text = f"{problem}{instruction}"
    if not chat_template:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": text}]
    kwargs = {"enable_thinking": enable_thinking} if enable_thinking is not None else {}
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def load_prompts(data_cfg, tokenizer, *, need_solution: bool = False) -> tuple[list[PromptRecord], dict]:
    """Read, validate, render and length-filter the prompts. Returns (records, counts)."""
    rows, source = read_records(data_cfg.data_path)
    records, too_long = [], 0
    for row_no, row in enumerate(rows, start=1):
        problem = _field(row, data_cfg.prompt_field, source, row_no)
        answer = _field(row, data_cfg.answer_field, source, row_no)
        solution = _field(row, data_cfg.solution_field, source, row_no) if need_solution else None
        ids = render_prompt(tokenizer, problem, chat_template=data_cfg.chat_template,
                            enable_thinking=data_cfg.enable_thinking, instruction=data_cfg.instruction)
        if len(ids) > data_cfg.max_prompt_length:
            too_long += 1
            continue
        records.append(PromptRecord(index=len(records), prompt_ids=ids, answer=answer, solution=solution))
    if not records:
        raise DataError(f"{source}: all {len(rows)} prompts are longer than --max-prompt-length "
                        f"{data_cfg.max_prompt_length}")
    counts = {"rows": len(rows), "kept": len(records), "dropped_too_long": too_long}
    return records, counts


def _field(row: dict, name: str, source: str, row_no: int) -> str:
    if name not in row:
        raise DataError(f"{source}, row {row_no}: missing field {name!r} (fields: {sorted(row)}); "
                        f"choose the field with --prompt-field/--answer-field/--solution-field")
    value = row[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{source}, row {row_no}: field {name!r} must be a non-empty string, got {value!r}")
    return value
