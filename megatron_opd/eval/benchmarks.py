"""Benchmark loading: AIME24, AIME25, MATH500, AMC23 (hub or local JSONL) and the embedded toy task.

Every benchmark comes back as a list of records ``{"id", "problem", "answer"}`` (all strings; other
fields of local files are kept). By default the records are read from the hub with ``datasets``:

| name    | hub dataset (config, split)                              | records |
|---------|----------------------------------------------------------|---------|
| aime24  | ``HuggingFaceH4/aime_2024`` (default, train)             | 30      |
| aime25  | ``opencompass/AIME2025`` (AIME2025-I + AIME2025-II, test) | 30      |
| math500 | ``HuggingFaceH4/MATH-500`` (default, test)               | 500     |
| amc23   | ``math-ai/amc23`` (default, test)                        | 40      |

With ``data_dir`` they are read from ``{data_dir}/{name}.jsonl`` instead (same record shape; this
is how the tests and offline machines run). Counts are checked either way, so a wrong or truncated
file fails loudly. ``toy`` is the held-out split of the embedded task (``data.toy_task``);
``chain`` / ``chain_val`` are the test / validation splits of the long-horizon task (``data.chain_task``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_opd.data.chain_task import generate_chain_problems
from megatron_opd.data.toy_task import generate_toy_problems

PAPER_BENCHMARKS = ("aime24", "aime25", "math500", "amc23")
TOY_BENCHMARK = "toy"
TOY_EVAL_SEED = 2024
TOY_EVAL_SIZE = 128
TOY_VAL_BENCHMARK = "toy_val"
TOY_VAL_SEED = 2025
"""``toy_val``: validation problems for choosing hyper-parameters (e.g. ``megatron-opd variants --lr-sweep``):
the toy test split's region of problem space (so never a training problem), minus the ``toy`` problems."""
CHAIN_BENCHMARKS = {"chain": "test", "chain_val": "validation"}
"""Long-horizon task benchmarks and their splits (never the train split)."""
CHAIN_EVAL_SEED = 2024
CHAIN_EVAL_SIZE = 256
RAW_PROMPT_BENCHMARKS = tuple(CHAIN_BENCHMARKS)
"""Trained and evaluated on the raw problem text, without the chat template (``data.chain_task``)."""


def default_chat_template(benchmarks) -> bool:
    """Whether ``benchmarks`` are rendered with the chat template: not the raw-prompt ones. One run has
    one prompt format, so mixing raw-prompt and chat-template benchmarks is refused."""
    raw = [b for b in benchmarks if b in RAW_PROMPT_BENCHMARKS]
    if raw and len(raw) < len(benchmarks):
        raise ValueError(f"--benchmarks: {', '.join(raw)} take raw prompts and "
                         f"{', '.join(b for b in benchmarks if b not in raw)} the chat template; "
                         f"evaluate them in separate runs")
    return not raw
SYNTHETIC_BENCHMARKS = (TOY_BENCHMARK, TOY_VAL_BENCHMARK, *CHAIN_BENCHMARKS)
"""Trained on bare problems: no instruction is appended (``EvalConfig.instruction_for``)."""


@dataclass(frozen=True)
class HubSource:
    """Where a benchmark lives on the hub; several configs are concatenated in order."""

    repo: str
    split: str
    configs: tuple[str | None, ...] = (None,)


HUB_SOURCES = {
    "aime24": HubSource("HuggingFaceH4/aime_2024", "train"),
    "aime25": HubSource("opencompass/AIME2025", "test", ("AIME2025-I", "AIME2025-II")),
    "math500": HubSource("HuggingFaceH4/MATH-500", "test"),
    "amc23": HubSource("math-ai/amc23", "test"),
}
EXPECTED_COUNTS = {"aime24": 30, "aime25": 30, "math500": 500, "amc23": 40}
# Hub copies name their fields differently; the first present one wins.
FIELD_ALIASES = {"problem": ("problem", "question"), "answer": ("answer",), "id": ("id", "unique_id")}


def available_benchmarks() -> tuple[str, ...]:
    return PAPER_BENCHMARKS + SYNTHETIC_BENCHMARKS


def normalize_answer(value) -> str:
    """Gold answers as strings: integral floats ``27.0`` -> ``27``; AIME-style ``025`` -> ``25``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    if text.isdigit():
        return str(int(text))
    return text


def _pick(record: dict, field: str, where: str):
    for alias in FIELD_ALIASES[field]:
        if record.get(alias) not in (None, ""):
            return record[alias]
    raise ValueError(f"{where}: missing field {field!r} (looked for {list(FIELD_ALIASES[field])}); "
                     f"fields present: {sorted(record)}")


def _normalize_record(record: dict, where: str, default_id: str) -> dict:
    out = dict(record)
    out["problem"] = str(_pick(record, "problem", where))
    out["answer"] = normalize_answer(_pick(record, "answer", where))
    has_id = any(record.get(a) not in (None, "") for a in FIELD_ALIASES["id"])
    out["id"] = str(_pick(record, "id", where)) if has_id else default_id
    return out


def _read_jsonl(path: Path, name: str) -> list[dict]:
    """Parse a benchmark JSONL file; errors name the file and the 1-based line."""
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {name!r}: no file {path} (expected {name}.jsonl in --data-dir)")
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"benchmark {name!r}: {path} line {line_no}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}); the file is corrupt or truncated") from e
            if not isinstance(raw, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
            records.append(_normalize_record(raw, where, default_id=f"{name}-{len(records)}"))
    return records


def _load_hub(name: str) -> list[dict]:
    import datasets  # heavy import, only for hub loads

    source = HUB_SOURCES[name]
    records = []
    for config in source.configs:
        rows = datasets.load_dataset(source.repo, config, split=source.split)
        for row in rows:
            where = f"benchmark {name!r}: hub {source.repo} ({config or 'default'}, {source.split}) row {len(records)}"
            records.append(_normalize_record(dict(row), where, default_id=f"{name}-{len(records)}"))
    return records


def _check(records: list[dict], name: str, origin: str) -> None:
    expected = EXPECTED_COUNTS[name]
    if len(records) != expected:
        raise ValueError(f"benchmark {name!r}: {origin} has {len(records)} records, expected {expected} "
                         f"(wrong or truncated file?)")
    seen = set()
    for rec in records:
        if rec["id"] in seen:
            raise ValueError(f"benchmark {name!r}: {origin} has duplicate id {rec['id']!r}")
        seen.add(rec["id"])


def _toy_validation() -> list[dict]:
    """TOY_EVAL_SIZE held-out problems disjoint from both the training split and the ``toy`` test problems."""
    test = {r["problem"] for r in generate_toy_problems(TOY_EVAL_SIZE, seed=TOY_EVAL_SEED, split="test")}
    candidates = generate_toy_problems(2 * TOY_EVAL_SIZE, seed=TOY_VAL_SEED, split="test")
    kept = [r for r in candidates if r["problem"] not in test][:TOY_EVAL_SIZE]
    return [{**r, "id": f"toy-val-{i:05d}"} for i, r in enumerate(kept)]


def load_benchmark(name: str, data_dir: str | Path | None = None) -> list[dict]:
    """Records ``{id, problem, answer, ...}`` of benchmark ``name`` (see the module table).

    ``data_dir``: read ``{data_dir}/{name}.jsonl`` instead of the hub. ``toy`` and ``chain*`` ignore it.
    """
    if name == TOY_BENCHMARK:
        return generate_toy_problems(TOY_EVAL_SIZE, seed=TOY_EVAL_SEED, split="test")
    if name == TOY_VAL_BENCHMARK:
        return _toy_validation()
    if name in CHAIN_BENCHMARKS:
        return generate_chain_problems(CHAIN_EVAL_SIZE, seed=CHAIN_EVAL_SEED, split=CHAIN_BENCHMARKS[name])
    if name not in HUB_SOURCES:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(available_benchmarks())}")
    if data_dir is not None:
        path = Path(data_dir) / f"{name}.jsonl"
        records = _read_jsonl(path, name)
        _check(records, name, str(path))
    else:
        records = _load_hub(name)
        _check(records, name, f"hub dataset {HUB_SOURCES[name].repo}")
    return records
