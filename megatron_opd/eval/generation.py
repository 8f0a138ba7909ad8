"""Sampling n responses per benchmark problem through any ``RolloutEngine``, saved and resumable.

Raw generations go to ``{out_dir}/generations/{benchmark}.jsonl``, one line per finished problem,
appended (and fsynced) after every engine call, so grading can be redone without regenerating and
a killed run resumes without regenerating finished problems. Each line records the generation
settings; resuming with different settings is refused instead of mixing two runs in one file.

Seeds: sample j of problem i gets ``derive_sample_seed(base, i, j)``, ``base`` a hash of (seed,
benchmark); the engine's prompt counter is set to the problem's position before each call and
restored afterwards, so results depend neither on batching nor on where a run was interrupted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from megatron_opd.data.prompts import render_prompt
from megatron_opd.eval.config import EvalConfig


def read_generations(path: Path) -> dict[str, dict]:
    """Finished problems of a generations file, by id. A torn last line (killed mid-write) is cut off."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # the process died while writing this line: drop it, it is regenerated
        with path.open("r+b") as f:
            f.truncate(end)
    finished = {}
    for line_no, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_no}: corrupt generations record ({e.msg}); "
                                 f"delete the file to regenerate") from e
            finished[record["id"]] = record
    return finished


def _check_settings(finished: dict[str, dict], settings: dict, path: Path) -> None:
    for record in finished.values():
        if record["settings"] != settings:
            diff = {k: (record["settings"].get(k), v) for k, v in settings.items() if record["settings"].get(k) != v}
            raise ValueError(f"{path}: problem {record['id']!r} was generated with other settings "
                             f"(saved, now): {diff}; use another --out-dir or delete the file")


def _chunks(todo: list[tuple[int, dict]], size: int) -> Iterator[list[tuple[int, dict]]]:
    """Runs of at most ``size`` problems with consecutive positions (seeds follow positions)."""
    chunk: list[tuple[int, dict]] = []
    for pos, record in todo:
        if chunk and (len(chunk) == size or pos != chunk[-1][0] + 1):
            yield chunk
            chunk = []
        chunk.append((pos, record))
    if chunk:
        yield chunk


def _problem_line(record: dict, benchmark: str, samples, tokenizer, settings: dict) -> dict:
    return {
        "id": record["id"], "benchmark": benchmark, "answer": record["answer"],
        "prompt_tokens": len(samples[0].prompt_ids),
        "samples": [{"text": tokenizer.decode(s.response_ids, skip_special_tokens=False),
                     "finish_reason": s.finish_reason, "num_tokens": len(s.response_ids)} for s in samples],
        "settings": settings,
    }


def _generate_chunk(engine, chunk, prompts, params) -> list:
    """One engine call for a run of consecutive problems; returns samples grouped per problem."""
    engine.load_state_dict({"seed": engine.seed, "prompt_counter": chunk[0][0]})
    samples = engine.generate(prompts, params)
    if len(samples) != len(prompts) * params.n:
        raise RuntimeError(f"rollout engine returned {len(samples)} samples for {len(prompts)} prompts "
                           f"x n={params.n}")
    return [samples[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]  # prompt-major


def generate_benchmark(engine, tokenizer, benchmark: str, records: list[dict], cfg: EvalConfig,
                       out_dir: Path, show_progress: bool = True) -> tuple[list[dict], dict]:
    """Generations of every problem of ``records`` (loaded or produced now), in record order.

    Returns (problem lines as saved, {"resumed": problems found finished, "generated": produced now}).
    """
    path = out_dir / "generations" / f"{benchmark}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = cfg.generation_settings(benchmark)
    finished = read_generations(path)
    _check_settings(finished, settings, path)
    todo = [(pos, r) for pos, r in enumerate(records) if r["id"] not in finished]
    counts = {"resumed": len(records) - len(todo), "generated": len(todo)}
    params = cfg.sampling_params(_stop_ids(tokenizer), benchmark)
    bar = tqdm(total=len(records), initial=counts["resumed"], desc=f"generate {benchmark}",
               unit="problem", disable=not show_progress)
    saved_state = engine.state_dict() if todo else None
    try:
        for chunk in _chunks(todo, cfg.batch_problems):
            prompts = [render_prompt(tokenizer, r["problem"], chat_template=cfg.chat_template,
                                     enable_thinking=cfg.enable_thinking,
                                     instruction=cfg.instruction_for(benchmark)) for _, r in chunk]
            grouped = _generate_chunk(engine, chunk, prompts, params)
            lines = [_problem_line(r, benchmark, s, tokenizer, settings) for (_, r), s in zip(chunk, grouped)]
            _append(path, lines)
            finished.update((line["id"], line) for line in lines)
            bar.update(len(chunk))
    finally:
        bar.close()
        if saved_state is not None:  # an engine shared with training keeps its own sampling stream
            engine.load_state_dict(saved_state)
    return [finished[r["id"]] for r in records], counts


def _append(path: Path, lines: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())  # a kill right after this call must not lose finished problems


def _stop_ids(tokenizer) -> tuple[int, ...]:
    """The chat EOS (e.g. <|im_end|>) stops generation even when the model config names another EOS."""
    return () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
