"""Prompt datasets: malformed input is refused with the file and row named; filtering is counted."""

import json

import pytest

from megatron_opd.data.prompts import DataError, load_prompts
from megatron_opd.data.toy_task import build_toy_tokenizer, generate_toy_problems
from megatron_opd.training.config import DataConfig


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer()


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_loads_and_renders_with_chat_template(tmp_path, tokenizer):
    rows = generate_toy_problems(5, seed=0)
    path = write_rows(tmp_path / "d.jsonl", rows)
    records, counts = load_prompts(DataConfig(data_path=str(path)), tokenizer, need_solution=True)
    assert counts == {"rows": 5, "kept": 5, "dropped_too_long": 0}
    text = tokenizer.decode(records[0].prompt_ids)
    assert text == f"<|im_start|>user\n{rows[0]['problem']}<|im_end|>\n<|im_start|>assistant\n"
    assert records[0].answer == rows[0]["answer"] and records[0].solution == rows[0]["solution"]


def test_length_filter_is_counted(tmp_path, tokenizer):
    rows = [{"problem": "1+1=?", "answer": "2"}, {"problem": "1" * 200, "answer": "1"}]
    path = write_rows(tmp_path / "d.jsonl", rows)
    records, counts = load_prompts(DataConfig(data_path=str(path), max_prompt_length=50), tokenizer)
    assert len(records) == 1 and counts["dropped_too_long"] == 1


def test_malformed_json_names_file_and_row(tmp_path, tokenizer):
    path = write_rows(tmp_path / "bad.jsonl", [{"problem": "1+1=?", "answer": "2"}, "{not json"])
    with pytest.raises(DataError, match=r"bad\.jsonl, row 2: not valid JSON"):
        load_prompts(DataConfig(data_path=str(path)), tokenizer)


def test_missing_field_names_row_and_field(tmp_path, tokenizer):
    path = write_rows(tmp_path / "d.jsonl", [{"problem": "1+1=?", "answer": "2"}, {"question": "x"}])
    with pytest.raises(DataError, match=r"row 2: missing field 'problem'"):
        load_prompts(DataConfig(data_path=str(path)), tokenizer)


def test_empty_answer_is_refused(tmp_path, tokenizer):
    path = write_rows(tmp_path / "d.jsonl", [{"problem": "1+1=?", "answer": ""}])
    with pytest.raises(DataError, match=r"row 1: field 'answer' must be a non-empty string"):
        load_prompts(DataConfig(data_path=str(path)), tokenizer)


def test_missing_file_and_unknown_type(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no such file"):
        load_prompts(DataConfig(data_path=str(tmp_path / "nope.jsonl")), tokenizer)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_prompts(DataConfig(data_path=str(tmp_path / "d.csv")), tokenizer)


def test_parquet_is_read(tmp_path, tokenizer):
    import datasets

    datasets.Dataset.from_list([{"q": "2+2=?", "a": 4}]).to_parquet(str(tmp_path / "d.parquet"))
    records, _ = load_prompts(DataConfig(data_path=str(tmp_path / "d.parquet"), prompt_field="q", answer_field="a"),
                              tokenizer)
    assert records[0].answer == "4"
