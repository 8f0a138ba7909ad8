"""Megatron-style command line for ``megatron-opd train``: flags fill one ``OPDConfig``.

The flag table is the single source of truth (the frozen-flags test reads it); every flag maps to
one field of one config section. Validation happens when the config is built, before any process
group starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from megatron_opd.training.config import ConfigError, OPDConfig

# flag -> (section, field, type for Optional fields or None, help)
FLAGS: dict[str, tuple[str, str, type | None, str]] = {
    # parallelism
    "--tensor-model-parallel-size": ("parallel", "tensor_model_parallel_size", None, "TP degree"),
    "--pipeline-model-parallel-size": ("parallel", "pipeline_model_parallel_size", None, "PP degree"),
    "--virtual-pipeline-model-parallel-size": ("parallel", "virtual_pipeline_model_parallel_size", int,
                                               "virtual pipeline stages per PP rank"),
    "--context-parallel-size": ("parallel", "context_parallel_size", None, "CP degree (needs Transformer Engine)"),
    "--sequence-parallel": ("parallel", "sequence_parallel", None, "sequence parallelism (needs TP > 1)"),
    "--expert-model-parallel-size": ("parallel", "expert_model_parallel_size", None, "EP degree (MoE students)"),
    "--expert-tensor-parallel-size": ("parallel", "expert_tensor_parallel_size", int,
                                      "expert TP degree (MoE students; default: the TP degree)"),
    "--distributed-timeout-minutes": ("parallel", "distributed_timeout_minutes", None,
                                      "timeout of every process group (rank 0 evaluates/exports while others wait)"),
    # model
    "--student-hf": ("model", "student_hf", str, "HF dir of the student (config + tokenizer [+ weights])"),
    "--teacher-hf": ("model", "teacher_hf", str, "HF dir of the teacher for --teacher-url local"),
    "--bf16": ("model", "bf16", None, "train in bf16"),
    "--chunked-head": ("model", "chunked_head", None,
                       "output layer + log-probs in token chunks, no [tokens, V/tp] logits (--no-chunked-head: off)"),
    "--head-chunk-tokens": ("model", "head_chunk_tokens", int, "tokens per chunk of the chunked head"),
    "--moe-aux-loss-coeff": ("model", "moe_aux_loss_coeff", None, "MoE load-balancing aux loss coefficient"),
    "--moe-router-dtype": ("model", "moe_router_dtype", None, "MoE router precision: fp32 | fp64"),
    "--moe-token-dispatcher-type": ("model", "moe_token_dispatcher_type", None, "MoE dispatcher: alltoall | allgather"),
    # optimisation
    "--lr": ("optim", "lr", None, "peak learning rate"),
    "--min-lr": ("optim", "min_lr", None, "final learning rate of the decay"),
    "--lr-warmup-iters": ("optim", "lr_warmup_iters", None, "linear warm-up steps"),
    "--lr-decay-style": ("optim", "lr_decay_style", None, "constant | linear | cosine"),
    "--weight-decay": ("optim", "weight_decay", None, "AdamW weight decay"),
    "--clip-grad": ("optim", "clip_grad", None, "global gradient-norm clip (0: off)"),
    "--adam-beta1": ("optim", "adam_beta1", None, "Adam beta1"),
    "--adam-beta2": ("optim", "adam_beta2", None, "Adam beta2"),
    "--train-iters": ("optim", "train_iters", None, "optimizer steps of the run"),
    "--micro-batch-size": ("optim", "micro_batch_size", None, "sequences per forward on one DP rank"),
    "--max-tokens-per-micro-batch": ("optim", "max_tokens_per_micro_batch", None,
                                     "token budget per micro-batch, sequences grouped by length (0: --micro-batch-size)"),
    "--seed": ("optim", "seed", None, "random seed (model init, sampling, shuffling)"),
    # checkpoints
    "--save": ("checkpoint", "save", str, "checkpoint directory"),
    "--save-interval": ("checkpoint", "save_interval", None, "save every N steps (0: at the end)"),
    "--keep-last": ("checkpoint", "keep_last", None, "keep the newest N checkpoints"),
    "--load": ("checkpoint", "load", str, "resume from a --save dir, or start from a Megatron checkpoint"),
    "--save-hf": ("checkpoint", "save_hf", str, "export the final student as HF safetensors here"),
    "--export-hf-at": ("checkpoint", "export_hf_at", int, "comma-separated steps: HF snapshots in RUN_DIR/hf_step<N>"),
    # objective
    "--objective": ("objective", "objective", None, "sampled | lsm | sft"),
    "--topk": ("objective", "topk", None, "teacher top-K support size for lsm"),
    "--lsm-tail": ("objective", "lsm_tail", None, "lsm: add the sampled token to the support when outside it"),
    "--ppo-clip": ("objective", "ppo_clip", float, "sampled: PPO clip epsilon of the ratio"),
    "--epochs-per-rollout": ("objective", "epochs_per_rollout", None, "passes over each rollout batch"),
    "--minibatches-per-rollout": ("objective", "minibatches_per_rollout", None, "optimizer steps per pass"),
    "--logprob-source": ("objective", "logprob_source", None,
                         "recompute (with the sampling weights) | engine | proximal (behaviour log-probs)"),
    "--special-token-mask": ("objective", "special_token_mask", None, "auto | none | comma-separated ids"),
    "--gate-span-delimiter": ("objective", "span_delimiter", None, "--gate span: spans end at tokens containing it"),
    # drift gate
    "--gate": ("gate", "granularity", None,
               "none | token | block | span | sequence | tis | masked_is | sequence_is (IS corrections) "
               "(default: none for --objective sft, block otherwise)"),
    "--is-cap": ("gate", "is_cap", None, "C of --gate tis / masked_is / sequence_is"),
    "--gate-block-size": ("gate", "block_size", None, "tokens per block for --gate block"),
    "--gate-tau": ("gate", "tau", None, "gate temperature: g = exp(-tau * |D|)"),
    "--gate-aggregation": ("gate", "aggregation", None, "mean | mean_abs | k3"),
    "--gate-fn": ("gate", "gate_fn", None, "exp | clip"),
    "--gate-clip-eps": ("gate", "clip_eps", float, "threshold of --gate-fn clip"),
    "--gate-normalization": ("gate", "normalization", None, "mean | none | clipped | residual"),
    "--gate-clip-range": ("gate", "clip_range", None, "a,b bounds of --gate-normalization clipped"),
    "--gate-residual-alpha": ("gate", "residual_alpha", None, "alpha of --gate-normalization residual"),
    # engines
    "--rollout-url": ("engines", "rollout_url", None, "SGLang URL(s), comma separated, or local"),
    "--teacher-url": ("engines", "teacher_url", None, "SGLang URL(s), comma separated, or local"),
    "--rollout-worker-urls": ("engines", "rollout_worker_urls", None,
                              "with --rollout-url ROUTER: the SGLang workers behind it, comma separated "
                              "(weight sync and aborts go to each directly)"),
    "--sglang-timeout": ("engines", "sglang_timeout_s", None, "seconds one SGLang request may take before it "
                         "is aborted and retried (on another worker where there is one)"),
    "--sglang-unreachable-wait": ("engines", "sglang_unreachable_wait_s", None,
                                  "seconds to wait for an SGLang host that cannot be reached (logging which) "
                                  "before the run stops naming it; a relaunch resumes from the last checkpoint"),
    "--weight-sync": ("engines", "weight_sync", None, "how SGLang workers get new weights: disk (safetensors "
                      "in the run dir, a path every worker reads) or distributed (broadcast over a weight-update "
                      "group: NCCL on GPUs, gloo on CPU hosts)"),
    "--weight-sync-address": ("engines", "weight_sync_address", None, "--weight-sync distributed: address rank 0 "
                              "hosts the update group on, reachable from every worker (default: its address on "
                              "the route to the first worker)"),
    "--weight-sync-port": ("engines", "weight_sync_port", None, "--weight-sync distributed: port (0: a free one)"),
    "--weight-sync-backend": ("engines", "weight_sync_backend", None, "--weight-sync distributed: nccl or gloo "
                              "(default: nccl with CUDA, else gloo)"),
    "--prompts-per-rollout": ("engines", "prompts_per_rollout", None, "prompts in one rollout batch"),
    "--samples-per-prompt": ("engines", "samples_per_prompt", None, "samples per prompt"),
    "--temperature": ("engines", "temperature", None, "rollout temperature"),
    "--top-p": ("engines", "top_p", None, "rollout nucleus top-p"),
    "--top-k": ("engines", "top_k", None, "rollout top-k (-1: off)"),
    "--max-new-tokens": ("engines", "max_new_tokens", None, "response length limit"),
    "--max-staleness": ("engines", "max_staleness", None,
                        "K: rollouts generated while training, from weights <= K versions old (0: synchronous)"),
    "--rollout-threads": ("engines", "rollout_threads", None,
                          "torch threads of the rollout producer thread under --max-staleness (0: the trainer's)"),
    # data
    "--data-path": ("data", "data_path", str, "JSONL/Parquet file, hub dataset name, or toy"),
    "--prompt-field": ("data", "prompt_field", None, "field holding the problem"),
    "--answer-field": ("data", "answer_field", None, "field holding the final answer"),
    "--solution-field": ("data", "solution_field", None, "field holding a reference solution (sft)"),
    "--max-prompt-length": ("data", "max_prompt_length", None, "drop longer prompts (counted)"),
    "--chat-template": ("data", "chat_template", None, "render prompts with the student's chat template"),
    "--enable-thinking": ("data", "enable_thinking", None, "chat template thinking mode"),
    "--instruction": ("data", "instruction", None, "text appended to every problem"),
    # run
    "--run-dir": ("log", "run_dir", None, "metrics, config and plots go here"),
    "--log-interval": ("log", "log_interval", None, "steps between summary lines"),
    "--eval-interval": ("log", "eval_interval", None, "steps between evaluations (0: off)"),
    "--eval-benchmarks": ("log", "eval_benchmarks", None, "comma-separated benchmarks for periodic eval"),
    "--eval-n": ("log", "eval_n", None, "samples per problem in periodic eval"),
    "--tensorboard": ("log", "tensorboard", None, "also log to TensorBoard (if installed)"),
    "--wandb-project": ("log", "wandb_project", str, "also log to W&B (if installed)"),
    "--max-bad-steps": ("log", "max_bad_steps", None, "abort after this many non-finite losses in a row"),
    "--progress": ("log", "progress", None, "show a progress bar"),
}


# Flags whose default depends on another flag: left out of the parsed values unless typed, so that
# OPDConfig.from_dict picks the default (see training.config.default_gate_granularity).
DEFAULT_FOLLOWS_OTHER_FLAGS = {"--gate"}

# Element type of comma-separated (tuple) flags whose default is empty.
ITEM_TYPES = {f"{section}.{name}": opt_type for section, name, opt_type, _ in FLAGS.values() if opt_type is not None}


def _section_defaults() -> dict[str, object]:
    """Default instance of every section, to read field types and defaults from."""
    return {f.name: f.default_factory() for f in dataclasses.fields(OPDConfig)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-opd train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = _section_defaults()
    for flag, (section, name, opt_type, help_text) in FLAGS.items():
        default = getattr(defaults[section], name)
        dest = f"{section}.{name}"
        if flag in DEFAULT_FOLLOWS_OTHER_FLAGS:
            parser.add_argument(flag, dest=dest, type=opt_type or type(default), default=argparse.SUPPRESS,
                                help=help_text)
        elif isinstance(default, bool):
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        elif isinstance(default, tuple):
            parser.add_argument(flag, dest=dest, default=",".join(map(str, default)), help=help_text)
        else:
            parser.add_argument(flag, dest=dest, type=opt_type or type(default), default=default, help=help_text)
    parser.add_argument("--config", dest="config_file", default=None,
                        help="JSON file of an OPDConfig (flags given on the command line override it)")
    return parser


def parse_config(argv: list[str] | None = None) -> OPDConfig:
    """Flags (over an optional --config JSON) -> validated OPDConfig. Raises ConfigError."""
    parser = build_parser()
    args = parser.parse_args(argv)
    raw: dict[str, dict] = {}
    if args.config_file:
        raw = json.loads(Path(args.config_file).read_text())
    given = _flags_given(parser, argv)
    for dest, value in vars(args).items():
        if dest == "config_file":
            continue
        section, name = dest.split(".")
        if args.config_file and dest not in given:
            continue  # keep the config file's value unless the flag was typed
        default = getattr(_section_defaults()[section], name)
        if isinstance(default, tuple) and isinstance(value, str):
            item_type = ITEM_TYPES.get(dest) or (type(default[0]) if default else str)
            try:
                value = tuple(item_type(v) for v in value.split(",") if v)
            except ValueError as err:
                raise ConfigError(f"--{name.replace('_', '-')}: expected comma-separated {item_type.__name__}s, "
                                  f"got {value!r}") from err
        raw.setdefault(section, {})[name] = value
    raw.setdefault("parallel", {})["seed"] = raw.get("optim", {}).get("seed", 1234)
    try:
        return OPDConfig.from_dict(raw)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from err


def _flags_given(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    import sys

    tokens = sys.argv[1:] if argv is None else argv
    given = set()
    for action in parser._actions:  # argparse has no public "was this flag typed" API
        if any(tok == opt or tok.startswith(opt + "=") for tok in tokens for opt in action.option_strings):
            given.add(action.dest)
    return given
