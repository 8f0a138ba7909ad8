"""``megatron-opd eval`` / ``python -m megatron_opd.eval``: pass@k of a model on math benchmarks.

Examples::

    # in-process engine on an HF checkpoint, local benchmark copies, pass@1 and pass@8
    python -m megatron_opd.eval --model-hf ckpt/hf --data-dir ../shared/data/benchmarks --out-dir outputs/eval
    # an SGLang server (or router) already serving the model
    python -m megatron_opd.eval --url http://127.0.0.1:30000 --tokenizer Qwen/Qwen3-1.7B --n 16 --k 1,8,16
    # compare finished runs: Markdown table + bar chart
    python -m megatron_opd.eval --compare outputs/base outputs/block64 --out-dir outputs/compare

Re-running the same command resumes: finished problems are read from ``generations/*.jsonl`` and only
graded again (the model is not even loaded when nothing is left to generate).
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_opd.eval.benchmarks import RAW_PROMPT_BENCHMARKS, available_benchmarks, default_chat_template


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-opd eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    engine = p.add_argument_group("engine (choose one)")
    engine.add_argument("--model-hf", help="HF model dir: generate in-process (CPU or one GPU)")
    engine.add_argument("--url", help="SGLang server/router URL (http://host:port)")
    engine.add_argument("--tokenizer", help="tokenizer dir or hub id (default: --model-hf); 'toy' = the toy task's")
    engine.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="in-process weights")
    engine.add_argument("--max-batch-rows", type=int, default=256, help="in-process: rows per forward batch")
    p.add_argument("--benchmarks", type=_csv, default=("aime24", "aime25", "math500", "amc23"),
                   help=f"comma-separated, from {', '.join(available_benchmarks())}")
    p.add_argument("--n", type=int, default=8, help="samples per problem (>= every k)")
    p.add_argument("--k", type=lambda s: tuple(int(x) for x in _csv(s)), default=(1, 8), help="e.g. 1,8")
    p.add_argument("--data-dir", help="local {name}.jsonl copies (default: hub datasets)")
    p.add_argument("--out-dir", default="outputs/eval")
    p.add_argument("--limit", type=int, help="first N problems of each benchmark only")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instruction", help="text appended to each problem (default: 'Please reason step by "
                                         "step, and put your final answer within \\boxed{}.'; none for toy)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed the raw problem text (the default for the raw-prompt benchmarks: "
                        f"{', '.join(RAW_PROMPT_BENCHMARKS)}; they cannot be mixed with the others)")
    p.add_argument("--enable-thinking", action="store_true", help="Qwen3 chat template thinking mode")
    p.add_argument("--batch-problems", type=int, default=16, help="problems per engine call (resume granularity)")
    p.add_argument("--grader-workers", type=int, default=2)
    p.add_argument("--grade-timeout", type=float, default=10.0, help="seconds per answer")
    p.add_argument("--run-name", help="label in tables and plots (default: the out-dir name)")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="only compare finished runs")
    p.add_argument("--metric", default="pass@8", help="metric of --compare tables/plots")
    p.add_argument("--no-progress", action="store_true")
    return p


def chat_template_of(args: argparse.Namespace) -> bool:
    """Raw prompts with --no-chat-template, else the benchmarks' default (raw for the chain task)."""
    return default_chat_template(args.benchmarks) and not args.no_chat_template


def config_from_args(args: argparse.Namespace):
    from megatron_opd.eval.config import EvalConfig

    return EvalConfig(
        benchmarks=args.benchmarks, n=args.n, ks=args.k, data_dir=args.data_dir, out_dir=args.out_dir,
        limit=args.limit, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, seed=args.seed, instruction=args.instruction,
        chat_template=chat_template_of(args), enable_thinking=args.enable_thinking,
        batch_problems=args.batch_problems, grader_workers=args.grader_workers,
        grade_timeout_s=args.grade_timeout, run_name=args.run_name,
        extra={"model_hf": args.model_hf, "url": args.url, "tokenizer": args.tokenizer or args.model_hf})


class LazyEngine:
    """Builds the rollout engine on first use, so a finished run is re-graded without loading a model."""

    def __init__(self, factory):
        self._factory = factory
        self._engine = None

    @property
    def built(self) -> bool:
        return self._engine is not None

    def __getattr__(self, name):
        if self._engine is None:
            self._engine = self._factory()
        return getattr(self._engine, name)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


def load_tokenizer(name: str):
    if name == "toy":
        from megatron_opd.data.toy_task import build_toy_tokenizer

        return build_toy_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def _engine_factory(args: argparse.Namespace, vocab_size: int):
    def build():
        import torch

        from megatron_opd.rollout import build_rollout_engine

        if args.url:
            return build_rollout_engine(args.url, seed=args.seed)
        dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        return build_rollout_engine(args.model_hf, vocab_size=vocab_size, seed=args.seed,
                                    max_batch_rows=args.max_batch_rows, dtype=dtype)
    return build


def _compare(args: argparse.Namespace) -> int:
    from megatron_opd.eval.report import load_results, write_comparison

    runs = {}
    for run_dir in args.compare:
        results = load_results(run_dir)
        runs[results["run_name"]] = results
    paths = write_comparison(runs, args.out_dir, metric=args.metric)
    print(paths["markdown"].read_text())
    print(f"wrote {paths['markdown']} and {paths['plot']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        return _compare(args)
    if bool(args.model_hf) == bool(args.url):
        parser.error("choose exactly one engine: --model-hf DIR (in-process) or --url URL (SGLang)")
    if args.url and not args.tokenizer:
        parser.error("--url needs --tokenizer (the served model's tokenizer dir or hub id)")
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    from megatron_opd.eval.harness import evaluate
    from megatron_opd.eval.report import format_run_table

    tokenizer = load_tokenizer(args.tokenizer or args.model_hf)
    engine = LazyEngine(_engine_factory(args, vocab_size=len(tokenizer)))
    try:
        results = evaluate(engine, tokenizer, config=cfg, show_progress=not args.no_progress)
    finally:
        engine.close()
    print(format_run_table(results))
    print(json.dumps({name: b["generated"] for name, b in results["benchmarks"].items()}),
          "problems generated now;", "model loaded" if engine.built else "model not loaded", file=sys.stderr)
    return 0
