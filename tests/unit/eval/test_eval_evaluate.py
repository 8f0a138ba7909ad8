"""evaluate() with a scripted engine: metrics against exact arithmetic, truncation, resume, reports."""

import json
import re
from fractions import Fraction
from math import comb

import pytest

from megatron_opd.data.toy_task import build_toy_tokenizer
from megatron_opd.eval import GradingPool, evaluate, load_benchmark
from megatron_opd.eval.config import EvalConfig
from megatron_opd.eval.report import format_comparison_table, load_results, write_comparison
from megatron_opd.rollout.base import RolloutEngine
from megatron_opd.rollout.types import Sample

N, K = 4, (1, 2, 4)


def _plan(pos: int, j: int) -> tuple[bool, str]:
    """Scripted outcome of sample j of problem pos: (answer correct?, finish reason)."""
    return j < pos % (N + 1), ("length" if (pos % 3 == 0 and j == 0) else "stop")


class ScriptedEngine(RolloutEngine):
    """Answers toy problems from the prompt text; which samples are right is fixed by ``_plan``."""

    def __init__(self, tokenizer):
        super().__init__(seed=0)
        self.tok, self.calls, self.problems = tokenizer, 0, 0

    def generate(self, prompts, params):
        self.calls += 1
        self.problems += len(prompts)
        start = self.prompt_counter  # generation sets it to the problem position
        self._take_seeds(len(prompts), params)
        out = []
        for i, ids in enumerate(prompts):
            problem = re.search(r"user\n(.*?)<\|im_end\|>", self.tok.decode(ids)).group(1)
            env = {}
            for stmt in problem[:-2].split(";"):  # strip "=?"
                name, _, expr = stmt.rpartition("=")
                value = eval(expr, {}, dict(env))  # toy expressions only: digits, a-e, + and -
                if name:
                    env[name] = value
            for j in range(params.n):
                right, finish = _plan(start + i, j)
                text = f"x;\\boxed{{{value if right else value + 1}}}<|im_end|>"
                out.append(Sample(prompt_ids=ids, response_ids=self.tok(text, add_special_tokens=False)["input_ids"],
                                  logprobs=[0.0], finish_reason=finish, prompt_index=i, sample_index=j))
        return out

    def update_weights(self, source):
        raise NotImplementedError


def _expected_pass(num_problems: int, k: int) -> float:
    total = Fraction(0)
    for pos in range(num_problems):
        c = sum(right and finish == "stop" for right, finish in (_plan(pos, j) for j in range(N)))
        total += 1 - Fraction(comb(N - c, k), comb(N, k))
    return float(total / num_problems)


@pytest.fixture(scope="module")
def pool():
    with GradingPool(num_workers=1) as p:
        yield p


def _cfg(tmp_path, **kw):
    return EvalConfig(benchmarks=("toy",), n=N, ks=K, out_dir=str(tmp_path / "run"), limit=11,
                      batch_problems=3, grader_workers=1, **kw)


def test_metrics_match_exact_counts_and_resume_skips_finished(tmp_path, pool):
    tok = build_toy_tokenizer()
    engine = ScriptedEngine(tok)
    results = evaluate(engine, tok, config=_cfg(tmp_path), pool=pool, show_progress=False)
    toy = results["benchmarks"]["toy"]
    for k in K:
        assert toy["metrics"][f"pass@{k}"]["value"] == pytest.approx(_expected_pass(11, k), abs=1e-12)
    assert toy["metrics"]["mean@4"]["value"] == pytest.approx(_expected_pass(11, 1), abs=1e-12)
    assert toy["verdicts"]["truncated"] == len([p for p in range(11) if p % 3 == 0])
    assert toy["generated"] == 11 and toy["resumed"] == 0 and engine.calls == 4  # ceil(11 / 3)
    assert results["mean"]["metrics"]["pass@4"]["value"] == toy["metrics"]["pass@4"]["value"]
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"results.json", "results.md", "pass_at_k.png", "generations"}
    assert (run / "pass_at_k.png").read_bytes()[:4] == b"\x89PNG"
    assert load_results(run) == json.loads(json.dumps(results))

    # Drop the last 4 problems from the raw file: a rerun regenerates exactly those, the same way.
    gen = run / "generations" / "toy.jsonl"
    lines = gen.read_text().splitlines()
    gen.write_text("\n".join(lines[:7]) + "\n" + lines[7][:20])  # plus a torn line, as after a kill
    again = ScriptedEngine(tok)
    rerun = evaluate(again, tok, config=_cfg(tmp_path), pool=pool, show_progress=False)
    assert again.problems == 4 and rerun["benchmarks"]["toy"]["resumed"] == 7
    assert gen.read_text().splitlines() == lines
    assert rerun["benchmarks"]["toy"]["metrics"] == toy["metrics"]


def test_resume_with_other_settings_is_refused(tmp_path, pool):
    tok = build_toy_tokenizer()
    evaluate(ScriptedEngine(tok), tok, config=_cfg(tmp_path), pool=pool, show_progress=False)
    with pytest.raises(ValueError, match=r"other settings.*temperature"):
        evaluate(ScriptedEngine(tok), tok, config=_cfg(tmp_path, temperature=1.0), pool=pool,
                 show_progress=False)


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--n 4 must be >= every k"):
        EvalConfig(n=4, ks=(1, 8))
    with pytest.raises(ValueError, match="--benchmarks: unknown"):
        EvalConfig(benchmarks=("gsm8k",))


def test_comparison_table_is_laid_out_like_the_paper(tmp_path):
    def fake(value):
        metric = {"pass@8": {"value": value, "ci_low": value - 0.1, "ci_high": value + 0.1}}
        return {"run_name": str(value), "benchmarks": {b: {"metrics": metric} for b in ("aime24", "amc23")},
                "mean": {"benchmarks": ["aime24", "amc23"], "metrics": metric}}
    runs = {"base": fake(0.25), "block64": fake(0.5)}
    table = format_comparison_table(runs).splitlines()
    assert table[0] == "| pass@8 | aime24 | amc23 | mean |"
    assert table[2] == "| base | 0.2500 | 0.2500 | 0.2500 |" and table[3].startswith("| block64 | 0.5000")
    paths = write_comparison(runs, tmp_path)
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert load_benchmark("toy")[0]["id"].startswith("toy-test")


def test_seed_aggregation_mean_and_sample_std():
    from megatron_opd.eval.report import aggregate_seeds, format_seed_table

    def fake(value):
        metric = {"pass@8": {"value": value, "ci_low": value, "ci_high": value}}
        return {"benchmarks": {"toy": {"metrics": metric}}, "mean": {"benchmarks": ["toy"], "metrics": metric}}
    agg = aggregate_seeds({"sampled": [fake(0.2), fake(0.4), fake(0.9)], "block64": [fake(0.5)]})
    assert agg["sampled"]["toy"]["mean"] == pytest.approx(0.5)
    assert agg["sampled"]["mean"]["std"] == pytest.approx(((0.09 + 0.01 + 0.16) / 2) ** 0.5)
    assert agg["block64"]["toy"]["std"] == 0.0
    table = format_seed_table(agg).splitlines()
    assert table[2] == "| sampled | 0.500 ± 0.361 (n=3) | 0.500 ± 0.361 (n=3) |"
