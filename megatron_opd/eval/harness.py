"""``evaluate``: generate (resumable) → grade (process pool) → pass@k / mean@n with bootstrap CIs.

Truncated responses (finish reason ``length`` or ``abort``) are never graded: they count as wrong and
are reported as ``truncated``. The headline ``mean`` is the unweighted mean of the benchmark scores
over the paper's benchmarks present in the run (all benchmarks when only ``toy`` was run).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from pathlib import Path

import numpy as np

from megatron_opd.eval.benchmarks import PAPER_BENCHMARKS, load_benchmark
from megatron_opd.eval.config import EvalConfig
from megatron_opd.eval.generation import generate_benchmark
from megatron_opd.eval.grading import VERDICTS, GradingPool
from megatron_opd.eval.metrics import problem_scores, summarize_mean, summarize_scores
from megatron_opd.eval.report import write_grades, write_run_report

UNFINISHED = ("length", "abort")


def grade_problems(lines: list[dict], pool: GradingPool) -> list[list[str]]:
    """Verdicts [problem][sample] for saved problem lines; unfinished samples are ``truncated``."""
    items, where = [], []
    verdicts = [["truncated"] * len(line["samples"]) for line in lines]
    for p, line in enumerate(lines):
        for s, sample in enumerate(line["samples"]):
            if sample["finish_reason"] not in UNFINISHED:
                items.append((sample["text"], line["answer"]))
                where.append((p, s))
    for (p, s), verdict in zip(where, pool.grade_many(items)):
        verdicts[p][s] = verdict
    return verdicts


def summarize_benchmark(lines: list[dict], verdicts: list[list[str]], cfg: EvalConfig) -> tuple[dict, dict]:
    """(report entry, per-problem score arrays) of one benchmark."""
    num_correct = [sum(v == "correct" for v in vs) for vs in verdicts]
    scores = problem_scores(num_correct, cfg.n, cfg.ks)
    tally = Counter(v for vs in verdicts for v in vs)
    lengths = [s["num_tokens"] for line in lines for s in line["samples"]]
    entry = {
        "num_problems": len(lines),
        "num_samples": len(lengths),
        "metrics": summarize_scores(scores, seed=cfg.bootstrap_seed),
        "verdicts": {v: tally.get(v, 0) for v in VERDICTS},
        "truncation_rate": tally.get("truncated", 0) / max(len(lengths), 1),
        "mean_response_tokens": float(np.mean(lengths)) if lengths else 0.0,
    }
    return entry, scores


def evaluate(engine, tokenizer, benchmarks=None, n=None, ks=None, sampling_params=None, out_dir=None, *,
             config: EvalConfig | None = None, pool: GradingPool | None = None, show_progress: bool = True,
             **overrides) -> dict:
    """Evaluate ``engine`` (any ``RolloutEngine``) on ``benchmarks``; writes and returns the results.

    Either pass an ``EvalConfig`` as ``config`` or the common fields directly (``benchmarks``, ``n``,
    ``ks``, ``out_dir`` and any other ``EvalConfig`` field as a keyword); ``sampling_params`` (a
    ``SamplingParams``) overrides temperature/top_p/top_k/max_new_tokens/seed.
    Output in ``out_dir``: ``generations/*.jsonl`` (raw), ``grades/*.jsonl``, ``results.json``,
    ``results.md``, ``pass_at_k.png``. Returns the ``results.json`` content.
    ``pool``: a ``GradingPool`` to reuse across calls (e.g. one per variant sweep); default: a new one.
    """
    cfg = config or _build_config(benchmarks, n, ks, sampling_params, out_dir, overrides)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"run_name": cfg.run_name or out.name, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
               "config": cfg.to_dict(), "benchmarks": {}}
    all_scores = {}
    with contextlib.nullcontext(pool) if pool else GradingPool(cfg.grader_workers, cfg.grade_timeout_s) as pool:
        for name in cfg.benchmarks:
            records = load_benchmark(name, cfg.data_dir)[: cfg.limit]
            lines, counts = generate_benchmark(engine, tokenizer, name, records, cfg, out, show_progress)
            verdicts = grade_problems(lines, pool)
            write_grades(out / "grades" / f"{name}.jsonl", lines, verdicts)
            entry, all_scores[name] = summarize_benchmark(lines, verdicts, cfg)
            results["benchmarks"][name] = {**entry, **counts}
    headline = [b for b in cfg.benchmarks if b in PAPER_BENCHMARKS] or list(cfg.benchmarks)
    results["mean"] = {"benchmarks": headline,
                       "metrics": summarize_mean({b: all_scores[b] for b in headline}, seed=cfg.bootstrap_seed)}
    write_run_report(results, out)
    return results


def _build_config(benchmarks, n, ks, sampling_params, out_dir, overrides) -> EvalConfig:
    fields = dict(overrides)
    for key, value in (("benchmarks", benchmarks), ("n", n), ("ks", ks), ("out_dir", out_dir)):
        if value is not None:
            fields[key] = tuple(value) if key in ("benchmarks", "ks") else value
    if sampling_params is not None:
        fields.update(temperature=sampling_params.temperature, top_p=sampling_params.top_p,
                      top_k=sampling_params.top_k, max_new_tokens=sampling_params.max_new_tokens)
        if sampling_params.seed is not None:
            fields["seed"] = sampling_params.seed
    return EvalConfig(**{k: str(v) if k == "out_dir" else v for k, v in fields.items()})
